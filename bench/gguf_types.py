"""GGUF export figures of one trained run, per quantisation type: file size, export time, how often llama.cpp's
greedy answers (the GGUF's embedded chat template) equal the merged HF model's answers from the run's own
evaluation by generation, exact match against the references, and llama.cpp's prompt / generation speed.

    python bench/gguf_types.py outputs/runs/<date>/<time>-smollm2_lora [--types f16,q8_0,q4_k_m] [--rows 40]

The run must have `generate_eval=true` (its eval/generate_after.json holds the HF answers) and a merged model
(the default). Exports go to <run>/bench-gguf-<type>/ (`finetune export --out`). The speed figures are llama.cpp's
own (`finetune.gguf_runner bench`) with the threads it picks; run it on an idle machine: the load average is
printed, and a figure taken while other work shares the cores is not a figure. The README test asserts what must
hold (f16 answers like the HF model, q8_0's exact match within 5 points, the LoRA GGUF like f16); this script
reports the rest (q4_k_m's loss of agreement, the speeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def _runner(*args: str) -> subprocess.CompletedProcess:
    python = REPO / ".venv-llamacpp" / "bin" / "python"
    if not python.exists():
        sys.exit("bench/gguf_types.py: llama.cpp's environment is missing: bash scripts/setup_llamacpp_env.sh")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(python), "-m", "finetune.gguf_runner", *args], env=env, capture_output=True, text=True, check=True
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--rows", type=int, default=40)
    a = ap.parse_args(argv)
    run = a.run.resolve()
    after = json.loads((run / "eval" / "generate_after.json").read_text())["samples"][: a.rows]
    rows = [json.loads(x) for x in (run / "eval" / "heldout.jsonl").read_text().splitlines()][: len(after)]
    cfg = json.loads((run / "resolved_config.json").read_text())
    hf = [_norm(s["answer"]) for s in after]
    refs = [_norm(r["output"]) for r in rows]
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {len(rows)} held-out rows of {run}")
    print(f"HF merged model: exact match {sum(h == r for h, r in zip(hf, refs)) / len(refs):.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print("| type | size MB | export s | same answer as HF | exact match | pp tokens/s | tg tokens/s |")
        print("|---|---|---|---|---|---|---|")
        for type_ in a.types.split(","):
            folder = run / f"bench-gguf-{type_}"
            export = ["export", str(run), "--to", "gguf", "--type", type_, "--out", str(folder)]
            code = "import sys; from finetune.cli import main; sys.exit(main(sys.argv[1:]))"
            subprocess.run([sys.executable, "-c", code, *export], check=True, cwd=str(REPO), stdout=subprocess.DEVNULL)
            info = json.loads((folder / "export.json").read_text())
            model = str(folder / info["files"]["model"])
            out = Path(tmp) / f"answers-{type_}.json"
            _runner("answer", "--model", model, "--data", str(data), "--out", str(out),
                    "--max-new-tokens", str(cfg["max_new_tokens"]))  # fmt: skip
            answers = [_norm(r["answer"]) for r in json.loads(out.read_text())["rows"]]
            speed = json.loads(_runner("bench", "--model", model).stdout)
            same = sum(x == h for x, h in zip(answers, hf)) / len(hf)
            em = sum(x == r for x, r in zip(answers, refs)) / len(refs)
            print(
                f"| {type_} | {info['sizes_mb'][info['files']['model']]} | {info['times']['total_s']} | {same:.3f} | "
                f"{em:.3f} | {speed['pp_tokens_per_s']} | {speed['tg_tokens_per_s']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
