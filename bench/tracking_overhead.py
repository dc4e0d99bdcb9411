"""What experiment tracking costs on the default run: the same `python train.py` with each report_to, interleaved.

    .venv/bin/python bench/tracking_overhead.py [--repeats 2] [--targets none tensorboard mlflow ...] [overrides ...]

1. one warm-up run (file cache, tokenised-data cache, the tiny model built once; not timed);
2. then, `--repeats` times, each target in turn (`report_to=none` first: the baseline), every run into a fresh
   output folder: the whole command's wall time and the train step's own duration (manifest.json);
3. prints each time, the medians, and the ratio of each target to `none` (what a user waits for in addition).
MLflow logs to its default local store (outputs/mlflow, as a user's first `report_to=mlflow` does), W&B offline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from llamafactory_overhead import ours

TARGETS = ["none", "tensorboard", "mlflow", "[tensorboard,mlflow]", "[tensorboard,wandb]"]


def run(outputs: Path, overrides, target: str) -> tuple:
    """(wall seconds, train step seconds) of one run with report_to=target."""
    wall, out = ours(outputs, [*overrides, f"report_to={target}"])  # the same timed train.py run as the LF bench
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    return wall, next(s["duration_s"] for s in steps if s["name"] == "train")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--targets", nargs="+", default=TARGETS, help="report_to values; the first is the baseline")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (default: none, the default run)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracking_overhead_") as tmp:
        tmp = Path(tmp)
        warm, _ = run(tmp, args.overrides, args.targets[0])
        print(f"warm-up (report_to={args.targets[0]}): {warm:.2f} s")
        times = {t: [] for t in args.targets}
        for i in range(args.repeats):
            for target in args.targets:
                wall, train = run(tmp, args.overrides, target)
                times[target].append((wall, train))
                print(f"repeat {i + 1}: report_to={target:<22} wall {wall:6.2f} s   train step {train:6.2f} s")
        base_wall = statistics.median(w for w, _ in times[args.targets[0]])
        base_train = statistics.median(t for _, t in times[args.targets[0]])
        print(f"median of {args.repeats}, ratio to report_to={args.targets[0]}:")
        for target, rows in times.items():
            wall, train = statistics.median(w for w, _ in rows), statistics.median(t for _, t in rows)
            print(
                f"  report_to={target:<22} wall {wall:6.2f} s ({wall / base_wall:.3f}x)   "
                f"train step {train:6.2f} s ({train / base_train:.3f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
