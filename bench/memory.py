"""Peak memory by tuning method (not a timed test): LoRA, full, GaLore, layer-wise GaLore and BAdam trained for a few
steps on one model (a 120M Llama by default, --model 30m for the throughput model) by our alpacalora backend.

    .venv/bin/python bench/memory.py [--model 120m|30m] [--steps 3] [--ours KEY=VALUE ...]

Prints each method's peak RSS and its training share (peak minus the RSS right after the libraries were imported:
model, data, gradients, optimizer state, activations), both relative to full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(REPO))
MODELS = {"120m": ("small_llama_120m", "small-llama-120m"), "30m": ("tiny_llama_30m", "tiny-llama-30m")}
RUNS = (
    ("lora", "lora", ()),
    ("full", "full", ()),
    ("galore", "galore", ("method.galore_rank=64",)),
    ("galore_layerwise", "galore", ("method.galore_rank=64", "method.galore_layerwise=true", "batch_size=4")),
    ("badam", "badam", ()),
)


def run(model: Path, out: Path, method: str, extra, steps: int) -> dict:
    argv = [PY, str(REPO / "train.py"), f"model.path={model}", f"method={method}", f"output_dir={out}"]
    argv += [f"max_steps={steps}", "batch_size=4", "micro_batch_size=4", "cutoff_len=256", "val_set_size=16"]
    argv += ["max_samples=64", "eval_steps=100000", "merge=false", "report_to=none", *extra]
    p = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{method} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads((out / "train_summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="120m")
    ap.add_argument("--steps", type=int, default=3, help="steps per run (the peak comes at step 1)")
    ap.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    from finetune.tools.tiny_models import build

    builder, folder = MODELS[a.model]
    model = build(builder, str(REPO / "models" / folder))
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    mem = {key: run(model, tmp / key, method, [*extra, *a.ours], a.steps) for key, method, extra in RUNS}
    full = mem["full"]
    print(f"peak RSS by method on {model.name} ({a.steps} steps):")
    print(f"  {'method':16s} {'peak RSS MB':>12s} {'vs full':>8s} {'training MB':>12s} {'vs full':>8s}")
    for k, r in mem.items():
        print(
            f"  {k:16s} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / full['peak_rss_mb']:7.2f}x "
            f"{r['training_rss_mb']:12.0f} {r['training_rss_mb'] / full['training_rss_mb']:7.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
