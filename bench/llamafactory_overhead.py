"""Overhead of our entry point over LLaMA-Factory itself, on the same YAML.

    .venv/bin/python bench/llamafactory_overhead.py [--repeats 2] [--max-steps 16] [extra train.py overrides ...]

1. `python train.py experiment=llamafactory_lora_sft merge=false ...` once to write the LLaMA-Factory yaml
   (<run>/llamafactory/train.yaml + dataset_info.json) -- this first run also warms the file cache (not timed);
2. then, `--repeats` times, alternating: `llamafactory-cli train <that yaml> output_dir=<fresh>` directly, and
   the same experiment through `python train.py` (compose, validate, run folder, the train step, metrics.json,
   loss.png, TensorBoard);
3. prints each wall time, the medians and the ratio ours / direct (target <= 1.05).
Both sides train the same model with the same yaml; only the output folder differs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(REPO))


def ours(outputs: Path, overrides) -> tuple:
    run = outputs / f"run-{time.time_ns()}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PY, str(REPO / "train.py"), *overrides, f"output_dir={run}"],
        cwd=str(REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, run


def direct(yaml: Path, out_dir: Path, env: dict) -> float:
    cli = Path(PY).parent / "llamafactory-cli"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PY, str(cli), "train", str(yaml), f"output_dir={out_dir}"],
        env=env,
        cwd=str(out_dir.parent),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"llamafactory-cli failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = ap.parse_args()
    overrides = ["experiment=llamafactory_lora_sft", "merge=false", f"max_steps={args.max_steps}", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="lf_overhead_") as tmp:
        tmp = Path(tmp)
        warm, run = ours(tmp / "warmup", overrides)
        yaml = run / "llamafactory" / "train.yaml"
        print(f"yaml: {yaml} (warm-up run through train.py: {warm:.2f} s)")
        # the same environment the train step gets (CPU pinning, offline hub, the launcher's thread count: one for
        # the tiny model), minus our PYTHONPATH additions
        from omegaconf import OmegaConf

        from finetune.launchers.process import omp_threads

        cfg = OmegaConf.create(json.loads((run / "resolved_config.json").read_text()))
        env = dict(
            os.environ,
            CUDA_VISIBLE_DEVICES="",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(omp_threads(cfg, len(os.sched_getaffinity(0)), 1)),
        )
        print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} on both sides")
        d_times, o_times = [], []
        for i in range(args.repeats):
            out = tmp / f"direct{i}" / "out"
            out.parent.mkdir(parents=True)
            d_times.append(direct(yaml, out, env))
            o_times.append(ours(tmp / f"ours{i}", overrides)[0])
            print(f"repeat {i + 1}: llamafactory-cli {d_times[-1]:.2f} s   train.py {o_times[-1]:.2f} s")
        d, o = statistics.median(d_times), statistics.median(o_times)
        print(f"median wall time: llamafactory-cli {d:.2f} s, train.py {o:.2f} s, overhead {o - d:+.2f} s")
        print(f"ratio train.py / llamafactory-cli = {o / d:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
