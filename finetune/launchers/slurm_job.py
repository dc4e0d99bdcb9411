"""The body of a Slurm job: runs one step of a plan on one node, survives preemption and requeues.

Imported by submitit on the compute node (and by finetune/launchers/slurm.py when it submits); kept apart from
finetune/launchers/slurm.py so that composing a config never imports submitit.

- The step runs as a child process group (finetune/launchers/process.py run_process), node N of its rendezvous.
- SIGTERM (Slurm taking the node back: preemption with PreemptMode=REQUEUE, `scontrol requeue`, a node drain) stops
  the step and leaves the job WITHOUT a result, so Slurm's rerun of the job (it is submitted with --requeue) is the
  only outcome; the driver waits through REQUEUED / PENDING.
- USR2 (sent `launcher.signal_delay_s` seconds before the time limit): submitit calls ``checkpoint``, which stops the
  step and requeues the job with the same arguments (submitit caps these at ``launcher.max_requeues`` timeouts).
- A rerun (SLURM_RESTART_COUNT > 0) runs the step with FINETUNE_RESUME=1: the workers continue from the last
  complete checkpoint of the run folder (alpacalora and FlagEmbedding: FINETUNE_COMPLETE markers; LLaMA-Factory:
  its own, overwrite_output_dir false). Past ``max_requeues`` reruns the job fails instead of looping.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import submitit

from finetune.config.derived import node_argv, ranks
from finetune.launchers.process import kill_group, run_process


def node_addr(node: str) -> str:
    """An address for a Slurm node name: the name itself when it resolves, else its NodeAddr from scontrol
    (clusters whose node names are not host names)."""
    import socket

    try:
        socket.gethostbyname(node)
        return node
    except OSError:
        pass
    out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True, timeout=30).stdout
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return node


class StepJob(submitit.helpers.Checkpointable):
    """One plan step as a Slurm job body (one task per node). ``spec`` is what finetune/launchers/slurm.py submits."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._child: Optional[subprocess.Popen] = None

    def __getstate__(self):  # pickled for the (re)submission: never the running child
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.spec, self._child = state["spec"], None

    def __call__(self) -> dict:
        spec = self.spec
        jenv = submitit.JobEnvironment()
        node, hosts = jenv.node, list(jenv.hostnames) or [jenv.hostname]
        w = spec["world"]
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts > int(spec.get("max_requeues", 0)):
            raise RuntimeError(
                f"the job was requeued {restarts} times; launcher.max_requeues="
                f"{spec.get('max_requeues', 0)} is reached, so it stops here"
            )
        if spec["distributed"] == "none" and node > 0:
            return {"node": node, "skipped": "not distributed: node 0 only"}
        port = 29500 + int(str(jenv.job_id).split("_")[0]) % 20000
        cmd = node_argv(spec, w, node, node_addr(hosts[0]), port)
        env = dict(spec["env"])
        if restarts:
            env["FINETUNE_RESUME"] = "1"  # continue from the last complete checkpoint of the run folder
        if spec["distributed"] == "env":
            env.update(
                {
                    "NNODES": str(w["nnodes"]),
                    "NODE_RANK": str(node),
                    "NPROC_PER_NODE": str(w["nproc_per_node"]),
                    "MASTER_ADDR": node_addr(hosts[0]),
                    "MASTER_PORT": str(port),
                }
            )
            if ranks(w) > 1:
                env["FORCE_TORCHRUN"] = "1"
        log = Path(spec["log"])
        if node > 0:
            log = log.with_name(f"{log.stem}.node{node}{log.suffix}")
        signal.signal(signal.SIGTERM, self._preempted)  # after submitit's own handlers (USR2 stays theirs)
        print(
            f"[slurm job {jenv.job_id}] node {node}/{w['nnodes']} on {jenv.hostname}"
            + (f", run {restarts + 1} (requeued; resuming)" if restarts else "")
            + f": {' '.join(cmd)}",
            flush=True,
        )
        res = run_process(
            spec["name"], cmd, env, spec["cwd"], log, spec["timeout_s"], signals=False, started=self._started
        )
        if not res.ok:
            tail = "\n".join(res.tail[-15:])
            raise RuntimeError(f"{res.reason()} on node {node} ({jenv.hostname}); log {res.log}; last lines:\n{tail}")
        return {"node": node, "host": jenv.hostname, "restarts": restarts, **res.record()}

    def _started(self, proc: subprocess.Popen) -> None:
        self._child = proc

    def _stop_child(self) -> None:
        if self._child is not None and self._child.poll() is None:
            kill_group(self._child)

    def _preempted(self, signum, frame) -> None:
        """SIGTERM: Slurm is taking the node back. Stop the step and leave without a result: the job's --requeue
        rerun continues it."""
        print(
            f"[slurm] SIGTERM on {os.uname().nodename}: stopping the step; the job is requeued and resumes from "
            "its last complete checkpoint",
            flush=True,
        )
        self._stop_child()
        os._exit(143)

    def checkpoint(self, *args, **kwargs):
        """USR2 before the time limit (submitit's handler): stop the step, requeue the same job."""
        self._stop_child()
        return super().checkpoint(*args, **kwargs)
