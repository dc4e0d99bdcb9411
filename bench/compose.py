"""Compose/validation speed: `train.py --cfg job` and a refused config, against a bare @hydra.main app.

    .venv/bin/python bench/compose.py [--repeat 7]

Measured in the same run: a bare Hydra app with one trivial config (the floor any Hydra CLI pays), then our
train.py. Prints median wall times and the ratios (target <= 1.2x). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BARE_APP = """
import hydra

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    return None

if __name__ == "__main__":
    main()
"""


def timed(argv, cwd, repeat, expect):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != expect:
            raise SystemExit(f"{argv}: exit {proc.returncode}, expected {expect}\n{proc.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp)
        (bare / "conf").mkdir()
        (bare / "conf" / "config.yaml").write_text("lr: 0.1\nhydra:\n  output_subdir: null\n  run:\n    dir: .\n")
        (bare / "app.py").write_text(BARE_APP)
        py = sys.executable
        base_cfg = timed([py, "app.py", "--cfg", "job"], bare, args.repeat, 0)
        base_bad = timed([py, "app.py", "nokey=1"], bare, args.repeat, 1)
        ours_cfg = timed([py, "train.py", "--cfg", "job"], REPO, args.repeat, 0)
        ours_bad = timed([py, "train.py", "lora_rr=3"], REPO, args.repeat, 2)
        ours_rule = timed([py, "train.py", "batch_size=10"], REPO, args.repeat, 2)
    print(f"{'case':44s} {'bare app':>9s} {'train.py':>9s} {'ratio':>6s}")
    for name, a, b in (
        ("--cfg job", base_cfg, ours_cfg),
        ("unknown key (compose error)", base_bad, ours_bad),
        ("cross-field rule (batch_size=10)", base_bad, ours_rule),
    ):
        print(f"{name:44s} {a:8.3f}s {b:8.3f}s {b / a:5.2f}x")
    print("target: <= 1.20x")


if __name__ == "__main__":
    main()
