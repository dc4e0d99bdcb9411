"""Local launcher: one process, or ``launcher.nproc_per_node`` processes through torchrun on this machine.

Environment set deliberately per step: OMP_NUM_THREADS (process.omp_threads: 1 for a tiny model, else cores /
processes), a free MASTER_PORT, on GPU
machines CUDA_VISIBLE_DEVICES limited to the processes asked for, and process.STEP_ENV (PYTHONFAULTHANDLER:
a crash in native code leaves the Python stacks in the step log).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

from finetune.config.derived import process_layout, ranks, torchrun_head
from finetune.config.resolvers import REPO_ROOT
from finetune.launchers.process import STEP_ENV, StepResult, omp_threads, run_process
from finetune.osutil import free_port


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check(cfg) -> None:
    from finetune.errors import ConfigError

    if int(cfg.launcher.nnodes) > 1:
        raise ConfigError(
            "launcher.nnodes",
            int(cfg.launcher.nnodes),
            "launcher=local runs on this machine only; use launcher=torchrun (or launcher=slurm) for several nodes",
        )


def visible_devices(n: int) -> str:
    """CUDA_VISIBLE_DEVICES for a step of n processes: the first n of the user's own CUDA_VISIBLE_DEVICES (indices,
    GPU or MIG UUIDs, a Slurm allocation's), else GPUs 0..n-1. Never renumbers what the user chose."""
    mine = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if mine:
        return ",".join(mine[:n])
    return ",".join(str(i) for i in range(n))


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
    e.setdefault("OMP_NUM_THREADS", str(omp_threads(cfg, _cores(), nproc)))
    e = {**STEP_ENV, **e}
    # the worker modules live in this repository; make them importable from the run folder (cwd)
    e["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), e.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))) if p
    )
    if cfg.hardware.device == "cuda" and int(cfg.hardware.gpus_per_node) > 0 and "CUDA_VISIBLE_DEVICES" not in e:
        e["CUDA_VISIBLE_DEVICES"] = visible_devices(nproc if step.distributed != "none" else 1)
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
    return launch(step, argv(step, cfg), env(step, cfg), run_dir, timeout_s)


def skipped(step) -> StepResult:
    """A step this node does not run (rank-0-only steps on the other nodes)."""
    return StepResult(step.name, [], 0, 0.0, "", "completed", extra={"skipped": "node_rank != 0"})


def launch(step, argv_: List[str], env_: Dict[str, str], run_dir: Path, timeout_s=None, log=None) -> StepResult:
    """Run the step's process in its folder (the run folder unless the step names one), its output to its log and
    its progress file watched for the live line."""
    return run_process(
        step.name,
        argv_,
        env_,
        step.cwd or str(run_dir),
        Path(run_dir) / (log or step.log),
        timeout_s,
        progress=Path(run_dir) / step.progress if step.progress else None,
    )
