"""The llamafactory backend's train step: run `llamafactory-cli train <yaml>` as a child process (forked from the
preloaded process when this step was: LLaMA-Factory imported once per run), then turn what LLaMA-Factory wrote into
this project's per-run files. Standard library only (LLaMA-Factory runs in the child).

    python -m finetune.recipes.llamafactory --run-dir R --output-dir R/checkpoints --artefact A -- \
        python -m finetune.recipes.llamafactory_cli train R/llamafactory/train.yaml

- exits with the CLI's exit code (a failed training fails the step; nothing is swallowed), 75 when it paused on
  request (a complete checkpoint in R/checkpoints);
- the result (adapter or model, trainer_state.json, all_results.json, ...) moves from LLaMA-Factory's output_dir
  (R/checkpoints, where the checkpoints stay) to the artefact folder A (target_path, default R/lazyllm_lora);
- <run>/history.jsonl: one row per log event from A/trainer_state.json `log_history` (loss, eval_loss,
  learning_rate, grad_norm, epoch, dpo rewards/accuracies, ...) plus tokens_per_s from A/trainer_log.jsonl
  (`throughput`, non-padding input tokens per second);
- <run>/llamafactory/worker.json: wall time, peak RSS of the training process tree, token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune.osutil import atomic_write
from finetune.recipes.common import PAUSED_EXIT
from finetune.run_files import HISTORY, RESOLVED_CONFIG

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


# what `python -m llamafactory.cli train|export` imports: the preloaded process imports it once per run
PRELOAD = ["llamafactory.train.tuner"]


def start_cli(cmd, env):
    """LLaMA-Factory's CLI as a child process: forked from the preloaded process this step came from (it imports
    LLaMA-Factory once, about 10 s here, instead of a fresh interpreter doing it), else a fresh process. Its output
    is this step's."""
    from finetune.launchers.zygote import Unavailable, Zygote

    z = Zygote.connect(os.environ.get("FINETUNE_ZYGOTE"))
    if z is not None and cmd[:2] == [sys.executable, "-m"]:
        try:
            return z.spawn(cmd, env, os.getcwd(), preload=PRELOAD, stdout_fd=1)
        except Unavailable as e:
            print(f"[llamafactory] starting the CLI as a fresh process: {e}", flush=True)
    return subprocess.Popen(cmd, env=env)


def move_result(ckpts: Path, out: Path) -> None:
    """LLaMA-Factory writes its checkpoints and its result into one output_dir; checkpoints stay in
    <run>/checkpoints (where every backend's are), the result (adapter or model, tokenizer, trainer_state.json,
    all_results.json, trainer_log.jsonl, plots, pissa_converted/) moves to the artefact folder."""
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(ckpts.iterdir()):
        if entry.name.startswith("checkpoint-"):
            continue
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a resumed run replacing what it wrote itself
        elif target.exists():
            target.unlink()
        os.replace(entry, target)


def write_data(run_dir: Path, folder: str) -> None:
    """The sampled rows of the run's datasets (a mixture, num_samples), drawn exactly as validation counted them
    (finetune/sources.py), for LLaMA-Factory to read."""
    from finetune.recipes.common import read_config
    from finetune.sources import describe, write_sampled

    cfg = read_config(str(run_dir / RESOLVED_CONFIG))
    files = write_sampled(cfg, Path(folder))
    counts = {n: sum(1 for _ in open(f, encoding="utf-8")) for n, f in files.items()}
    print(f"[llamafactory] data: {describe(counts)} written to {folder} (seed {cfg['seed']})", flush=True)


def interleaved(spec: dict) -> dict:
    """Rows per dataset that LLaMA-Factory's interleaving draws (data.mix_strategy interleave_*): datasets'
    interleave_datasets run on stand-in datasets of the same sizes, with the same probabilities, seed and stopping
    strategy as LLaMA-Factory's merge_dataset (it interleaves before tokenising, so only the sizes matter)."""
    from collections import Counter

    from datasets import Dataset, interleave_datasets

    names = list(spec["sizes"])
    parts = [Dataset.from_dict({"source": [i] * int(spec["sizes"][n])}) for i, n in enumerate(names)]
    stop = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}[spec["strategy"]]
    mixed = interleave_datasets(parts, probabilities=spec["probabilities"], seed=spec["seed"], stopping_strategy=stop)
    counts = Counter(mixed["source"])
    return {n: int(counts.get(i, 0)) for i, n in enumerate(names)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--output-dir", required=True, help="LLaMA-Factory's output_dir: <run>/checkpoints")
    ap.add_argument("--artefact", required=True, help="where the trained adapter (or model) goes: target_path")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the config's hardware.device")
    ap.add_argument("--write-data", help="write the sampled rows of the run's datasets here first (data.mix)")
    ap.add_argument("--interleave", help="JSON: count the rows LLaMA-Factory's interleaving draws per dataset")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    run_dir, ckpts, out = Path(args.run_dir), Path(args.output_dir), Path(args.artefact)
    if args.device == "cuda":  # GPU hardware where the job sees no GPU: fail, never train on the CPU silently
        from finetune.recipes.common import require_device

        require_device({"device": "cuda"})

    if args.write_data:
        write_data(run_dir, args.write_data)
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
    proc = start_cli(cmd + secret_args, env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    code = proc.wait()
    wall = time.monotonic() - start
    child_rss_kb = getattr(proc, "maxrss_kb", 0) or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if code == PAUSED_EXIT:
        print(f"[llamafactory] paused: the last checkpoint in {ckpts} is complete", flush=True)
        return code
    if code != 0:
        print(f"[llamafactory] {' '.join(cmd[:2])} exited with code {code}", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    move_result(ckpts, out)
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
        "peak_rss_mb": round(child_rss_kb / 1024, 1),
        "total_tokens": tokens or None,
        "tokens_per_s": round(tokens / runtime, 2) if tokens and runtime else None,
        "global_step": state.get("global_step"),
    }
    if args.interleave:
        info["composition"] = interleaved(json.loads(args.interleave))
    atomic_write(run_dir / "llamafactory" / "worker.json", json.dumps(info, indent=2) + "\n")
    atomic_write(run_dir / HISTORY, "".join(json.dumps(r) + "\n" for r in rows))
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
