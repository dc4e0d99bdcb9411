"""Evaluation by generation: the held-out rows are answered by the model before and after training, and scored.

    python -m finetune.recipes.gen_eval --config <run>/resolved_config.json --stage before --model <base>
    python -m finetune.recipes.gen_eval --config ... --stage after --model <merged>            (or the trained model)
    python -m finetune.recipes.gen_eval --config ... --stage after --model <base> --adapter <adapter>   (merge=false)

A planned step of the alpacalora, llamafactory and collie backends when ``generate_eval=true``
(finetune/backends/gen_eval.py). What it does, in order:

  1. the held-out rows: the same rows the backend holds out from training (alpacalora: rows that survive
     tokenising, seed 42; LLaMA-Factory: its train_test_split with the run's seed, or data.eval_path; Collie: its
     own shuffle), the first ``generate_eval_rows`` of them;
  2. prompts built exactly as in training (finetune/recipes/prompting.py: the run's prompt template, or
     LLaMA-Factory's chat template), tokenised with the tokenizer saved beside the model being evaluated;
  3. greedy generation in batches of ``generate_batch_size``, left-padded (a CPU answers 8 prompts in about the
     time of one), at most ``max_new_tokens`` new tokens, stopping at EOS (and the template's stop words);
  4. scores: exact match (the answer's first lines against the reference's, whitespace collapsed: a model that
     goes on talking after a right answer is right; one that echoes the input is not), token F1 (ROUGE-1) and
     ROUGE-L F-measures from Google's rouge-score package (no stemming; it needs no downloaded data);
  5. <run>/eval/generate_<stage>.json (scores, every answer, time, tokens/s), eval/heldout.jsonl (the rows, for
     `finetune generate <run> --data <run>/eval/heldout.jsonl`); after training also the samples table
     <run>/eval/samples.md and samples.jsonl (prompt, reference, before, after). metrics.json, TensorBoard and the
     sweep summary read these (finetune/report/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from finetune.recipes.common import atomic_write_text, free_cores, log, quiet_false_tying_warning, read_config
from finetune.recipes.data import encode_rows, read_rows, split_train_val
from finetune.recipes.prompting import PromptFormat

# ------------------------------------------------------------------------------------------ held-out rows


def heldout_rows(cfg: dict, tokenizer) -> List[dict]:
    """The rows the run's backend keeps out of training, in its own order."""
    backend = cfg["backend"]["name"]
    vs = float(cfg.get("val_set_size") or 0)
    if backend == "llamafactory" and cfg["data"].get("eval_path"):
        return read_rows(cfg["data"]["eval_path"])
    if backend == "collie":
        from finetune.recipes.collie import load_rows, split_rows

        return split_rows(cfg, load_rows(cfg))[1]
    rows = read_rows(cfg["data"]["path"])
    if cfg.get("max_samples"):
        rows = rows[: int(cfg["max_samples"])]
    if vs <= 0:
        return []
    if backend == "llamafactory":  # LLaMA-Factory: datasets' train_test_split(test_size, seed=run seed)
        return split_train_val(rows, vs, seed=int(cfg["seed"]))[1]
    # alpacalora: rows left with nothing to learn after cutoff_len are dropped before its split (seed 42)
    template = cfg["prompt_template_name"]
    kept = [
        r for r in rows if encode_rows([r], tokenizer, template, int(cfg["cutoff_len"]), bool(cfg["train_on_inputs"]))
    ]
    return split_train_val(kept, vs, seed=42)[1]


# ------------------------------------------------------------------------------------------ model + generation


def load_model(model_path: str, adapter: Optional[str] = None, trust_remote_code: bool = False):
    """(model, tokenizer) for generation: the merged or trained model, or the base with the adapter on top; the
    tokenizer saved beside what is evaluated (the adapter's folder, else the model's)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    tok_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        quiet_false_tying_warning(model)
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def generate(
    model,
    tokenizer,
    prompts: List[List[int]],
    max_new_tokens: int,
    stop_ids: List[int],
    batch_size: int = 8,
    streamer=None,
) -> tuple:
    """Greedy answers to tokenised prompts, batched with left padding. Returns (texts, generated token count)."""
    import torch

    pad = tokenizer.pad_token_id
    texts, n_tokens = [], 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=pad,
                streamer=streamer,
            )
        for row in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
            n_tokens += min(cut + 1, len(row))
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts, n_tokens


# ------------------------------------------------------------------------------------------ scoring


def answer_of(text: str, n_lines: int = 1) -> str:
    """The answer part of a generation: before an alpaca-style continuation ("### Instruction:"), its first
    ``n_lines`` non-empty lines (the reference's line count), whitespace collapsed."""
    text = re.split(r"(?m)^\s*###", text, maxsplit=1)[0]
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[: max(1, n_lines)])


def score(predictions: List[str], references: List[str]) -> dict:
    """exact_match (share of answers equal to the reference), token_f1 (ROUGE-1 F) and rouge_l (ROUGE-L F), from
    Google's rouge-score package."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    exact, f1, rl, per_row = 0, 0.0, 0.0, []
    for pred, ref in zip(predictions, references):
        ref_n = answer_of(ref, 10**6)
        ans = answer_of(pred, len(ref_n.splitlines()))
        s = scorer.score(ref_n, ans)
        row = {"exact_match": ans == ref_n, "token_f1": s["rouge1"].fmeasure, "rouge_l": s["rougeL"].fmeasure}
        exact += row["exact_match"]
        f1 += row["token_f1"]
        rl += row["rouge_l"]
        per_row.append(row)
    n = max(1, len(references))
    return {
        "exact_match": exact / n,
        "token_f1": f1 / n,
        "rouge_l": rl / n,
        "rows": len(references),
        "exact": exact,
    }, per_row


# ------------------------------------------------------------------------------------------ samples table


def _cell(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_samples(run_dir: Path, before: Optional[dict], after: dict) -> None:
    """eval/samples.jsonl and eval/samples.md: prompt, reference, the answer before and after training."""
    rows = []
    for i, a in enumerate(after["samples"]):
        b = before["samples"][i] if before and i < len(before["samples"]) else {}
        rows.append(
            {
                "prompt": a["prompt"],
                "reference": a["reference"],
                "before": b.get("answer"),
                "before_exact": b.get("exact_match"),
                "after": a["answer"],
                "after_exact": a["exact_match"],
            }
        )
    atomic_write_text(run_dir / "eval" / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    bm = (before or {}).get("metrics") or {}
    am = after["metrics"]
    head = [
        f"# Answers to the held-out rows, before and after training ({am['rows']} rows, greedy)",
        "",
        f"exact match: {bm.get('exact', '-')}/{am['rows']} before, {am['exact']}/{am['rows']} after; "
        f"token F1 {bm.get('token_f1', float('nan')):.3f} -> {am['token_f1']:.3f}; "
        f"ROUGE-L {bm.get('rouge_l', float('nan')):.3f} -> {am['rouge_l']:.3f}",
        "",
        "| # | prompt | reference | before | after |",
        "|---|---|---|---|---|",
    ]
    mark = {True: "✓ ", False: "✗ ", None: ""}
    lines = [
        f"| {i} | {_cell(r['prompt'])} | {_cell(r['reference'], 40)} | {mark[r['before_exact']]}"
        f"{_cell(r['before'] or '', 50)} | {mark[r['after_exact']]}{_cell(r['after'], 50)} |"
        for i, r in enumerate(rows)
    ]
    atomic_write_text(run_dir / "eval" / "samples.md", "\n".join(head + lines) + "\n")


# ------------------------------------------------------------------------------------------ the step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.recipes.gen_eval")
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=("before", "after"), required=True)
    ap.add_argument("--model", required=True, help="the model folder (base before training; merged/trained after)")
    ap.add_argument("--adapter", help="a LoRA adapter to put on --model (a run with merge=false)")
    a = ap.parse_args(argv)
    cfg = read_config(a.config)
    run_dir = Path(cfg["_run_dir"])
    import torch

    torch.manual_seed(0)
    threads = free_cores()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(a.model, a.adapter, bool(cfg.get("trust_remote_code")))
    fmt = PromptFormat.from_run_config(cfg)
    rows = heldout_rows(cfg, tokenizer)
    limit = int(cfg.get("generate_eval_rows") or 0)
    rows = rows[:limit] if limit > 0 else rows
    if not rows:
        print("gen_eval: no held-out rows to answer (val_set_size=0?)", file=sys.stderr)
        return 1
    atomic_write_text(run_dir / "eval" / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    turns = [fmt.row_turns(r) for r in rows]
    prompts = [fmt.encode(tokenizer, t) for t, _ in turns]
    load_s = time.perf_counter() - t0
    log(
        f"gen_eval ({a.stage}): {len(rows)} held-out rows, {fmt.describe()}, batches of "
        f"{int(cfg['generate_batch_size'])}, at most {int(cfg['max_new_tokens'])} new tokens, {threads} thread(s)"
    )
    t1 = time.perf_counter()
    answers, n_new = generate(
        model, tokenizer, prompts, int(cfg["max_new_tokens"]), fmt.stop_ids(tokenizer), int(cfg["generate_batch_size"])
    )
    gen_s = time.perf_counter() - t1
    metrics, per_row = score(answers, [ref for _, ref in turns])
    samples = [
        {"prompt": "\n".join(t["content"] for t in tt), "reference": ref, "answer": ans, **pr}
        for (tt, ref), ans, pr in zip(turns, answers, per_row)
    ]
    result = {
        "stage": a.stage,
        "model": a.model,
        "adapter": a.adapter,
        "prompt_format": fmt.describe(),
        "metrics": metrics,
        "generated_tokens": n_new,
        "generate_s": round(gen_s, 2),
        "generate_tokens_per_s": round(n_new / gen_s, 2) if gen_s > 0 else None,
        "load_s": round(load_s, 2),
        "max_new_tokens": int(cfg["max_new_tokens"]),
        "samples": samples,
    }
    atomic_write_text(run_dir / "eval" / f"generate_{a.stage}.json", json.dumps(result, indent=1))
    log(
        f"gen_eval ({a.stage}): exact match {metrics['exact']}/{metrics['rows']} ({metrics['exact_match']:.3f}), "
        f"token F1 {metrics['token_f1']:.3f}, ROUGE-L {metrics['rouge_l']:.3f}; {n_new} tokens in {gen_s:.1f} s "
        f"({result['generate_tokens_per_s']} tokens/s)"
    )
    for s in samples[:3]:
        log(f"  {_cell(s['prompt'], 60)!s} -> {s['answer']!r} (reference {s['reference']!r})")
    if a.stage == "after":
        before_p = run_dir / "eval" / "generate_before.json"
        before = json.loads(before_p.read_text()) if before_p.exists() else None
        write_samples(run_dir, before, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
