"""Throughput benchmark (not a timed test): the same LoRA fine-tune of a ~30M-parameter tiny Llama, run by
(a) a plain hand-written HF Trainer + PEFT script (bench/baseline_hf_sft.py) and (b) our alpacalora backend.

    .venv/bin/python bench/throughput.py [--steps 10] [--batch 16] [--micro 4] [--memory]

Prints real (unmasked target) tokens/s of each, the ratio, eval loss of each, peak RSS of each, and MFU
against a matmul peak measured in the same run (fp32, 2048x2048, torch's thread count). MFU uses 6 x N x tokens
(N = parameters without the embedding matrices; a LoRA step really costs about 4N, so this is generous).
With --memory it also trains full, GaLore and BAdam on the same model and prints peak RSS of each vs LoRA.
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


def matmul_peak_gflops(n: int = 2048, repeat: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - t) / 1e9


def non_embedding_params(model_dir: Path) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def run_ours(model: Path, data: str, out: Path, a, method: str = "lora", extra=()) -> dict:
    argv = [PY, str(REPO / "train.py"), "model=tiny_llama_30m", f"method={method}", f"data.path={data}",
            f"output_dir={out}", f"max_steps={a.steps}", f"batch_size={a.batch}", f"micro_batch_size={a.micro}",
            f"cutoff_len={a.cutoff}", f"val_set_size={a.val}", f"max_samples={a.samples}", "learning_rate=5e-4",
            "eval_steps=100000", "merge=false", "report_to=none", "logging_steps=1", *extra]
    env = dict(os.environ, FINETUNE_MODELS=str(model.parent), FINETUNE_OUTPUTS=str(out.parent / "outputs"))
    p = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"our run failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads((out / "train_summary.json").read_text())


def run_baseline(model: Path, data: str, out: Path, a) -> dict:
    argv = [PY, str(REPO / "bench" / "baseline_hf_sft.py"), "--model", str(model), "--data", data, "--out", str(out),
            "--max-steps", str(a.steps), "--batch", str(a.batch), "--micro", str(a.micro), "--cutoff", str(a.cutoff),
            "--val", str(a.val), "--max-samples", str(a.samples)]
    p = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"baseline failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--memory", action="store_true", help="also full / GaLore / BAdam peak RSS")
    a = ap.parse_args()

    from finetune.tools.tiny_models import build

    model = build("tiny_llama_30m", str(REPO / "models" / "tiny-llama-30m"))
    data = str(REPO / "data" / "samples" / "tiny_alpaca.json")
    n = non_embedding_params(model)
    peak = matmul_peak_gflops()
    print(f"model {model} ({n / 1e6:.1f}M non-embedding parameters); matmul peak {peak:.1f} GFLOP/s "
          f"({os.cpu_count()} cores); {a.steps} steps x batch {a.batch} (micro {a.micro})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    base = run_baseline(model, data, tmp / "baseline", a)
    ours = run_ours(model, data, tmp / "ours", a)
    rows = [("baseline (hand-written HF+PEFT)", base), ("ours (alpacalora backend)", ours)]
    print(f"{'':34s} {'tokens/s':>10s} {'eval_loss':>10s} {'peak RSS MB':>12s} {'MFU %':>7s}")
    for name, r in rows:
        mfu = 100 * 6 * n * r["tokens_per_s"] / (peak * 1e9)
        print(f"{name:34s} {r['tokens_per_s']:10.1f} {r['eval_loss']:10.4f} {r['peak_rss_mb']:12.0f} {mfu:7.1f}")
    print(f"ratio ours/baseline tokens/s: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x", flush=True)
    if a.memory:
        print("peak RSS by method (same model, steps, batch):")
        mem = {"lora": ours["peak_rss_mb"]}
        for method, extra in (("full", ()), ("galore", ("method.galore_rank=64",)), ("badam", ())):
            r = run_ours(model, data, tmp / method, a, method=method, extra=[*extra, "modules_to_save=null"]
                         if method == "lora" else list(extra))
            mem[method] = r["peak_rss_mb"]
        for k, v in mem.items():
            print(f"  {k:7s} {v:8.0f} MB  ({v / mem['full']:.2f}x full)")
    print(f"(work folder: {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
