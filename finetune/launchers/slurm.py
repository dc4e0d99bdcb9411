"""Slurm launcher, through submitit (no hand-written sbatch templates).

Each step of the plan becomes one Slurm job: ``launcher.nnodes`` nodes, one task per node, and on each node the
job body (``StepJob``, finetune/launchers/slurm_job.py) runs the step's command with
``finetune.launchers.process.run_process`` -
under torchrun with ``nproc_per_node`` ranks for distributed steps, node N of the rendezvous being Slurm's node N,
node 0's host the rendezvous endpoint. Steps that are not distributed run on node 0 only.

Preemption: jobs are submitted with ``--requeue`` and ``--signal=USR2@<launcher.signal_delay_s>``. A job that Slurm
preempts or requeues (SIGTERM) leaves no result and is rerun by Slurm; one that nears its time limit (USR2) requeues
itself through submitit. The rerun resumes from the run folder's last complete checkpoint (FINETUNE_RESUME=1);
``launcher.max_requeues`` caps the reruns. The driver waits through REQUEUED / PENDING and records the restarts.

While the job runs, the driver polls its state (sacct, through submitit) and prints every change; the job id,
its state and submitit's stdout/stderr paths are written to ``<run>/slurm/jobs.json`` as they change and end up
in the manifest's step record. A job that fails, is cancelled, times out or runs out of memory fails the run
with the tail of its logs. Ctrl-C while waiting cancels the job.

The run folder must be on a file system the compute nodes share with the submitting machine (as usual on
Slurm clusters): the job reads ``<run>/resolved_config.json`` and writes its outputs there.

Options (launcher.*): partition, account, qos, time_min, cpus_per_task (per node), gpus_per_node, mem_gb (per
node), nnodes, nproc_per_node, additional_parameters ({sbatch option: value}), setup (shell lines run first),
cluster (submitit cluster; null = slurm, "local" runs the same code without Slurm), job_name, poll_s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from finetune.compat.submitit import submission_text
from finetune.config.derived import node_argv, process_layout
from finetune.config.resolvers import REPO_ROOT
from finetune.errors import ConfigError
from finetune.launchers.process import STEP_ENV, StepResult, tail_of, thread_count

CLUSTERS = (None, "slurm", "local", "debug")
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
# states of a job on its way to a rerun (a preemption with PreemptMode=REQUEUE, `scontrol requeue`): not the end
REQUEUE_STATES = ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "RESIZING")
# sbatch options we set from dedicated keys: refuse them in additional_parameters to keep one source of truth
OWN_SBATCH = (
    "partition",
    "account",
    "qos",
    "time",
    "nodes",
    "ntasks_per_node",
    "cpus_per_task",
    "gpus_per_node",
    "mem",
    "job_name",
    "output",
    "error",
)


def check(cfg) -> None:
    lc = cfg.launcher
    if lc.cluster not in CLUSTERS:
        raise ConfigError("launcher.cluster", lc.cluster, "one of null (slurm), slurm, local, debug")
    if int(lc.max_requeues) < 0 or int(lc.signal_delay_s) < 0:
        raise ConfigError(
            "launcher.max_requeues" if int(lc.max_requeues) < 0 else "launcher.signal_delay_s",
            min(int(lc.max_requeues), int(lc.signal_delay_s)),
            "must be >= 0",
        )
    for key in ("time_min", "cpus_per_task", "mem_gb", "poll_s"):
        if float(lc[key]) <= 0:
            raise ConfigError(f"launcher.{key}", lc[key], "must be > 0")
    if int(lc.gpus_per_node) < 0:
        raise ConfigError("launcher.gpus_per_node", lc.gpus_per_node, "must be >= 0")
    if int(lc.node_rank) != 0:
        raise ConfigError("launcher.node_rank", int(lc.node_rank), "Slurm assigns node ranks; leave it 0")
    if cfg.hardware.device == "cuda" and int(lc.gpus_per_node) and int(lc.nproc_per_node) > int(lc.gpus_per_node):
        raise ConfigError(
            "launcher.nproc_per_node",
            int(lc.nproc_per_node),
            f"at most launcher.gpus_per_node={int(lc.gpus_per_node)} ranks per node on GPUs",
        )
    extra = lc.additional_parameters or {}
    if not hasattr(extra, "items"):
        raise ConfigError("launcher.additional_parameters", extra, "must be a mapping {sbatch option: value}")
    for k in extra:
        if str(k).replace("-", "_") in OWN_SBATCH:
            raise ConfigError(
                f"launcher.additional_parameters.{k}",
                extra[k],
                f"set it with its own key (launcher.{_own_key(str(k))}), not as an extra sbatch option",
            )
    if isinstance(lc.setup, str) or not all(isinstance(s, str) for s in (lc.setup or [])):
        raise ConfigError("launcher.setup", lc.setup, "must be a list of shell lines")
    if not cfg.dry_run and (lc.cluster or "slurm") == "slurm" and not shutil.which("sbatch"):
        raise ConfigError(
            "launcher",
            "slurm",
            "sbatch is not on PATH (no Slurm client here); "
            "launcher.cluster=local runs the same jobs through submitit without Slurm",
        )


def _own_key(k: str) -> str:
    return {"time": "time_min", "mem": "mem_gb", "nodes": "nnodes", "ntasks_per_node": "nproc_per_node"}.get(
        k.replace("-", "_"), k.replace("-", "_")
    )


def env(step, cfg) -> Dict[str, str]:
    """Environment for the step on the compute node. GPUs: Slurm sets CUDA_VISIBLE_DEVICES from the allocation."""
    lc = cfg.launcher
    nproc = int(lc.nproc_per_node) if step.distributed != "none" else 1
    e = dict(step.env)
    e.setdefault("OMP_NUM_THREADS", str(thread_count(cfg, int(lc.cpus_per_task), nproc)[0]))
    e = {**STEP_ENV, **e}
    e["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), e.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))) if p
    )
    return e


def argv(step, cfg) -> List[str]:
    """What the dry run shows: the command node 0 runs inside the Slurm job."""
    d = {"argv": step.argv, "distributed": step.distributed}
    return node_argv(d, process_layout(cfg), 0, "$(first host of the job)", "$(29500 + job id % 20000)")


class SlurmStepResult(StepResult):
    def reason(self) -> str:
        job = self.extra.get("slurm_job_id")
        state = self.extra.get("slurm_state")
        if self.status == "interrupted":
            return f"step {self.name!r} was interrupted (slurm job {job} cancelled)"
        return f"step {self.name!r}: slurm job {job} ended {state}" + (
            f" (exit code {self.exit_code})" if self.exit_code not in (None, 0) else ""
        )


def _executor(cfg, folder: Path, step_name: str, timeout_s: Optional[float]):
    import submitit

    lc = cfg.launcher
    # max_num_timeout: how many times a job near its time limit requeues itself (USR2, submitit's checkpoint)
    ex = submitit.AutoExecutor(
        folder=str(folder), cluster=lc.cluster or "slurm", slurm_max_num_timeout=int(lc.max_requeues)
    )
    time_min = int(lc.time_min)
    if timeout_s:
        time_min = min(time_min, max(1, int(timeout_s // 60) + 1))
    params = {
        "name": lc.job_name or f"finetune-{cfg.name}-{step_name}",
        "timeout_min": time_min,
        "nodes": int(lc.nnodes),
        "tasks_per_node": 1,
        "cpus_per_task": int(lc.cpus_per_task),
        "mem_gb": float(lc.mem_gb),
    }
    if int(lc.gpus_per_node):
        params["gpus_per_node"] = int(lc.gpus_per_node)
    if ex.cluster == "slurm":
        for key in ("partition", "account", "qos"):
            if lc[key]:
                params[f"slurm_{key}"] = str(lc[key])
        extra = {str(k).replace("-", "_"): v for k, v in (lc.additional_parameters or {}).items()}
        if extra:
            params["slurm_additional_parameters"] = extra
        setup = [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *(lc.setup or [])]
        params["slurm_setup"] = setup
    if ex.cluster == "slurm":
        # preemption: Slurm reruns the job (--requeue); USR2 signal_delay_s before the time limit lets it requeue
        # itself through submitit (max_num_timeout caps those); StepJob resumes from the last complete checkpoint
        params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}), "requeue": True}
        params["slurm_signal_delay_s"] = int(lc.signal_delay_s)
    ex.update_parameters(**params)
    return ex


def plan_files(plan, cfg, run_dir: Path) -> Dict[str, str]:
    """slurm/<step>.sbatch: the batch script submitit will submit for each step (resources: nodes, CPUs, memory,
    GPUs from the hardware group, time, partition...), shown by the dry run and kept in the run folder. The command
    line in it is submitit's own runner of the step (finetune/launchers/slurm_job.py StepJob)."""
    if (cfg.launcher.cluster or "slurm") != "slurm":
        return {}
    out = {}
    for s in plan.steps:
        ex = _executor(cfg, Path(run_dir) / "slurm", s.name, float(cfg.timeout_min) * 60 or None)
        text = submission_text(
            ex, f"{sys.executable} -u -m submitit.core._submit {Path(run_dir) / 'slurm'}  # runs step {s.name}"
        )
        out[f"slurm/{s.name}.sbatch"] = text
    return out


def _state(job) -> str:
    try:
        return str(job.watcher.get_state(job.job_id, mode="force"))
    except Exception as e:  # noqa: BLE001 - sacct hiccups: report and keep polling
        return f"UNKNOWN ({type(e).__name__})"


def _record(path: Path, jobs: dict) -> None:
    from finetune.run_dir import atomic_write_json

    atomic_write_json(path, jobs)


class _Submitted:
    """One step's Slurm job and its record in slurm/jobs.json (rewritten at every state change)."""

    def __init__(self, job, cluster: str, jobs_file: Path):
        self.job, self.cluster, self.jobs_file, self.start = job, cluster, jobs_file, time.monotonic()
        try:
            self.jobs = json.loads(jobs_file.read_text())
        except (OSError, ValueError):
            self.jobs = {}
        self.info = {
            "slurm_job_id": str(job.job_id),
            "slurm_state": "SUBMITTED",
            "slurm_cluster": cluster,
            "slurm_stdout": str(job.paths.stdout),
            "slurm_stderr": str(job.paths.stderr),
            "slurm_submission_file": str(job.paths.submission_file),
            "slurm_restarts": 0,
        }

    def state(self) -> str:
        return _state(self.job) if self.cluster == "slurm" else str(self.job.state)

    def record(self, name: str, **update) -> None:
        self.info.update(update)
        self.jobs[name] = self.info
        _record(self.jobs_file, self.jobs)

    def say(self, state: str) -> None:
        print(f"[slurm] job {self.job.job_id} {state}  ({time.monotonic() - self.start:.0f} s)", flush=True)


def run_step(step, cfg, run_dir: Path, timeout_s=None) -> StepResult:
    """Submit the step as one Slurm job (submitit; finetune/launchers/slurm_job.py runs it on the nodes), follow its
    state until it ends (requeues included; the time limit counts from when it runs), and return its result."""
    from finetune.launchers.slurm_job import StepJob

    run_dir = Path(run_dir)
    spec = {
        "name": step.name,
        "argv": list(step.argv),
        "distributed": step.distributed,
        "env": env(step, cfg),
        "cwd": step.cwd or str(run_dir),
        "log": str(run_dir / step.log),
        "timeout_s": timeout_s,
        "world": process_layout(cfg) if step.distributed != "none" else {"nproc_per_node": 1, "nnodes": 1},
        "max_requeues": int(cfg.launcher.max_requeues),
    }
    ex = _executor(cfg, run_dir / "slurm", step.name, timeout_s)
    sub = _Submitted(ex.submit(StepJob(spec)), ex.cluster, run_dir / "slurm" / "jobs.json")
    sub.record(step.name)
    print(
        f"[slurm] step {step.name}: submitted job {sub.job.job_id} ({ex.cluster}); logs {sub.job.paths.stdout}",
        flush=True,
    )
    try:
        status, last = _follow(sub, step.name, cfg, timeout_s)
    except KeyboardInterrupt:
        sub.job.cancel(check=False)
        sub.record(step.name, slurm_state="CANCELLED (interrupted)")
        return SlurmStepResult(
            step.name,
            [],
            None,
            time.monotonic() - sub.start,
            str(run_dir / step.log),
            "interrupted",
            extra=dict(sub.info),
        )
    error, results = _outcome(sub, status, last)
    final = _final_state(sub)
    if final != last:
        sub.say(final)
    sub.record(step.name, slurm_state=final)
    code = None
    for r in results:
        if isinstance(r, dict) and r.get("exit_code") is not None:
            code = r["exit_code"]
    status = status or ("completed" if error is None else "failed")
    tail = []
    if status != "completed":
        tail = _failure_tail(run_dir / step.log, Path(sub.job.paths.stderr), error)
        sub.info["error"] = (error or "")[-2000:]
    return SlurmStepResult(
        step.name,
        [str(a) for a in node_argv(spec, spec["world"], 0, "<node0>", 0)],
        code if code is not None else (0 if status == "completed" else None),
        time.monotonic() - sub.start,
        str(run_dir / step.log),
        status,
        tail,
        extra={**sub.info, "nodes": [r for r in results if isinstance(r, dict)]},
    )


def _follow(sub: _Submitted, name: str, cfg, timeout_s) -> tuple:
    """Poll the job until it ends. Returns (status, last state seen): status "timeout" when it ran longer than
    timeout_s (it is cancelled; time in the queue does not count), else None."""
    last, running_since = None, None
    while True:
        state = sub.state()
        word = state.split()[0]
        if state != last and not (last is None and state.startswith("UNKNOWN")):  # sacct lags the submission
            sub.say(state)
            if word in REQUEUE_STATES:
                sub.info["slurm_restarts"] += 1
                running_since = None  # the rerun's time limit starts when it runs again
                print(
                    f"[slurm] job {sub.job.job_id} is requeued (restart {sub.info['slurm_restarts']} of at most "
                    f"{int(cfg.launcher.max_requeues)}): it resumes from the last complete checkpoint",
                    flush=True,
                )
            last = state
            sub.record(name, slurm_state=state)
        if sub.job.done() or word in FAILED_STATES + ("COMPLETED",):  # done(): a result, or a final state
            return None, last
        if running_since is None and word not in ("PENDING", "UNKNOWN", "SUBMITTED") + REQUEUE_STATES:
            running_since = time.monotonic()
        if timeout_s and running_since is not None and time.monotonic() - running_since > timeout_s:
            sub.job.cancel(check=False)
            return "timeout", last
        time.sleep(float(cfg.launcher.poll_s))


def _outcome(sub: _Submitted, status, last) -> tuple:
    """(error or None, the nodes' results). A job cancelled, timed out or killed for memory has no result."""
    if status is None and last and last.split()[0] in FAILED_STATES and not last.startswith("FAILED"):
        return f"slurm job {sub.job.job_id} ended {last}", []
    if status is None:
        try:
            return None, sub.job.results()
        except Exception as e:  # noqa: BLE001 - FailedJobError / UncompletedJobError: the job did not succeed
            return f"{type(e).__name__}: {e}", []
    return None, []


def _final_state(sub: _Submitted) -> str:
    """The job's final state; sacct lags the result file by a few seconds, so wait (briefly) for it."""
    final = sub.state()
    if sub.cluster == "slurm":
        deadline = time.monotonic() + 20
        while (
            final.split()[0] in ("RUNNING", "PENDING", "COMPLETING", "UNKNOWN", "SUBMITTED")
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            final = sub.state()
    return final


def _failure_tail(log: Path, stderr: Path, error) -> list:
    """The last lines that say why: the step's log, then the job's stderr, else the error itself."""
    tail = tail_of(log, 15) or []
    err_tail = tail_of(stderr, 10)
    if err_tail:
        tail += [f"--- {stderr}"] + err_tail
    if error and not tail:
        tail = error.splitlines()[-15:]
    return tail


if __name__ == "__main__":
    print(__doc__)
    sys.exit(0)
