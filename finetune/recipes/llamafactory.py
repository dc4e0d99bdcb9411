"""The llamafactory backend's train step: run `llamafactory-cli train <yaml>` as a child process, then turn what
LLaMA-Factory wrote into this project's per-run files. Standard library only (LLaMA-Factory runs in the child).

    python -m finetune.recipes.llamafactory --run-dir R --output-dir O -- \
        llamafactory-cli train R/llamafactory/train.yaml

- exits with the CLI's exit code (a failed training fails the step; nothing is swallowed);
- <run>/history.jsonl: one row per log event from O/trainer_state.json `log_history` (loss, eval_loss,
  learning_rate, grad_norm, epoch, dpo rewards/accuracies, ...) plus tokens_per_s from O/trainer_log.jsonl
  (`throughput`, non-padding input tokens per second);
- <run>/llamafactory/worker.json: wall time, peak RSS of the training process tree, token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune.osutil import atomic_write

SKIP = {
    "step",
    "total_flos",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
    "train_tokens_per_second",
}


def _load_jsonl(path: Path):
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def history_rows(out: Path):
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    throughput = {
        r.get("current_steps"): r["throughput"]
        for r in _load_jsonl(out / "trainer_log.jsonl")
        if r.get("throughput") is not None
    }
    rows = []
    for entry in state.get("log_history", []):
        if "train_loss" in entry:  # the end-of-training summary, not a log event
            continue
        row = {"step": int(entry.get("step", 0))}
        for k, v in entry.items():
            if k in SKIP or not isinstance(v, (int, float)):
                continue
            row["learning_rate" if k == "lr" else k] = v
        if "loss" in row and entry.get("train_tokens_per_second") is not None:
            row["tokens_per_s"] = entry["train_tokens_per_second"]  # non-padding input tokens / s
        elif "loss" in row and row["step"] in throughput:
            row["tokens_per_s"] = throughput[row["step"]]
        rows.append(row)
    return rows, state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the config's hardware.device")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    run_dir, out = Path(args.run_dir), Path(args.output_dir)
    if args.device == "cuda":  # GPU hardware where the job sees no GPU: fail, never train on the CPU silently
        from finetune.recipes.common import require_device

        require_device({"device": "cuda"})

    # LLaMA-Factory relaunches itself with `torchrun` looked up on PATH (several processes, FORCE_TORCHRUN): that
    # must be this environment's torchrun even when the venv is not activated (`.venv/bin/python train.py`)
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    # secrets in backend.extra (hf_hub_token, ...) are not in train.yaml (it shows <redacted>): they reach
    # llamafactory-cli as key=value arguments, which override the yaml (finetune/secrets.py)
    secret_args = [
        f"{k[len('backend.extra.') :]}={v}"
        for k, v in json.loads(env.get("FINETUNE_SECRETS") or "{}").items()
        if k.startswith("backend.extra.")
    ]
    if env.get("FINETUNE_RESUME") == "1":  # a Slurm job rerun after preemption: LLaMA-Factory continues from its
        secret_args.append("overwrite_output_dir=false")  # last checkpoint in the output folder
    start = time.monotonic()
    proc = subprocess.Popen(cmd + secret_args, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    code = proc.wait()
    wall = time.monotonic() - start
    if code != 0:
        print(f"[llamafactory] {' '.join(cmd[:2])} exited with code {code}", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    if not (out / "trainer_state.json").exists():
        print(f"[llamafactory] training finished but {out}/trainer_state.json is missing", file=sys.stderr)
        return 1
    rows, state = history_rows(out)
    tokens = max((e.get("num_input_tokens_seen") or 0 for e in state.get("log_history", [])), default=0)
    results = {}
    if (out / "all_results.json").exists():
        results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    runtime = results.get("train_runtime")
    info = {
        "exit_code": code,
        "wall_s": round(wall, 3),
        "argv": cmd,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "total_tokens": tokens or None,
        "tokens_per_s": round(tokens / runtime, 2) if tokens and runtime else None,
        "global_step": state.get("global_step"),
    }
    atomic_write(run_dir / "llamafactory" / "worker.json", json.dumps(info, indent=2) + "\n")
    atomic_write(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        print(
            f"[llamafactory] {len(losses)} logged losses: first {losses[0]:.4f}, last {losses[-1]:.4f}; "
            f"peak RSS {info['peak_rss_mb']} MB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
