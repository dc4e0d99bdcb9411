"""torchrun launcher: ``nproc_per_node`` ranks on this machine, or one node of an ``nnodes``-node run.

Single node:   python train.py launcher=torchrun launcher.nproc_per_node=2

Multi-node: every node needs the same run folder (a shared file system, as on any cluster). Node 0 is the
normal driver: it validates, creates the run folder, writes the plan and the resolved config, runs every step
(the distributed ones as node 0 of the rendezvous), collects metrics and writes the manifest. Every other node
*joins* that run folder: it waits for node 0's plan, then runs only the plan's distributed steps as node N,
with its logs in ``logs/<step>.node<N>.log`` and its own record in ``nodes/node<N>.json``. It never composes a
config, never writes the manifest and never collects, so the nodes cannot overwrite each other.

    node 0:  python train.py launcher=torchrun launcher.nnodes=2 launcher.master_addr=HOST0 \\
                 launcher.master_port=29500 output_dir=/shared/run1
    node 1:  python -m finetune.launchers.torchrun join /shared/run1 --node-rank 1

``train.py ... launcher.node_rank=1`` is refused with the join command, since a second driver would create a
second run folder. With ``rdzv_backend=static`` (the default here) node N really is node N, so global rank 0 -
which writes history, adapter and merged model - runs on node 0, where the driver collects them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from finetune.errors import ConfigError, one_of
from finetune.launchers import local
from finetune.launchers.process import StepResult, tail_of
from finetune.run_files import MANIFEST, RESOLVED_CONFIG

RDZV_BACKENDS = ("static", "c10d")


def check(cfg) -> None:
    lc = cfg.launcher
    if lc.rdzv_backend not in RDZV_BACKENDS:
        raise ConfigError("launcher.rdzv_backend", lc.rdzv_backend, one_of(RDZV_BACKENDS))
    if int(lc.node_rank) > 0:
        raise ConfigError(
            "launcher.node_rank",
            int(lc.node_rank),
            "train.py runs node 0 (it creates the run folder); start the other nodes with "
            "`python -m finetune.launchers.torchrun join <run folder> --node-rank N`",
        )
    if int(lc.nnodes) > 1 and not cfg.output_dir:
        raise ConfigError(
            "output_dir",
            None,
            f"a {int(lc.nnodes)}-node run needs output_dir=<shared folder> so the "
            "other nodes can join it (python -m finetune.launchers.torchrun join <output_dir> --node-rank N)",
        )
    if int(lc.nnodes) > 1 and not cfg.resume:
        out = Path(str(cfg.output_dir)).expanduser()
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(
                "output_dir",
                str(out),
                "is not empty: the other nodes would join the old run there; "
                "use a fresh folder (or resume=true to continue that run)",
            )
    if (
        cfg.hardware.device == "cuda"
        and int(cfg.hardware.gpus_per_node) > 0
        and int(lc.nproc_per_node) > int(cfg.hardware.gpus_per_node)
    ):
        raise ConfigError(
            "launcher.nproc_per_node",
            int(lc.nproc_per_node),
            f"at most hardware.gpus_per_node={int(cfg.hardware.gpus_per_node)} ranks per node on GPUs",
        )


def world(cfg) -> Dict[str, int]:
    return local.world(cfg)


def torchrun_args(cfg) -> List[str]:
    w = world(cfg)
    lc = cfg.launcher
    args = ["-m", "torch.distributed.run", f"--nproc_per_node={w['nproc_per_node']}", f"--nnodes={w['nnodes']}"]
    if w["nnodes"] == 1:
        if int(lc.master_port):
            return args + [f"--master_addr={lc.master_addr}", f"--master_port={int(lc.master_port)}"]
        return args + ["--standalone"]  # torchrun picks a free port itself
    if lc.rdzv_backend == "static":
        return args + [
            f"--node_rank={w['node_rank']}",
            f"--master_addr={lc.master_addr}",
            f"--master_port={int(lc.master_port)}",
        ]
    return args + [
        f"--node_rank={w['node_rank']}",
        f"--rdzv_backend={lc.rdzv_backend}",
        f"--rdzv_endpoint={lc.master_addr}:{int(lc.master_port)}",
        f"--rdzv_id={lc.rdzv_id or 'finetune'}",
    ]


def argv(step, cfg) -> List[str]:
    if step.distributed == "torchrun":
        return [step.argv[0], *torchrun_args(cfg), *step.argv[1:]]
    return list(step.argv)


def env(step, cfg) -> Dict[str, str]:
    return local.env(step, cfg)


def run_step(step, cfg, run_dir: Path, timeout_s=None, log: Optional[str] = None) -> StepResult:
    if world(cfg)["node_rank"] != 0 and (step.rank0_only or step.distributed == "none"):
        return local.skipped(step)
    return local.launch(step, argv(step, cfg), env(step, cfg), run_dir, timeout_s, log, cfg=cfg)


# ------------------------------------------------------------------------------------------ joining a run


def _load_plan(run_dir: Path) -> Optional[dict]:
    try:
        m = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m


def join(
    run_dir: Path,
    node_rank: int,
    wait_s: float = 600.0,
    timeout_s: Optional[float] = None,
    master_addr: Optional[str] = None,
) -> int:
    """Run node ``node_rank`` of the multi-node run whose driver (node 0) owns ``run_dir``. Returns an exit code."""
    from omegaconf import OmegaConf, open_dict

    from finetune.plan import Step
    from finetune.run_dir import atomic_write_json

    run_dir = Path(run_dir).absolute()
    deadline = time.monotonic() + wait_s
    manifest = _load_plan(run_dir)
    while not (manifest and manifest.get("plan") and manifest.get("status") in ("running", "failed")):
        if manifest and manifest.get("status") == "completed" and not manifest.get("resumes"):
            print(
                f"[finetune] node {node_rank}: the run in {run_dir} has already completed "
                "(start node 0 with a fresh output_dir)",
                file=sys.stderr,
            )
            return 2
        if time.monotonic() > deadline:
            print(
                f"[finetune] node {node_rank}: no plan in {run_dir}/manifest.json after {wait_s:.0f} s "
                "(is node 0 running with output_dir set to this folder?)",
                file=sys.stderr,
            )
            return 2
        time.sleep(0.5)
        manifest = _load_plan(run_dir)
    if manifest["status"] == "failed":
        print(f"[finetune] node {node_rank}: node 0 already failed: {manifest.get('error')}", file=sys.stderr)
        return 1
    resolved = json.loads((run_dir / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    cfg = OmegaConf.create({k: v for k, v in resolved.items() if not k.startswith("_")})
    nnodes = int(cfg.launcher.nnodes)
    if not 0 < node_rank < nnodes:
        print(
            f"[finetune] launcher.node_rank={node_rank}: must be in [1, {nnodes}) for this {nnodes}-node run "
            "(node 0 is the driver)",
            file=sys.stderr,
        )
        return 2
    with open_dict(cfg):
        cfg.launcher.node_rank = node_rank
        if master_addr:
            cfg.launcher.master_addr = master_addr
    record = {"node_rank": node_rank, "status": "running", "steps": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = run_dir / "nodes" / f"node{node_rank}.json"
    atomic_write_json(out, record)
    status = 0
    for d in manifest["plan"]["steps"]:
        step = Step(**d)
        if step.distributed == "none" or step.rank0_only:
            continue
        log = str(Path(step.log).with_suffix("")) + f".node{node_rank}.log"
        print(f"[finetune] node {node_rank} step {step.name}: {' '.join(argv(step, cfg))}", flush=True)
        result = run_step(step, cfg, run_dir, timeout_s, log=log)
        record["steps"].append(result.record())
        atomic_write_json(out, record)
        if not result.ok:
            record.update(status="failed", error=result.reason(), log_tail=result.tail[-15:])
            atomic_write_json(out, record)
            tail = "\n".join("    " + t for t in (result.tail or tail_of(Path(result.log)))[-15:])
            print(
                f"[finetune] node {node_rank}: {result.reason()} (log: {result.log})\n  last lines:\n{tail}",
                file=sys.stderr,
            )
            status = 1 if result.status != "interrupted" else 130
            break
    else:
        record["status"] = "completed"
        atomic_write_json(out, record)
        print(f"[finetune] node {node_rank}: completed ({len(record['steps'])} step(s)) in {run_dir}", flush=True)
    return status


def main(args: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m finetune.launchers.torchrun",
        description="Join a multi-node run started by node 0 (python train.py ... output_dir=DIR).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("join", help="run node N of the run in RUN_DIR")
    j.add_argument("run_dir")
    j.add_argument("--node-rank", type=int, required=True)
    j.add_argument("--wait-min", type=float, default=10.0, help="how long to wait for node 0's plan")
    j.add_argument(
        "--timeout-min", type=float, default=0.0, help="kill a step running longer (0: the run's timeout_min)"
    )
    j.add_argument("--master-addr", default=None, help="node 0's address as seen from this node (default: the run's)")
    a = ap.parse_args(args)
    timeout = a.timeout_min * 60 or None
    if timeout is None:
        try:
            timeout = float(json.loads((Path(a.run_dir) / RESOLVED_CONFIG).read_text())["timeout_min"]) * 60 or None
        except (OSError, ValueError, KeyError):
            timeout = None
    return join(Path(a.run_dir), a.node_rank, a.wait_min * 60, timeout, a.master_addr)


if __name__ == "__main__":
    sys.exit(main())


def plan_files(plan, cfg, run_dir) -> Dict[str, str]:
    """No files of its own: the steps run as planned."""
    return {}
