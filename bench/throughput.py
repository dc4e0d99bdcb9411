"""Throughput benchmark (not a timed test): the same LoRA fine-tune run by (a) a plain hand-written HF Trainer +
PEFT script (bench/baseline_hf_sft.py) and (b) our alpacalora backend (`python train.py ...`), on the 30M tiny Llama
or on SmolLM2-135M.

    .venv/bin/python bench/throughput.py [--model 30m|smollm2] [--steps 30] [--micro 8] [--repeats 2] [--threads N]

Both sides: the same model, data (data/samples/tiny_alpaca.json), LoRA (r 8, alpha 16, dropout 0.05, every linear
layer of the decoder), micro-batch and batch, cutoff, learning rate, steps, held-out rows, seed, the same batches
(the baseline keeps the held-out split's row order, as our recipe does, and both Trainers' samplers are seeded
alike) and the same OMP_NUM_THREADS (default: the CPUs this process may use). Runs are interleaved (baseline, ours,
baseline, ours, ...); the first pair warms the file cache and is not counted, so each figure is the second (or
later) of back-to-back runs. Reported, median of the counted repeats: whole-process wall time, training-loop time
(from the first step; evaluations and saves left out on both sides), supervised tokens/s, mean training loss, eval
loss, and MFU against the bf16 (and fp32) matmul peak measured in the same run.

Honest or nothing: the load average is printed at the start and the benchmark refuses to start when it is above
--max-load (default 0.5); while it runs, CPU time used by processes other than the benchmark's own is measured
(/proc/stat minus our children's rusage) and the figures are not reported when others used more than
--max-other (default 5%) of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(REPO))

MODELS = {"30m": ("tiny_llama_30m", "tiny-llama-30m"), "smollm2": ("smollm2_135m", "smollm2-135m")}


def matmul_peak_gflops(dtype: str, threads: int, repeat: int = 3) -> float:
    """Best of several GEMMs (square and the training's skinny shapes) on ``threads`` threads, in ``dtype``."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 576, 1536), (2048, 576, 576)):
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


def flops_per_token(model_dir: Path, r: int = 8) -> float:
    """Training FLOPs per token of LoRA on every decoder linear layer: forward 2 x (decoder linear weights + lm_head),
    backward 2 x the same for activation gradients, plus 6 x the LoRA weights (their forward, input and weight
    gradients). Attention scores are left out (a few % at these lengths): if anything the MFU is understated."""
    c = json.loads((model_dir / "config.json").read_text())
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * i)
    lora = L * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    return 4 * (linear + h * v) + 6 * lora


class OtherCpu:
    """CPU seconds used by processes other than this benchmark and its children, over a span: /proc/stat's busy
    time minus our own and our children's user+system time."""

    @staticmethod
    def _busy() -> float:
        parts = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = parts[3] + parts[4]  # idle + iowait
        return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __enter__(self):
        self.t, self.busy, self.ours = time.monotonic(), self._busy(), self._ours()
        return self

    def share(self) -> float:
        """Others' CPU time / (elapsed x CPUs) since the start."""
        cpus = len(os.sched_getaffinity(0))
        elapsed = time.monotonic() - self.t
        return max(0.0, (self._busy() - self.busy) - (self._ours() - self.ours)) / max(1e-9, elapsed * cpus)

    def __exit__(self, *a):
        return False


def run_ours(a, model: Path, data: str, out: Path, env: dict) -> dict:
    argv = [
        PY,
        str(REPO / "train.py"),
        f"model={MODELS[a.model][0]}",
        f"data.path={data}",
        f"output_dir={out}",
        f"max_steps={a.steps}",
        f"batch_size={a.batch}",
        f"micro_batch_size={a.micro}",
        f"cutoff_len={a.cutoff}",
        f"val_set_size={a.val}",
        f"max_samples={a.samples}",
        "learning_rate=5e-4",
        "lora_r=8",
        "lora_alpha=16",
        "lora_dropout=0.05",
        "lora_target_modules=[all]",
        "modules_to_save=null",
        "eval_steps=100000",
        "merge=false",
        "report_to=none",
        "logging_steps=1",
        *a.ours,
    ]
    t = time.perf_counter()
    p = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"our run failed:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    s = json.loads((out / "train_summary.json").read_text())
    return {
        "wall_s": wall,
        "loop_s": s["train_compute_s"],
        "tokens_per_s": s["target_tokens_per_s"],  # supervised tokens, as the baseline counts them
        "train_loss": s["mean_train_loss_hf"],
        "eval_loss": s["eval_loss"],
        "precision": s["precision"],
        "peak_rss_mb": s["peak_rss_mb"],
    }


def run_baseline(a, model: Path, data: str, out: Path, env: dict) -> dict:
    argv = [PY, str(REPO / "bench" / "baseline_hf_sft.py"), "--model", str(model), "--data", data, "--out", str(out)]
    argv += ["--max-steps", str(a.steps), "--batch", str(a.batch), "--micro", str(a.micro), "--cutoff", str(a.cutoff)]
    argv += ["--val", str(a.val), "--max-samples", str(a.samples)]
    t = time.perf_counter()
    p = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"baseline failed:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    r = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    return {
        "wall_s": wall,
        "loop_s": r["train_runtime_s"],
        "tokens_per_s": r["tokens_per_s"],
        "train_loss": r["train_loss"],
        "eval_loss": r["eval_loss"],
        "precision": "fp32",
        "peak_rss_mb": r["peak_rss_mb"],
    }


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="30m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2, help="counted runs of each side, after one warm-up pair")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS of both")
    ap.add_argument("--max-load", type=float, default=0.5, help="refuse to start above this 1-minute load average")
    ap.add_argument("--max-other", type=float, default=0.05, help="refuse to report above this share of others' CPU")
    ap.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for our run")
    a = ap.parse_args()

    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {len(os.sched_getaffinity(0))} CPUs")
    if load[0] > a.max_load:
        print(
            f"refused: the machine is busy (1-minute load average {load[0]:.2f} > {a.max_load}); a figure taken "
            "while other processes share the cores is not a figure. Run again when it is idle."
        )
        return 3
    from finetune.tools.tiny_models import build

    builder, folder = MODELS[a.model]
    model = build(builder, str(REPO / "models" / folder))
    data = str(REPO / "data" / "samples" / "tiny_alpaca.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env["OMP_NUM_THREADS"] = str(a.threads)
    flops = flops_per_token(model)
    print(
        f"model {model.name}; LoRA r 8 on every decoder linear layer; {a.steps} steps x batch {a.batch} (micro "
        f"{a.micro}), cutoff {a.cutoff}; OMP_NUM_THREADS={a.threads} for both; {flops / 1e6:.0f} MFLOP per token",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    base, ours = [], []
    with OtherCpu() as other:
        for i in range(a.repeats + 1):  # interleaved; pair 0 is the warm-up
            b = run_baseline(a, model, data, tmp / f"baseline{i}", env)
            o = run_ours(a, model, data, tmp / f"ours{i}", env)
            tag = "warm-up" if i == 0 else f"run {i}"
            print(
                f"{tag}: baseline {b['wall_s']:.1f} s (loop {b['loop_s']:.1f} s, {b['tokens_per_s']:.0f} tokens/s), "
                f"ours {o['wall_s']:.1f} s (loop {o['loop_s']:.1f} s, {o['tokens_per_s']:.0f} tokens/s)",
                flush=True,
            )
            if i:
                base.append(b)
                ours.append(o)
        others = other.share()
    # bf16 only where the CPU has bf16 instructions: elsewhere torch emulates it (~1 GFLOP/s on an AVX2 EPYC), the
    # product trains in fp32 there (hardware.precision=auto), and the MFU is against the fp32 peak
    flags = open("/proc/cpuinfo").read().split()
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    peaks = {p: matmul_peak_gflops(p, a.threads) for p in (("fp32", "bf16") if has_bf16 else ("fp32",))}
    mfu_of = "bf16" if has_bf16 else "fp32"
    print(f"others' share of the CPUs during the benchmark: {100 * others:.1f}%")
    if others > a.max_other:
        print(
            f"refused: other processes used {100 * others:.1f}% of the CPUs (> {100 * a.max_other:.0f}%): "
            "the figures would measure them. Run again on an idle machine."
        )
        return 3
    print(f"matmul peak now, {a.threads} threads: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    print(
        f"{'':10s} {'precision':>9s} {'wall s':>8s} {'loop s':>8s} {'tokens/s':>9s} {'train loss':>10s} "
        f"{'eval loss':>9s} {'MFU ' + mfu_of + '%':>9s} {'peak RSS MB':>11s}"
    )
    for name, rows in (("baseline", base), ("ours", ours)):
        tps = median(rows, "tokens_per_s")
        print(
            f"{name:10s} {rows[0]['precision']:>9s} {median(rows, 'wall_s'):8.1f} {median(rows, 'loop_s'):8.1f} "
            f"{tps:9.0f} {median(rows, 'train_loss'):10.4f} {median(rows, 'eval_loss'):9.4f} "
            f"{100 * flops * tps / (peaks[mfu_of] * 1e9):9.1f} {median(rows, 'peak_rss_mb'):11.0f}"
        )
    print(
        f"ours vs baseline: whole process {median(base, 'wall_s') / median(ours, 'wall_s'):.2f}x faster, "
        f"training loop {median(ours, 'tokens_per_s') / median(base, 'tokens_per_s'):.2f}x the tokens/s; "
        f"mean training loss {median(ours, 'train_loss') - median(base, 'train_loss'):+.4f}, "
        f"eval loss {median(ours, 'eval_loss') - median(base, 'eval_loss'):+.4f}"
    )
    print(f"(work folder: {tmp}; load average now: {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
