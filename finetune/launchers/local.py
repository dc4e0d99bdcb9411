"""Local launcher: one process, or ``launcher.nproc_per_node`` processes through torchrun on this machine.

Environment set deliberately per step: OMP_NUM_THREADS (process.thread_count: what you typed or exported, else
the CPUs shared out; the step's log says which and why), a free MASTER_PORT, on GPU machines CUDA_VISIBLE_DEVICES
limited to the processes asked for (in a parallel sweep, the job's own slot of GPUs: finetune/launchers/slots.py),
and process.STEP_ENV (PYTHONFAULTHANDLER: a crash in native code leaves the Python stacks in the step log).
Single-process ``python -m`` steps start by fork from a process that has already imported the heavy libraries
(finetune/launchers/zygote.py; ``launcher.fork_steps=false`` starts each as a fresh interpreter).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

from finetune.auto.hardware import cpu_cores, gpus
from finetune.config.derived import process_layout, ranks, torchrun_head
from finetune.config.resolvers import REPO_ROOT
from finetune.launchers import slots
from finetune.launchers.process import STEP_ENV, StepResult, run_process, thread_count
from finetune.osutil import free_port
from finetune.recipes.common import PAUSE_FILE


def check(cfg) -> None:
    from finetune.errors import ConfigError

    check_gpu_slots(cfg, slots.current().of)
    if int(cfg.launcher.nnodes) > 1:
        raise ConfigError(
            "launcher.nnodes",
            int(cfg.launcher.nnodes),
            "launcher=local runs on this machine only; use launcher=torchrun (or launcher=slurm) for several nodes",
        )


def visible_gpus(cfg) -> Tuple[List[str], str]:
    """(the GPUs this machine lets us use, where that list comes from): the user's own CUDA_VISIBLE_DEVICES
    (indices, GPU or MIG UUIDs, a Slurm allocation's; never renumbered), else the GPUs nvidia-smi lists, else the
    hardware option's gpus_per_node (a plan made on a machine without GPUs)."""
    mine = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if mine:
        return mine, "CUDA_VISIBLE_DEVICES"
    found = gpus()
    if found:
        return [str(g["index"]) for g in found], "nvidia-smi"
    return [str(i) for i in range(int(cfg.hardware.gpus_per_node))], f"hardware.gpus_per_node of {cfg.hardware.name}"


def check_gpu_slots(cfg, jobs: int) -> None:
    """A parallel sweep on GPUs: every job that runs at once needs GPUs of its own (refused in one line when the
    visible ones do not go round). Checked before the sweep starts (finetune/callbacks.py) and by each job."""
    from finetune.errors import ConfigError

    if jobs <= 1 or cfg.hardware.device != "cuda" or int(cfg.hardware.gpus_per_node) <= 0:
        return
    visible, source = visible_gpus(cfg)
    per_job = gpus_per_job(cfg)
    if jobs * per_job > len(visible):
        raise ConfigError(
            "hydra.launcher.n_jobs",
            jobs,
            f"{jobs} jobs at once x {per_job} GPU(s) each = {jobs * per_job} GPUs, but {len(visible)} are visible "
            f"({source}); lower hydra.launcher.n_jobs to {max(1, len(visible) // per_job)} or the processes per job",
        )


def gpus_per_job(cfg) -> int:
    """GPUs one run uses on this machine: one per process of its distributed steps."""
    return int(process_layout(cfg)["nproc_per_node"])


def job_devices(cfg, n: int) -> str:
    """CUDA_VISIBLE_DEVICES for a step of n processes: the first n GPUs of this job's share of the visible ones
    (the whole list outside a parallel sweep)."""
    visible, _ = visible_gpus(cfg)
    return ",".join(slots.devices_of(slots.current(), visible, gpus_per_job(cfg))[:n])


def world(cfg) -> Dict[str, int]:
    return {**process_layout(cfg), "node_rank": int(cfg.launcher.node_rank)}


def _port(cfg) -> int:
    """The rendezvous port. The driver fills launcher.master_port with a free port once, before planning,
    so that the dry run, the manifest and the real run agree."""
    return int(cfg.launcher.master_port) or free_port()


def env(step, cfg) -> Dict[str, str]:
    w = world(cfg)
    e = dict(step.env)
    nproc = w["nproc_per_node"] if step.distributed != "none" else 1
    e.setdefault("OMP_NUM_THREADS", str(threads(step, cfg)[0]))
    e = {**STEP_ENV, **e}
    # the worker modules live in this repository; make them importable from the run folder (cwd)
    e["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), e.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))) if p
    )
    if cfg.hardware.device == "cuda" and int(cfg.hardware.gpus_per_node) > 0 and "CUDA_VISIBLE_DEVICES" not in e:
        e["CUDA_VISIBLE_DEVICES"] = job_devices(cfg, nproc)
    if step.distributed == "env":
        e.update(
            {
                "NNODES": str(w["nnodes"]),
                "NODE_RANK": str(w["node_rank"]),
                "NPROC_PER_NODE": str(w["nproc_per_node"]),
                "MASTER_ADDR": str(cfg.launcher.master_addr),
                "MASTER_PORT": str(_port(cfg)),
            }
        )
        if ranks(w) > 1:
            e["FORCE_TORCHRUN"] = "1"
    return e


def threads(step, cfg) -> Tuple[int, str]:
    """(OMP_NUM_THREADS of each of the step's processes, why): process.thread_count over this machine's CPUs."""
    if "OMP_NUM_THREADS" in step.env:
        return int(step.env["OMP_NUM_THREADS"]), f"set by the {step.name} step"
    nproc = world(cfg)["nproc_per_node"] if step.distributed != "none" else 1
    return thread_count(cfg, cpu_cores(), nproc)


def forks(cfg) -> bool:
    """Steps start by fork from the preloaded process (launcher.fork_steps) on the CPU. A GPU step always starts as
    a fresh process: a process forked after a library touched the CUDA driver cannot use CUDA reliably, and next
    to a GPU run the imports are a small share of its time."""
    return bool(cfg.launcher.fork_steps) and cfg.hardware.device != "cuda"


def torchrun_args(cfg) -> List[str]:
    w = world(cfg)
    args = torchrun_head(w)
    if w["nnodes"] == 1:
        args += [f"--master_addr={cfg.launcher.master_addr}", f"--master_port={_port(cfg)}"]
    else:
        rdzv_id = cfg.launcher.rdzv_id or "finetune"
        args += [
            f"--node_rank={w['node_rank']}",
            f"--rdzv_backend={cfg.launcher.rdzv_backend}",
            f"--rdzv_endpoint={cfg.launcher.master_addr}:{_port(cfg)}",
            f"--rdzv_id={rdzv_id}",
        ]
    return args


def argv(step, cfg) -> List[str]:
    w = world(cfg)
    if step.distributed == "torchrun" and ranks(w) > 1:
        return [step.argv[0], *torchrun_args(cfg), *step.argv[1:]]
    return list(step.argv)


def run_step(step, cfg, run_dir: Path, timeout_s=None) -> StepResult:
    if step.rank0_only and world(cfg)["node_rank"] != 0:
        return skipped(step)
    return launch(step, argv(step, cfg), env(step, cfg), run_dir, timeout_s, cfg=cfg)


def skipped(step) -> StepResult:
    """A step this node does not run (rank-0-only steps on the other nodes)."""
    return StepResult(step.name, [], 0, 0.0, "", "completed", extra={"skipped": "node_rank != 0"})


def launch(step, argv_: List[str], env_: Dict[str, str], run_dir: Path, timeout_s=None, log=None, cfg=None):
    """Run the step's process in its folder (the run folder unless the step names one), its output to its log and
    its progress file watched for the live line; forked from the preloaded process when the step allows it and
    launcher.fork_steps is on. The log's first lines: the command, the threads and why, how it was started."""
    n, why = threads(step, cfg)
    return run_process(
        step.name,
        argv_,
        env_,
        step.cwd or str(run_dir),
        Path(run_dir) / (log or step.log),
        timeout_s,
        progress=Path(run_dir) / step.progress if step.progress else None,
        fork=forks(cfg) and step.preload is not None,
        preload=tuple(step.preload or ()),
        header=(f"threads: {n} per process ({why})",),
        pause_file=Path(step.env[PAUSE_FILE]) if step.pausable and PAUSE_FILE in step.env else None,
        verbose=bool(cfg.verbose),
    )


def plan_files(plan, cfg, run_dir) -> Dict[str, str]:
    """No files of its own: the steps run as planned."""
    return {}
