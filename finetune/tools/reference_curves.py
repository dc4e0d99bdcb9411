"""Reference loss curves: what training computes, committed, so that neither a change of ours nor a dependency bump
silently changes it (torchtune's habit: tiny models' losses checked against recorded numbers).

    python -m finetune.tools.reference_curves check <run folder> [--name default|smollm2]
    python -m finetune.tools.reference_curves update --why "torch 2.9.1 -> 2.10.0: new GEMM kernels"

``check`` compares a run's per-step training loss (history.jsonl) with tests/reference/loss_curves.json: every
step's loss within the band, else it lists the steps outside it (exit 1). The README acceptance test checks the
README's own default run and SmolLM2 showcase run with it (no extra training in CI).

``update`` is the only way the band changes, and it says why: it runs each reference command (as the README types
it) with OMP_NUM_THREADS=1 and =2, and once with another seed, and records the curve of the 1-thread run (what the
suite runs), the versions, the command, the reason, and the tolerance derived from what it measured:

    tolerance = max(4 x the largest 1-vs-2-thread difference of any step, 1e-4 x the loss)

A same-seed run on another thread count (or another CPU's kernels) only reorders floating-point sums: that is the
noise the band must admit. The seed-to-seed spread is recorded beside it for scale: a change of that size (or a
silent change of data order, masking or learning rate) is far outside the band.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Dict, List

from finetune.run_files import HISTORY, RESOLVED_CONFIG

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "tests" / "reference" / "loss_curves.json"
# name -> the README command's overrides (what the suite runs in its fresh clone)
RUNS = {"default": [], "smollm2": ["experiment=smollm2_lora"]}
PACKAGES = ("torch", "transformers", "peft", "accelerate")


def losses(run_dir: Path) -> Dict[int, float]:
    """step -> training loss of a run (its history.jsonl)."""
    out = {}
    for line in (Path(run_dir) / HISTORY).read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "loss" in row:
            out[int(row["step"])] = float(row["loss"])
    return out


def precision(run_dir: Path) -> str:
    """The precision a run trained in (hardware.precision as validation resolved it: `auto` is bf16 on a CPU with
    bf16 instructions, fp32 elsewhere), which decides which band applies."""
    cfg = json.loads((Path(run_dir) / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    return str((cfg.get("hardware") or {}).get("precision") or "fp32")


def band(name: str, prec: str, reference: Path = REFERENCE):
    """The recorded band of ``name`` for runs in precision ``prec`` (entries `name` and `name@<precision>`) on this
    CPU's instruction sets, or None: a curve trained in bf16 is another computation than the fp32 one, not noise
    around it, and another CPU's kernels (AMX instead of AVX-512 BF16, AVX2 instead of AVX-512) sum in another
    order than the 1-vs-2-thread difference the tolerance was derived from (a band recorded before the CPU was
    noted applies everywhere)."""
    data = json.loads(reference.read_text(encoding="utf-8"))
    for key in (name, f"{name}@{prec}"):
        if key in data and data[key].get("precision", "fp32") == prec:
            cpu = data[key].get("cpu", "")
            if cpu.startswith("not recorded") or cpu == _cpu():
                return data[key]
    return None


def outside(run_dir: Path, name: str, reference: Path = REFERENCE) -> List[str]:
    """The steps of a run whose loss is outside the reference band ([] when every step is inside). A run in a
    precision no band was recorded for (bf16 on a CPU with bf16 instructions, when the band was recorded on one
    without) is not compared: a warning says so, and `update` on such a machine records that band."""
    prec = precision(run_dir)
    ref = band(name, prec, reference)
    if ref is None:
        import warnings

        warnings.warn(
            f"reference_curves: no {name!r} band for precision {prec} on this CPU ("
            f"{_cpu()}); the run's losses were not compared. Record it here with: python -m "
            "finetune.tools.reference_curves update --only " + name + " --why ...",
            stacklevel=2,
        )
        return []
    got = losses(run_dir)
    problems = []
    for step, want in ((int(k), v) for k, v in ref["losses"].items()):
        have = got.get(step)
        if have is None:
            problems.append(f"step {step}: no loss logged (reference {want:.6f})")
        elif abs(have - want) > ref["tolerance"]:
            problems.append(
                f"step {step}: loss {have:.6f}, reference {want:.6f} +- {ref['tolerance']:.2g} "
                f"(off by {abs(have - want):.2g}; regenerate only with `python -m finetune.tools.reference_curves "
                "update --why ...` if the change is meant)"
            )
    return problems


def _cpu() -> str:
    """The CPU's vector instruction sets that decide kernels and precision (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(x for x in wanted if x in flags) or "no AVX2"


def _train(name: str, extra: List[str], threads: int, folder: Path) -> Dict[int, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env["OMP_NUM_THREADS"] = str(threads)
    out = folder / f"{name}-{threads}-{'-'.join(extra) or 'base'}".replace("=", "_")
    argv = [sys.executable, str(REPO / "train.py"), *RUNS[name], *extra, f"output_dir={out}"]
    print(f"reference_curves: {' '.join(argv[1:])} (OMP_NUM_THREADS={threads})", flush=True)
    subprocess.run(argv, cwd=str(REPO), env=env, check=True, stdout=subprocess.DEVNULL)
    _train.precision = precision(out)
    return losses(out)


def update(why: str, names: List[str]) -> None:
    data = json.loads(REFERENCE.read_text(encoding="utf-8")) if REFERENCE.exists() else {}
    folder = Path(tempfile.mkdtemp(prefix="reference-curves-"))
    for name in names:
        one, two = _train(name, [], 1, folder), _train(name, [], 2, folder)
        other_seed = _train(name, ["seed=43"], 1, folder)
        threads = max(abs(one[s] - two[s]) for s in one)
        seeds = max(abs(one[s] - other_seed[s]) for s in one if s in other_seed)
        tolerance = max(4 * threads, 1e-4 * max(one.values()))
        prec = _train.precision
        key = name if name not in data or data[name].get("precision", "fp32") == prec else f"{name}@{prec}"
        data[key] = {
            "command": " ".join(["python", "train.py", *RUNS[name]]),
            "losses": {str(s): v for s, v in sorted(one.items())},
            "tolerance": tolerance,
            "precision": prec,
            "cpu": _cpu(),
            "measured": {"max_thread_difference": threads, "max_seed_difference": seeds},
            "why": why,
            "updated": _dt.date.today().isoformat(),
            "versions": {p: metadata.version(p) for p in PACKAGES},
        }
        print(
            f"reference_curves: {name}: {len(one)} steps, tolerance {tolerance:.3g} (1 vs 2 threads: "
            f"{threads:.3g}; seed 42 vs 43: {seeds:.3g})",
            flush=True,
        )
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n", encoding="utf-8")
    print(f"reference_curves: wrote {REFERENCE}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.tools.reference_curves", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="a run's losses against the reference band")
    c.add_argument("run")
    c.add_argument("--name", choices=sorted(RUNS), default="default")
    u = sub.add_parser("update", help="run the reference commands and rewrite the band (say why)")
    u.add_argument("--why", required=True, help="why what training computes changed (recorded in the file)")
    u.add_argument("--only", choices=sorted(RUNS), nargs="*", default=sorted(RUNS))
    a = ap.parse_args(argv)
    if a.action == "update":
        if len(a.why.strip()) < 10:
            ap.error("--why: say in a sentence why the curves change")
        update(a.why.strip(), a.only)
        return 0
    problems = outside(Path(a.run), a.name)
    for p in problems:
        print(p)
    print(f"{a.name}: {'outside the reference band' if problems else 'inside the reference band'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
