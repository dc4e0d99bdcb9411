"""Kubernetes launcher: a manifest per step, generated from the same config (design and limits: docs/k8s.md).

- One node (launcher.nnodes=1): a ``batch/v1`` Job. Its container runs the step's argv (under torchrun with
  ``--standalone`` when nproc_per_node > 1).
- Several nodes: a Kubeflow ``kubeflow.org/v1`` PyTorchJob (training-operator), 1 Master + nnodes-1 Workers.
  The operator sets MASTER_ADDR, MASTER_PORT and RANK (= node rank) in every pod; the container's torchrun
  takes them through Kubernetes' ``$(VAR)`` expansion, so node N of the rendezvous is replica N.

Resources come from launcher.cpus_per_task, mem_gb and gpus_per_node (``nvidia.com/gpu``), the time limit from
time_min (activeDeadlineSeconds), the image from launcher.image. The run folder, models and data must be
visible at the same paths inside the pod: mount a shared PersistentVolumeClaim (launcher.pvc) at
launcher.mount_path and keep output_dir, model.path and data.path under it.

``python train.py launcher=k8s dry_run=true`` prints the manifests (files ``k8s/<step>.yaml`` of the plan).
``launcher.apply=true`` writes them into the run folder and submits them with ``kubectl apply``, waits for the
Job to finish and copies the pod logs into ``logs/<step>.log``. Standard library + PyYAML (omegaconf's own
dependency) only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

from finetune.config.derived import process_layout, ranks, torchrun_head
from finetune.errors import ConfigError
from finetune.launchers.process import STEP_ENV, StepResult, run_process, tail_of, thread_count

PYTORCHJOB_API = "kubeflow.org/v1"


def check(cfg) -> None:
    lc = cfg.launcher
    if not str(lc.image).strip():
        raise ConfigError("launcher.image", lc.image, "needs a container image holding this repository and its venv")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(lc.namespace)):
        raise ConfigError("launcher.namespace", lc.namespace, "must be a DNS-1123 label (lower case, digits, '-')")
    for key in ("cpus_per_task", "mem_gb", "time_min"):
        if float(lc[key]) <= 0:
            raise ConfigError(f"launcher.{key}", lc[key], "must be > 0")
    if int(lc.node_rank) != 0:
        raise ConfigError(
            "launcher.node_rank", int(lc.node_rank), "the PyTorchJob operator assigns node ranks; leave it 0"
        )
    if not cfg.dry_run and not lc.apply:
        raise ConfigError(
            "launcher.apply",
            False,
            "launcher=k8s only writes manifests in a dry run (dry_run=true); "
            "set launcher.apply=true to submit them with kubectl",
        )
    if lc.apply and not cfg.dry_run:
        if not shutil.which("kubectl"):
            raise ConfigError("launcher.apply", True, "kubectl is not on PATH")
        if not lc.pvc:
            raise ConfigError(
                "launcher.pvc", None, "a submitted run needs a shared volume claim holding the run folder"
            )
        if not cfg.output_dir or not str(cfg.output_dir).startswith(str(lc.mount_path).rstrip("/") + "/"):
            raise ConfigError(
                "output_dir",
                cfg.output_dir,
                f"must be under launcher.mount_path={lc.mount_path} "
                "(the pods see the run folder through the volume claim)",
            )


def job_name(run_dir: Path, step_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", f"ft-{Path(run_dir).name}-{step_name}".lower()).strip("-")
    return base[:63].rstrip("-")


def _world(cfg, step) -> Dict[str, int]:
    if step.distributed == "none":
        return {"nproc_per_node": 1, "nnodes": 1}
    return process_layout(cfg)


def argv(step, cfg) -> List[str]:
    """The container command. Multi-node torchrun reads its node rank and master from the operator's env."""
    w = _world(cfg, step)
    if step.distributed != "torchrun" or ranks(w) == 1:
        return list(step.argv)
    args = torchrun_head(w)
    if w["nnodes"] == 1:
        args.append("--standalone")
    else:
        args += ["--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"]
    return [step.argv[0], *args, *step.argv[1:]]


def env(step, cfg) -> Dict[str, str]:
    lc = cfg.launcher
    nproc = _world(cfg, step)["nproc_per_node"]
    e = {
        "OMP_NUM_THREADS": str(thread_count(cfg, int(lc.cpus_per_task), nproc, environment=False)[0]),
        **STEP_ENV,
        **{k: str(v) for k, v in step.env.items()},
    }
    return e


def _container(step, cfg, run_dir: Path) -> dict:
    lc = cfg.launcher
    res = {"cpu": str(int(lc.cpus_per_task)), "memory": f"{int(round(float(lc.mem_gb) * 1024))}Mi"}
    limits = dict(res)
    if int(lc.gpus_per_node):
        limits["nvidia.com/gpu"] = str(int(lc.gpus_per_node))
    c = {
        "name": "pytorch",
        "image": str(lc.image),
        "imagePullPolicy": "IfNotPresent",
        "command": argv(step, cfg),
        "workingDir": step.cwd or str(run_dir),
        "env": [{"name": k, "value": v} for k, v in sorted(env(step, cfg).items())],
        "resources": {"requests": res, "limits": limits},
    }
    if lc.pvc:
        c["volumeMounts"] = [
            {"name": "work", "mountPath": str(lc.mount_path)},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]
    return c


def _pod_spec(step, cfg, run_dir: Path) -> dict:
    lc = cfg.launcher
    spec = {"restartPolicy": "Never", "containers": [_container(step, cfg, run_dir)]}
    if lc.pvc:
        spec["volumes"] = [
            {"name": "work", "persistentVolumeClaim": {"claimName": str(lc.pvc)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ]
    if lc.service_account:
        spec["serviceAccountName"] = str(lc.service_account)
    return spec


def manifest(step, cfg, run_dir: Path) -> dict:
    """The Kubernetes object for one step: a batch/v1 Job, or a PyTorchJob for a multi-node distributed step."""
    lc = cfg.launcher
    name = job_name(run_dir, step.name)
    labels = {
        "app.kubernetes.io/name": "finetune",
        "finetune/run": job_name(run_dir, "")[:63].rstrip("-"),
        "finetune/step": re.sub(r"[^a-z0-9-]+", "-", step.name.lower())[:63],
    }
    meta = {"name": name, "namespace": str(lc.namespace), "labels": labels}
    deadline = int(float(lc.time_min) * 60)
    w = _world(cfg, step)
    template = {"metadata": {"labels": labels}, "spec": _pod_spec(step, cfg, run_dir)}
    if w["nnodes"] == 1:
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta,
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": deadline,
                "ttlSecondsAfterFinished": 86400,
                "template": template,
            },
        }
    replica = lambda n: {"replicas": n, "restartPolicy": "Never", "template": template}  # noqa: E731
    return {
        "apiVersion": PYTORCHJOB_API,
        "kind": "PyTorchJob",
        "metadata": meta,
        "spec": {
            "runPolicy": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": deadline,
                "cleanPodPolicy": "None",
                "ttlSecondsAfterFinished": 86400,
            },
            "nprocPerNode": str(w["nproc_per_node"]),
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(w["nnodes"] - 1)},
        },
    }


def plan_files(plan, cfg, run_dir: Path) -> Dict[str, str]:
    """k8s/<step>.yaml for every step: written into the run folder, shown by the dry run."""
    import yaml

    class NoAliases(yaml.SafeDumper):  # kubectl reads anchors, but people read these files too
        def ignore_aliases(self, data):
            return True

    return {
        f"k8s/{s.name}.yaml": yaml.dump(manifest(s, cfg, Path(run_dir)), Dumper=NoAliases, sort_keys=False, width=1000)
        for s in plan.steps
    }


def _kubectl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout)


def run_step(step, cfg, run_dir: Path, timeout_s=None) -> StepResult:
    """kubectl apply the step's manifest, wait for the Job to finish, copy its logs. (Needs a cluster.)"""
    run_dir = Path(run_dir)
    path = run_dir / "k8s" / f"{step.name}.yaml"
    ns, name = str(cfg.launcher.namespace), job_name(run_dir, step.name)
    log = run_dir / step.log
    applied = run_process(step.name, ["kubectl", "apply", "-f", str(path)], {}, str(run_dir), log, 120)
    if not applied.ok:
        return applied
    kind = "pytorchjob" if int(cfg.launcher.nnodes) > 1 and step.distributed != "none" else "job"
    start, status, last = time.monotonic(), None, None
    while status is None:
        p = _kubectl("get", kind, name, "-n", ns, "-o", "json")
        conds = []
        if p.returncode == 0:
            conds = [
                c for c in json.loads(p.stdout).get("status", {}).get("conditions", []) if c.get("status") == "True"
            ]
        state = conds[-1]["type"] if conds else "Pending"
        if state != last:
            print(f"[k8s] {kind}/{name} {state}  ({time.monotonic() - start:.0f} s)", flush=True)
            last = state
        if state in ("Complete", "Succeeded"):
            status = "completed"
        elif state in ("Failed",):
            status = "failed"
        elif timeout_s and time.monotonic() - start > timeout_s:
            _kubectl("delete", kind, name, "-n", ns, "--wait=false")
            status = "timeout"
        else:
            time.sleep(float(cfg.launcher.poll_s))
    selector = f"job-name={name}" if kind == "job" else f"training.kubeflow.org/job-name={name}"
    logs = _kubectl("logs", "-n", ns, "-l", selector, "--tail=-1", "--prefix", timeout=120)
    with open(log, "a", encoding="utf-8") as f:
        f.write(logs.stdout)
    return StepResult(
        step.name,
        ["kubectl", "apply", "-f", str(path)],
        0 if status == "completed" else 1,
        time.monotonic() - start,
        str(log),
        status,
        tail_of(log, 15),
        extra={"k8s_kind": kind, "k8s_name": name, "k8s_namespace": ns, "k8s_state": last},
    )
