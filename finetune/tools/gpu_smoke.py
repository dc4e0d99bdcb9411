"""One-shot GPU smoke matrix: on a machine with one or more GPUs, run a short case per GPU code path and write one JSON
line per case. Offline (only what is installed and the models the project builds itself); every case runs in its
own process group with a timeout, and nothing is left running afterwards.

    bash scripts/gpu_smoke.sh                       # all cases -> outputs/gpu_smoke/<time>/smoke.jsonl
    bash scripts/gpu_smoke.sh --only qlora,fp16     # some cases
    bash scripts/gpu_smoke.sh --dry-run             # print every command (works on a CPU too; tested in CI)

Each line: case, command, exit_code, seconds, precision, tokens_per_s, peak_gpu_mem_mb (nvidia-smi, sampled every
0.5 s while the case runs), loss_first, loss_last, and on failure the log tail. The `estimator` case compares the
auto planner's memory estimate for the `alpacalora_lora_bf16` case with the peak it measured.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from finetune.run_files import METRICS

REPO = Path(__file__).resolve().parents[2]


def cases(n_gpus: int) -> List[tuple]:
    """(case, overrides). Every case runs on all the GPUs (hardware=auto: one process per GPU) with a global batch of
    4 x GPUs per step (micro batch 4), 20 steps."""
    world = max(1, n_gpus)
    short = [
        "max_steps=20",
        "max_samples=320",
        "val_set_size=32",
        f"batch_size={4 * world}",
        "micro_batch_size=4",
        "logging_steps=2",
        "save_steps=0",
        "merge=false",
        "report_to=none",
    ]
    return [
        ("alpacalora_lora_bf16", ["backend=alpacalora", "method=lora", "hardware.precision=bf16", *short]),
        ("alpacalora_zero2", ["backend=alpacalora", "method=lora", "hardware.deepspeed_stage=2", *short]),
        ("alpacalora_zero3_full", ["backend=alpacalora", "method=full", "hardware.deepspeed_stage=3", *short]),
        (
            "alpacalora_zero2_offload",
            [
                "backend=alpacalora",
                "method=lora",
                "hardware.deepspeed_stage=2",
                "hardware.offload_optimizer=true",
                *short,
            ],
        ),
        ("alpacalora_fp16", ["backend=alpacalora", "method=lora", "hardware.precision=fp16", *short]),
        ("alpacalora_qlora", ["backend=alpacalora", "method=qlora", *short]),
        ("llamafactory_lora", ["backend=llamafactory", "method=lora", *short]),
        ("llamafactory_zero2", ["backend=llamafactory", "method=lora", "hardware.deepspeed_stage=2", *short]),
        (
            "flagembedding",
            [
                "backend=flagembedding",
                "max_steps=20",
                f"batch_size={4 * world}",
                "micro_batch_size=4",
                "save_steps=0",
                "backend.query_max_len=64",
                "backend.passage_max_len=64",
                "backend.train_group_size=4",
            ],
        ),
        (
            "collie",
            [
                "backend=collie",
                "method=lora",
                "max_samples=160",
                "val_set_size=16",
                f"batch_size={4 * world}",
                "micro_batch_size=4",
                "num_epochs=1",
                "logging_steps=1",
            ],
        ),
        ("auto_explain", ["backend=auto", "explain=true", "dry_run=true"]),
    ]


_RUNNING: List[subprocess.Popen] = []


def _stop_all() -> None:
    for p in _RUNNING:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class GpuMemory:
    """Peak memory.used over all GPUs (MiB), sampled with nvidia-smi while a case runs."""

    def __init__(self, interval: float = 0.5):
        self.peak, self.interval, self._stop = 0.0, interval, threading.Event()
        self.smi = shutil.which("nvidia-smi")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                out = subprocess.run(
                    [self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak = max([self.peak] + [float(x) for x in out.split() if x.strip()])
            except (OSError, ValueError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        if self.smi:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def command(overrides: List[str], model: Optional[str], run_dir: Path) -> List[str]:
    hw = [] if any(o.startswith("hardware=") for o in overrides) else ["hardware=auto"]
    mdl = [f"model={model}"] if model and not any(o.startswith("backend=flagembedding") for o in overrides) else []
    return [sys.executable, str(REPO / "train.py"), *overrides, *hw, *mdl, f"output_dir={run_dir}"]


def _metrics(run_dir: Path) -> Dict:
    try:
        m = json.loads((run_dir / METRICS).read_text())
    except (OSError, ValueError):
        m = {}
    return {
        "precision": m.get("precision"),
        "tokens_per_s": m.get("tokens_per_s"),
        "loss_first": m.get("first_train_loss"),
        "loss_last": m.get("train_loss"),
    }


def run_case(name: str, argv: List[str], run_dir: Path, timeout: float) -> Dict:
    log = run_dir.parent / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f, GpuMemory() as mem:
        proc = subprocess.Popen(argv, cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _RUNNING.append(proc)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_all()
            code = "timeout"
    row = {
        "case": name,
        "command": " ".join(argv),
        "exit_code": code,
        "seconds": round(time.monotonic() - t0, 1),
        "peak_gpu_mem_mb": mem.peak or None,
        **_metrics(run_dir),
    }
    if code != 0:
        row["log_tail"] = log.read_text(errors="replace").splitlines()[-25:]
    return row


ESTIMATE = [  # the case's micro batch (4) comes with its overrides
    "backend.candidates=[alpacalora]",
    "gradient_checkpointing=false",
    "hardware.deepspeed_stage=null",
    "explain=true",
    "dry_run=true",
]


def estimator_command(model: Optional[str], base: Path, n_gpus: int) -> List[str]:
    """The auto planner on the alpacalora_lora_bf16 case's config, its choices pinned to what that case ran."""
    ref = [o.replace("backend=alpacalora", "backend=auto") for o in dict(cases(n_gpus))["alpacalora_lora_bf16"]]
    return command([*ref, *ESTIMATE], model, base / "estimate")


def estimator_row(reference: Dict, argv: List[str]) -> Dict:
    """The auto planner's memory estimate (one GPU's need) for the reference case's config, against its measured
    peak (nvidia-smi's memory.used: the CUDA context included, so the estimate should come out a little lower)."""
    out = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    need = None
    for line in out.stdout.splitlines():
        parts = line.split()
        if line.strip().startswith("*") and len(parts) > 8:  # the chosen plan's row of explain=true
            try:
                need = float(parts[-5])
            except ValueError:
                pass
    measured = reference.get("peak_gpu_mem_mb")
    return {
        "case": "estimator",
        "command": "backend=auto explain=true on the alpacalora_lora_bf16 config",
        "exit_code": out.returncode,
        "estimate_gib": need,
        "measured_gib": round(measured / 1024, 2) if measured else None,
        "ratio": round(need / (measured / 1024), 2) if need and measured else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_smoke.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print every command and exit")
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--model", default="tiny_llama_30m", help="model option for the causal-LM cases")
    ap.add_argument("--out", help="the JSON-lines file (default: outputs/gpu_smoke/<time>/smoke.jsonl)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    args = ap.parse_args(argv)
    from finetune.auto.hardware import gpus

    n_gpus = len(gpus())
    todo = [c for c in cases(n_gpus) if not args.only or c[0] in args.only.split(",")]
    unknown = set((args.only or "").split(",")) - {c[0] for c in cases(n_gpus)} - {""}
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; one of {', '.join(c[0] for c in cases(n_gpus))}")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out) if args.out else REPO / "outputs" / "gpu_smoke" / stamp / "smoke.jsonl"
    base = out.parent
    if args.dry_run:
        for name, overrides in todo:
            print(f"{name}: {' '.join(command(overrides, args.model, base / name))}")
        print(f"estimator: {' '.join(estimator_command(args.model, base, n_gpus))}")
        return 0
    if not shutil.which("nvidia-smi"):
        print(
            "gpu_smoke: no nvidia-smi here: this script runs on a machine with GPUs (--dry-run prints the commands)",
            file=sys.stderr,
        )
        return 2
    base.mkdir(parents=True, exist_ok=True)
    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    rows, failed = [], 0
    with open(out, "a") as f:
        for name, overrides in todo:
            argv_ = command(overrides, args.model, base / name)
            print(f"[gpu_smoke] {name}: {' '.join(argv_)}", flush=True)
            row = run_case(name, argv_, base / name, args.timeout)
            rows.append(row)
            failed += row["exit_code"] != 0
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(
                f"[gpu_smoke] {name}: exit {row['exit_code']} in {row['seconds']} s, peak GPU memory "
                f"{row['peak_gpu_mem_mb']} MiB, tokens/s {row['tokens_per_s']}",
                flush=True,
            )
        ref = next((r for r in rows if r["case"] == "alpacalora_lora_bf16"), None)
        if ref is not None and ref["exit_code"] == 0:
            row = estimator_row(ref, estimator_command(args.model, base, n_gpus))
            f.write(json.dumps(row) + "\n")
            print(f"[gpu_smoke] estimator: {row}", flush=True)
    print(f"[gpu_smoke] {len(rows)} cases, {failed} failed: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
