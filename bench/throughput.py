"""Throughput benchmark (not a timed test): the same LoRA fine-tune of a ~30M-parameter tiny Llama, run by
(a) a plain hand-written HF Trainer + PEFT script (bench/baseline_hf_sft.py) and (b) our alpacalora backend.

    .venv/bin/python bench/throughput.py [--steps 20] [--batch 8] [--micro 4] [--repeats 3] [--memory]
        [--ours KEY=VALUE ...]

Prints real (unmasked target) tokens/s of each, the ratio, eval loss of each, peak RSS of each, and MFU
against a matmul peak measured in the same run, in the precision each run computes in (best of several GEMM
shapes, torch's thread count). MFU = training FLOPs per token (model_flops_per_token) x tokens/s / that peak.
With --memory it also trains LoRA, full, GaLore and BAdam on one model (a 120M Llama by default, --memory-model 30m
for the bench model) and prints the peak RSS of each and its training share (peak minus the libraries) vs full.
Run it on an otherwise idle machine: other processes on the cores distort every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(REPO))


def matmul_peak_gflops(dtype: str = "fp32", repeat: int = 3) -> float:
    """Best of several GEMMs (square and the training's skinny shapes), with torch's default thread count, in the
    precision the run computes in: the peak MFU is measured against."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 512, 1376), (512, 512, 4096)):
        a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        for _ in range(3):
            a @ b
        reps = max(4, int(4e10 / (2 * m * k * n)))
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def non_embedding_params(model_dir: Path) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def model_flops_per_token(model_dir: Path, trainable_matmul: int) -> float:
    """Training FLOPs per token: forward 2 x (matmul weights incl. lm_head), backward 2 x the same for activation
    gradients plus 2 x the trainable matmul weights for weight gradients. Attention scores are left out (under 3%
    at these lengths), so the MFU is if anything understated."""
    c = json.loads((model_dir / "config.json").read_text())
    n = non_embedding_params(model_dir) + c["hidden_size"] * c["vocab_size"]
    return 4 * n + 2 * trainable_matmul


def trainable_matmul_params(model_dir: Path, r: int = 8) -> int:
    """LoRA r on q_proj and v_proj of every layer, plus lm_head (modules_to_save): the weights with matmul gradients."""
    c = json.loads((model_dir / "config.json").read_text())
    h, L = c["hidden_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return L * (r * (h + h) + r * (h + kv)) + h * c["vocab_size"]


def run_ours(model: Path, data: str, out: Path, a, method: str = "lora", extra=(), steps=None) -> dict:
    argv = [
        PY,
        str(REPO / "train.py"),
        "model=tiny_llama_30m",
        f"model.path={model}",
        f"method={method}",
        f"data.path={data}",
        f"output_dir={out}",
        f"max_steps={steps or a.steps}",
        f"batch_size={a.batch}",
        f"micro_batch_size={a.micro}",
        f"cutoff_len={a.cutoff}",
        f"val_set_size={a.val}",
        f"max_samples={a.samples}",
        "learning_rate=5e-4",
        "eval_steps=100000",
        "merge=false",
        "report_to=none",
        "logging_steps=1",
        *extra,
    ]
    p = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"our run failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    s = json.loads((out / "train_summary.json").read_text())
    # the baseline counts supervised (target) tokens: compare like with like; tokens_per_s (all input tokens) is
    # what our runs report to users
    return {**s, "input_tokens_per_s": s["tokens_per_s"], "tokens_per_s": s["target_tokens_per_s"]}


def run_baseline(model: Path, data: str, out: Path, a) -> dict:
    argv = [
        PY,
        str(REPO / "bench" / "baseline_hf_sft.py"),
        "--model",
        str(model),
        "--data",
        data,
        "--out",
        str(out),
        "--max-steps",
        str(a.steps),
        "--batch",
        str(a.batch),
        "--micro",
        str(a.micro),
        "--cutoff",
        str(a.cutoff),
        "--val",
        str(a.val),
        "--max-samples",
        str(a.samples),
    ]
    p = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"baseline failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; the median is shown")
    ap.add_argument("--memory", action="store_true", help="also full / GaLore / BAdam peak RSS")
    ap.add_argument(
        "--memory-model",
        choices=("30m", "120m"),
        default="120m",
        help="model for --memory: 120m (default; the libraries' ~1 GB weighs less) or the 30M bench model",
    )
    ap.add_argument("--memory-steps", type=int, default=3, help="steps per --memory run (the peak comes at step 1)")
    ap.add_argument(
        "--ours",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for our run, e.g. hardware.precision=fp32 backend.attn_implementation=sdpa",
    )
    a = ap.parse_args()

    from finetune.tools.tiny_models import build

    model = build("tiny_llama_30m", str(REPO / "models" / "tiny-llama-30m"))
    data = str(REPO / "data" / "samples" / "tiny_alpaca.json")
    n = non_embedding_params(model)
    flops_tok = model_flops_per_token(model, trainable_matmul_params(model))
    print(
        f"model {model} ({n / 1e6:.1f}M non-embedding parameters, {flops_tok / 1e6:.0f} MFLOP per trained token); "
        f"{os.cpu_count()} cores; {a.steps} steps x batch {a.batch} (micro {a.micro})",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    bases, ourss = [], []
    for i in range(a.repeats):  # interleaved, so that a slow spell of the machine hits both sides
        bases.append(run_baseline(model, data, tmp / f"baseline{i}", a))
        ourss.append(run_ours(model, data, tmp / f"ours{i}", a, extra=a.ours))
        print(
            f"repeat {i + 1}: baseline {bases[-1]['tokens_per_s']:.1f} tokens/s, ours {ourss[-1]['tokens_per_s']:.1f}",
            flush=True,
        )
    base = sorted(bases, key=lambda r: r["tokens_per_s"])[len(bases) // 2]  # the median run of each side
    ours = sorted(ourss, key=lambda r: r["tokens_per_s"])[len(ourss) // 2]
    base["precision"] = "fp32"
    peaks = {p: matmul_peak_gflops(p) for p in sorted({"fp32", ours.get("precision") or "fp32"})}
    print("matmul peak measured now: " + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in peaks.items()))
    rows = [("baseline (hand-written HF+PEFT)", base), ("ours (alpacalora backend)", ours)]
    print(f"{'':34s} {'precision':>9s} {'tokens/s':>10s} {'eval_loss':>10s} {'peak RSS MB':>12s} {'MFU %':>7s}")
    for name, r in rows:
        prec = r.get("precision") or "fp32"
        mfu = 100 * flops_tok * r["tokens_per_s"] / (peaks[prec] * 1e9)
        print(
            f"{name:34s} {prec:>9s} {r['tokens_per_s']:10.1f} {r['eval_loss']:10.4f} "
            f"{r['peak_rss_mb']:12.0f} {mfu:7.1f}"
        )
    print(
        f"ratio ours/baseline tokens/s: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x; "
        f"eval loss ours - baseline: {ours['eval_loss'] - base['eval_loss']:+.4f}",
        flush=True,
    )
    if a.memory:
        big = (
            build("small_llama_120m", str(REPO / "models" / "small-llama-120m")) if a.memory_model == "120m" else model
        )
        print(
            f"peak RSS by method on {big.name} ({a.memory_steps} steps, same batch and precision rules). 'training' = "
            "peak minus the RSS right after the libraries were imported (model, data, gradients, optimizer "
            "state, activations):",
            flush=True,
        )
        mem = {}
        runs = (
            ("lora", "lora", ()),
            ("full", "full", ()),
            ("galore", "galore", ("method.galore_rank=64",)),
            (
                "galore_layerwise",
                "galore",
                ("method.galore_rank=64", "method.galore_layerwise=true", f"batch_size={a.micro}"),
            ),  # no accumulation in layer-wise mode
            ("badam", "badam", ()),
        )
        for key, method, extra in runs:
            mem[key] = run_ours(
                big, data, tmp / f"mem-{key}", a, method=method, extra=[*extra, *a.ours], steps=a.memory_steps
            )
        full = mem["full"]
        print(f"  {'method':16s} {'peak RSS MB':>12s} {'vs full':>8s} {'training MB':>12s} {'vs full':>8s}")
        for k, r in mem.items():
            print(
                f"  {k:16s} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / full['peak_rss_mb']:7.2f}x "
                f"{r['training_rss_mb']:12.0f} {r['training_rss_mb'] / full['training_rss_mb']:7.2f}x"
            )
    print(f"(work folder: {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
