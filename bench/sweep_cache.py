"""Benchmark of the tokenised-dataset cache shared by sweep jobs (finetune/data_cache.py).

Runs N "jobs" as separate processes, as a sweep does, each preparing the same training data the way the
alpacalora recipe does (read the rows, hash data + tokenizer files for the key, alpaca prompt template, tokenise
with the tiny Llama's tokenizer, cutoff, label masking: finetune.recipes.data.encode_rows) through
``get_or_build``. Reports each job's data-preparation time and jobs 2..N against job 1 (target <= 0.1x).

    python bench/sweep_cache.py                        # 4 sequential jobs, 3,200 rows
    python bench/sweep_cache.py --jobs 6 --parallel 2  # 2 at a time: one builds, the other waits on the lock
    python bench/sweep_cache.py --format arrow         # build_fn returns a datasets.Dataset (memory-mapped hits)
    python bench/sweep_cache.py --repeat 3 --json      # smaller data; one JSON line

Tokenizer loading is not counted (every run loads its tokenizer anyway); the timed part is what a cache hit
saves: reading rows, hashing, prompt formatting, tokenisation.
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
sys.path.insert(0, str(REPO))


def job(args) -> int:
    from transformers import AutoTokenizer

    from finetune.data_cache import file_digest, get_or_build
    from finetune.recipes.data import TOKENIZER_FILES, data_files, encode_rows, read_rows
    from finetune.recipes.templates import load_template

    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    tok_files = [Path(args.model) / f for f in TOKENIZER_FILES if (Path(args.model) / f).is_file()]
    key = {
        "data": file_digest(data_files(args.data)),
        "tokenizer": file_digest(tok_files),
        "template": load_template("alpaca"),
        "cutoff_len": 256,
        "train_on_inputs": False,
        "max_samples": None,
    }
    info: dict = {}

    def build():
        examples = encode_rows(read_rows(args.data), tok, "alpaca", 256, False)
        if args.format == "arrow":
            import datasets

            return datasets.Dataset.from_list(examples)
        return examples

    examples = get_or_build(key, build, cache_dir=args.cache_dir, info=info)
    seconds = time.perf_counter() - t0
    ids = examples["input_ids"] if args.format == "arrow" else [e["input_ids"] for e in examples]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "hit": info["hit"],
                "waited_s": info["waited_s"],
                "examples": len(examples),
                "tokens": sum(len(i) for i in ids),
            }
        )
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=1, help="jobs started at once")
    ap.add_argument("--repeat", type=int, default=10, help="copies of the 320 sample rows (varied)")
    ap.add_argument(
        "--format",
        choices=["json", "arrow"],
        default="json",
        help="what build_fn returns: a list of dicts (JSON entry, what the alpacalora recipe uses) or a "
        "datasets.Dataset (Arrow entry, memory-mapped on a hit)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    ap.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        return job(args)

    from finetune.tools.tiny_models import build

    model = build("tiny_llama", str(REPO / "models" / "tiny-llama"))
    rows = json.loads((REPO / "data" / "samples" / "tiny_alpaca.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-sweep-cache-") as tmp:
        data = Path(tmp) / "train.json"
        data.write_text(
            json.dumps(
                [{**r, "instruction": f"{r['instruction']} (variant {i})"} for i in range(args.repeat) for r in rows]
            )
        )
        cache = Path(tmp) / "cache"
        argv = [
            sys.executable,
            __file__,
            "--job",
            "--format",
            args.format,
            "--model",
            str(model),
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        results = []
        for start in range(0, args.jobs, args.parallel):
            procs = [
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for _ in range(min(args.parallel, args.jobs - start))
            ]
            for p in procs:
                out, err = p.communicate()
                if p.returncode != 0:
                    sys.stderr.write(err)
                    return p.returncode
                results.append(json.loads(out.strip().splitlines()[-1]))
    builds = [r for r in results if not r["hit"]]
    first = builds[0]["seconds"] if builds else results[0]["seconds"]
    # jobs that started while job 1 was building wait on the lock (then read): their time is job 1's build
    # time, not a cost of the cache; the target is for jobs that start after the build (a sequential sweep)
    waiters = [r for r in results if r["hit"] and r["waited_s"] > 0.05]
    others = [r["seconds"] for r in results if r["hit"] and r not in waiters]
    ratio = (sum(others) / len(others)) / first if others else float("nan")
    summary = {
        "jobs": args.jobs,
        "parallel": args.parallel,
        "format": args.format,
        "rows": len(rows) * args.repeat,
        "examples": results[0]["examples"],
        "tokens": results[0]["tokens"],
        "builds": len(builds),
        "job1_s": round(first, 3),
        "jobs2_n_mean_s": round(sum(others) / len(others), 4) if others else None,
        "ratio": round(ratio, 4),
        "target": 0.1,
        "waited_on_build": len(waiters),
        "ok": bool(len(builds) == 1 and ratio <= 0.1),
        "per_job": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['rows']} rows -> {summary['examples']} examples, {summary['tokens']} tokens; "
            f"{args.jobs} jobs, {args.parallel} at a time"
        )
        for i, r in enumerate(results, 1):
            print(
                f"  job {i}: {r['seconds']:.3f} s  {'hit' if r['hit'] else 'built'}"
                + (f" (waited {r['waited_s']:.2f} s for the lock)" if r["waited_s"] > 0.01 else "")
            )
        if waiters:
            print(f"{len(waiters)} job(s) started during the build, waited for it and read it (not rebuilt)")
        print(
            f"build: {first:.3f} s; later jobs: {summary['jobs2_n_mean_s']} s on average; "
            f"ratio {ratio:.4f} (target <= 0.1): {'OK' if summary['ok'] else 'NOT MET'}; builds: {len(builds)}"
        )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
