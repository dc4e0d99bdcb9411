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

from finetune.recipes.common import atomic_write_text, log, quiet_false_tying_warning, read_config
from finetune.recipes.data import encode_rows, read_rows, split_train_val
from finetune.recipes.prompting import PromptFormat, reference_rows
from finetune.run_files import RUN_DIR_KEY

# ------------------------------------------------------------------------------------------ held-out rows


def heldout_rows(cfg: dict, tokenizer) -> List[dict]:
    """The rows the run's backend keeps out of training, in its own order: a held-out dataset (data.eval_dataset),
    an eval file (LLaMA-Factory's data.eval_path), else the backend's own held-out share of the training rows."""
    from finetune import sources

    backend = cfg["backend"]["name"]
    vs = float(cfg.get("val_set_size") or 0)
    template = cfg["prompt_template_name"]
    held = sources.eval_rows(cfg)
    if held is not None:
        if backend == "llamafactory":
            return held
        return [
            r
            for r in held
            if encode_rows([r], tokenizer, template, int(cfg["cutoff_len"]), bool(cfg["train_on_inputs"]))
        ]
    if backend == "llamafactory" and cfg["data"].get("eval_path"):
        return read_rows(cfg["data"]["eval_path"])
    if backend == "collie":
        from finetune.recipes.collie import load_rows, split_rows

        return split_rows(cfg, load_rows(cfg))[1]
    rows = sources.train_rows(cfg)
    if vs <= 0:
        return []
    if backend == "llamafactory":  # LLaMA-Factory: datasets' train_test_split(test_size, seed=run seed)
        return split_train_val(rows, vs, seed=int(cfg["seed"]))[1]
    # alpacalora: rows left with nothing to learn after cutoff_len are dropped before its split (seed 42)
    kept = [
        r for r in rows if encode_rows([r], tokenizer, template, int(cfg["cutoff_len"]), bool(cfg["train_on_inputs"]))
    ]
    return split_train_val(kept, vs, seed=42)[1]


# ------------------------------------------------------------------------------------------ model + generation


def load_tokenizer(model_path: str, adapter: Optional[str] = None, trust_remote_code: bool = False):
    """The tokenizer saved beside what is evaluated (the adapter's folder, else the model's), with a pad token."""
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    last = adapter.split(",")[-1] if adapter else None
    tok_dir = last if last and (Path(last) / "tokenizer_config.json").exists() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_model(model_path: str, adapter: Optional[str] = None, trust_remote_code: bool = False):
    """(model, tokenizer) for generation: the merged or trained model, or the base with the adapter on top; the
    tokenizer saved beside what is evaluated (the adapter's folder, else the model's)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_path, adapter, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if adapter:  # a comma list: each merged in turn (a run that started from an adapter: that one, then its own)
        from peft import PeftModel

        quiet_false_tying_warning(model)
        for one in adapter.split(","):
            model = PeftModel.from_pretrained(model, one).merge_and_unload()
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


# ------------------------------------------------------------------------------------------ shared answers


def adapter_files(adapter: str) -> List[Path]:
    return [p for one in adapter.split(",") for p in sorted(Path(one).iterdir()) if p.is_file()]


def answers_key(
    model_path: str, prompts: List[List[int]], stop_ids: List[int], cfg: dict, adapter: Optional[str] = None
) -> dict:
    """Everything greedy answers of the base model depend on: the model folder's bytes (weights, config, tokenizer),
    the prompt token ids (rows, prompt format and tokenizer together), the stop ids, the decoding settings and the
    library versions. Jobs of a sweep that agree on all of it get the same answers, so they share one computation."""
    import hashlib
    from importlib import metadata

    from finetune.data_cache import file_digest

    files = [p for p in Path(model_path).iterdir() if p.is_file() and not p.name.startswith(".")]
    return {
        "kind": "greedy answers",
        "model": file_digest(files),
        **({"adapter": file_digest(adapter_files(adapter))} if adapter else {}),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "stop_ids": list(stop_ids),
        "max_new_tokens": int(cfg["max_new_tokens"]),
        "batch_size": int(cfg["generate_batch_size"]),  # left padding differs with the batch
        "dtype": "float32",
        "versions": {p: metadata.version(p) for p in ("torch", "transformers")},
    }


def base_answers(a, cfg: dict, prompts: List[List[int]], stop_ids: List[int], tokenizer) -> tuple:
    """(answers, generated tokens, generation seconds, load seconds, cache record) of the base model before
    training: computed once per content key and read by every later run or sweep job (finetune/data_cache.py:
    <outputs>/cache/generations, built under a lock, written atomically; FINETUNE_DATA_CACHE=off turns it off)."""
    from finetune.data_cache import cache_root, get_or_build

    def build() -> dict:
        t0 = time.perf_counter()
        model, _ = load_model(a.model, a.adapter, bool(cfg.get("trust_remote_code")))
        t1 = time.perf_counter()
        answers, n_new = generate(
            model, tokenizer, prompts, int(cfg["max_new_tokens"]), stop_ids, int(cfg["generate_batch_size"])
        )
        return {"answers": answers, "n_new": n_new, "generate_s": time.perf_counter() - t1, "load_s": t1 - t0}

    root = cache_root()
    info: dict = {}
    got = get_or_build(
        answers_key(a.model, prompts, stop_ids, cfg, a.adapter),
        build,
        cache_dir=None if root is None else root.parent / "generations",
        info=info,
    )
    record = {"reused": bool(info.get("hit")), "key": info.get("key"), "path": info.get("path")}
    return got["answers"], got["n_new"], got["generate_s"], got["load_s"], record


# ------------------------------------------------------------------------------------------ the step


def eval_step(prog: str, adapter_help: str, argv=None):
    """The head every evaluation step shares (this one, finetune/recipes/pref_eval.py): its arguments, the run's
    config and folder, seeded torch, the tokenizer and the run's prompt format. Returns
    (args, cfg, run_dir, tokenizer, fmt, t0)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=("before", "after"), required=True)
    ap.add_argument("--model", required=True, help="the model folder (base before training; merged/trained after)")
    ap.add_argument("--adapter", help=adapter_help)
    a = ap.parse_args(argv)
    cfg = read_config(a.config)
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(a.model, a.adapter, bool(cfg.get("trust_remote_code")))
    return a, cfg, Path(cfg[RUN_DIR_KEY]), tokenizer, PromptFormat.from_run_config(cfg), t0


def eval_record(a, fmt, metrics: dict) -> dict:
    """The head of an evaluation step's eval/<stage>.json: what was evaluated, how prompted, the metrics."""
    return {
        "stage": a.stage,
        "model": a.model,
        "adapter": a.adapter,
        "prompt_format": fmt.describe(),
        "metrics": metrics,
    }


def main(argv=None) -> int:
    a, cfg, run_dir, tokenizer, fmt, t0 = eval_step(
        "python -m finetune.recipes.gen_eval", "a LoRA adapter to put on --model (a run with merge=false)", argv
    )
    import torch

    threads = torch.get_num_threads()  # OMP_NUM_THREADS from the launcher
    rows = reference_rows(heldout_rows(cfg, tokenizer))  # KTO rows: the desirable answers are the references
    limit = int(cfg.get("generate_eval_rows") or 0)
    rows = rows[:limit] if limit > 0 else rows
    if not rows:
        print("gen_eval: no held-out rows to answer (val_set_size=0?)", file=sys.stderr)
        return 1
    atomic_write_text(run_dir / "eval" / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    turns = [fmt.row_turns(r) for r in rows]
    prompts = [fmt.encode(tokenizer, t) for t, _ in turns]
    log(
        f"gen_eval ({a.stage}): {len(rows)} held-out rows, {fmt.describe()}, batches of "
        f"{int(cfg['generate_batch_size'])}, at most {int(cfg['max_new_tokens'])} new tokens, {threads} thread(s)"
    )
    cache = None
    if a.stage == "before":  # the base model's answers cannot differ between runs that agree on the key
        answers, n_new, gen_s, load_s, cache = base_answers(a, cfg, prompts, fmt.stop_ids(tokenizer), tokenizer)
        if cache["reused"]:
            load_s = time.perf_counter() - t0  # this step's own time; gen_s is the shared computation's
            log(f"gen_eval (before): the base model's answers are reused from {cache['path']} (same content key)")
    else:
        model, _ = load_model(a.model, a.adapter, bool(cfg.get("trust_remote_code")))
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        answers, n_new = generate(
            model,
            tokenizer,
            prompts,
            int(cfg["max_new_tokens"]),
            fmt.stop_ids(tokenizer),
            int(cfg["generate_batch_size"]),
        )
        gen_s = time.perf_counter() - t1
    metrics, per_row = score(answers, [ref for _, ref in turns])
    samples = [
        {"prompt": "\n".join(t["content"] for t in tt), "reference": ref, "answer": ans, **pr}
        for (tt, ref), ans, pr in zip(turns, answers, per_row)
    ]
    result = {
        **eval_record(a, fmt, metrics),
        "generated_tokens": n_new,
        "generate_s": round(gen_s, 2),
        "generate_tokens_per_s": round(n_new / gen_s, 2) if gen_s > 0 else None,
        "load_s": round(load_s, 2),
        "max_new_tokens": int(cfg["max_new_tokens"]),
        "cache": cache,
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
