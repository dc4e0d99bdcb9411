"""Preference evaluation: the held-out preference pairs scored by the model before and after training.

    python -m finetune.recipes.pref_eval --config <run>/resolved_config.json --stage before --model <base> [--adapter A]
    python -m finetune.recipes.pref_eval --config ... --stage after --model <merged>     (or <base> --adapter A,B)

A planned step of the llamafactory backend when ``preference_eval=true`` (finetune/backends/pref_eval.py). In order:

  1. the held-out pairs: the rows the run keeps out of training (finetune/recipes/gen_eval.py heldout_rows: a
     held-out dataset, data.eval_path, or LLaMA-Factory's held-out share), as (prompt, chosen, rejected): preference
     rows as they are, KTO rows paired where a prompt has a desirable and an undesirable answer; the first
     ``preference_eval_rows`` of them;
  2. each answer tokenised after its prompt exactly as training encodes it (finetune/recipes/prompting.py
     encode_answer: LLaMA-Factory's template for its runs), the answer's tokens only scored;
  3. the log-likelihood of each answer (sum of its tokens' log-probabilities: what DPO compares), in batches;
  4. accuracy: the share of pairs whose chosen answer is more likely than the rejected one; margin: the mean of
     log p(chosen) - log p(rejected) (nats); also the mean per-token log-probability of each side;
  5. <run>/eval/preference_<stage>.json (scores, every pair's numbers); after training also
     eval/preference_samples.md and two rows of history.jsonl (step 0: before, the last step: after), so the curves
     of MLflow / W&B / TensorBoard and the sweep summary carry them (finetune/report/metrics.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List

from finetune.recipes.common import atomic_write_text, log
from finetune.recipes.gen_eval import _cell, eval_record, eval_step, heldout_rows, load_model
from finetune.recipes.prompting import PromptFormat, preference_pairs


def sequences(fmt: PromptFormat, tokenizer, pairs) -> List[tuple]:
    """(input ids, number of prompt ids) for every answer: chosen and rejected of each pair, in that order."""
    out = []
    for turns, chosen, rejected in pairs:
        for answer in (chosen, rejected):
            prompt_ids, answer_ids = fmt.encode_answer(tokenizer, turns, answer)
            out.append((list(prompt_ids) + list(answer_ids), len(prompt_ids)))
    return out


def answer_logps(model, seqs: List[tuple], pad_id: int, batch_size: int = 8) -> List[tuple]:
    """(sum, count) of the answer tokens' log-probabilities of each sequence (right-padded batches)."""
    import torch

    out = []
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([list(ids) + [pad_id] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_, _ in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, (seq, n_prompt) in enumerate(batch):
            scored = logp[row, n_prompt - 1 : len(seq) - 1]  # position t predicts token t + 1
            out.append((float(scored.sum()), int(scored.numel())))
    return out


def score(pairs, logps: List[tuple]) -> tuple:
    rows, right, margin = [], 0, 0.0
    for k, (turns, chosen, rejected) in enumerate(pairs):
        (c, nc), (r, nr) = logps[2 * k], logps[2 * k + 1]
        rows.append(
            {
                "prompt": "\n".join(t["content"] for t in turns if t["role"] != "system"),
                "chosen": chosen,
                "rejected": rejected,
                "logp_chosen": round(c, 4),
                "logp_rejected": round(r, 4),
                "margin": round(c - r, 4),
                "right": c > r,
                "tokens_chosen": nc,
                "tokens_rejected": nr,
            }
        )
        right += c > r
        margin += c - r
    n = max(1, len(pairs))
    metrics = {
        "accuracy": right / n,
        "margin": margin / n,
        "right": right,
        "pairs": len(pairs),
        "chosen_logp_per_token": sum(r["logp_chosen"] / max(1, r["tokens_chosen"]) for r in rows) / n,
        "rejected_logp_per_token": sum(r["logp_rejected"] / max(1, r["tokens_rejected"]) for r in rows) / n,
    }
    return metrics, rows


def write_samples(run_dir: Path, before: dict, after: dict) -> None:
    """eval/preference_samples.md: each pair's margin before and after training."""
    b_rows = (before or {}).get("pairs") or []
    bm, am = (before or {}).get("metrics") or {}, after["metrics"]
    lines = [
        f"# Held-out preference pairs, before and after training ({am['pairs']} pairs)",
        "",
        f"accuracy (log p(chosen) > log p(rejected)): {bm.get('right', '-')}/{am['pairs']} before, "
        f"{am['right']}/{am['pairs']} after; mean margin {bm.get('margin', float('nan')):.3f} -> {am['margin']:.3f}"
        " nats",
        "",
        "| # | prompt | chosen | rejected | margin before | margin after |",
        "|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(after["pairs"]):
        b = b_rows[i] if i < len(b_rows) else {}
        mark = {True: "✓ ", False: "✗ ", None: ""}
        lines.append(
            f"| {i} | {_cell(a['prompt'], 60)} | {_cell(a['chosen'], 30)} | {_cell(a['rejected'], 30)} | "
            f"{mark[b.get('right')]}{b.get('margin', '')} | {mark[a['right']]}{a['margin']} |"
        )
    atomic_write_text(run_dir / "eval" / "preference_samples.md", "\n".join(lines) + "\n")


def add_history(run_dir: Path, before: dict, after: dict) -> None:
    """Two rows of history.jsonl: the scores before training at step 0, after it at the last logged step."""
    from finetune.history import read_history, write_history

    rows = read_history(run_dir)
    last = max((int(r["step"]) for r in rows if isinstance(r.get("step"), (int, float))), default=0)
    keys = ("accuracy", "margin")
    if before:
        rows.append({"step": 0, **{f"eval_preference_{k}": before["metrics"][k] for k in keys}})
    rows.append({"step": last, **{f"eval_preference_{k}": after["metrics"][k] for k in keys}})
    write_history(run_dir, rows)


def main(argv=None) -> int:
    a, cfg, run_dir, tokenizer, fmt, t0 = eval_step(
        "python -m finetune.recipes.pref_eval", "LoRA adapters on --model, merged in order (a comma list)", argv
    )
    pairs = preference_pairs(heldout_rows(cfg, tokenizer))
    limit = int(cfg.get("preference_eval_rows") or 0)
    pairs = pairs[:limit] if limit > 0 else pairs
    if not pairs:
        print(
            "pref_eval: no held-out preference pairs (KTO rows pair up only where a prompt has a desirable and an "
            "undesirable answer; set data.eval_path to a file holding both)",
            file=sys.stderr,
        )
        return 1
    model, _ = load_model(a.model, a.adapter, bool(cfg.get("trust_remote_code")))
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    seqs = sequences(fmt, tokenizer, pairs)
    logps = answer_logps(model, seqs, tokenizer.pad_token_id, int(cfg.get("generate_batch_size") or 8))
    metrics, rows = score(pairs, logps)
    result = {
        **eval_record(a, fmt, metrics),
        "score_s": round(time.perf_counter() - t1, 2),
        "load_s": round(load_s, 2),
        "pairs": rows,
    }
    atomic_write_text(run_dir / "eval" / f"preference_{a.stage}.json", json.dumps(result, indent=1))
    log(
        f"pref_eval ({a.stage}): accuracy {metrics['right']}/{metrics['pairs']} ({metrics['accuracy']:.3f}), "
        f"mean margin {metrics['margin']:.3f} nats (log p(chosen) - log p(rejected)), {fmt.describe()}, "
        f"{result['score_s']} s"
    )
    if a.stage == "after":
        before_p = run_dir / "eval" / "preference_before.json"
        before = json.loads(before_p.read_text()) if before_p.exists() else None
        write_samples(run_dir, before, result)
        add_history(run_dir, before, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
