"""Held-out retrieval evaluation for the flagembedding backend, through FlagEmbedding's own inference classes.

    python -m finetune.recipes.embed_eval --config <run>/resolved_config.json --stage before|after --model PATH

- Embedder: ``FlagModel`` encodes the held-out queries (with the training instruction) and the corpus; passages
  are ranked by inner product of the (normalised) embeddings.
- Reranker: ``FlagReranker`` scores every (query, corpus passage) pair (or only the row's pos + neg when the corpus
  is larger than backend.eval_max_corpus).
- Metrics: recall@k for backend.eval_k, MRR (full ranking), nDCG@10 (binary relevance), and a held-out ``loss``:
  the training objective on each eval row's group (pos + first train_group_size-1 negatives): InfoNCE with the
  training temperature for the embedder, cross-entropy over the group logits for the reranker.
- Relevance: a row's ``pos_id`` (an id of data.corpus_path) when present, else the corpus passages whose text is
  in the row's ``pos``. Without a corpus, each query ranks its own pos + neg.

Stage ``after`` also turns the trainer's TensorBoard scalars (<run>/tensorboard) into <run>/history.jsonl, checks
that the saved model loads, counts its parameters and estimates tokens/s. Results go to <run>/eval/<stage>.json.
Any failure exits non-zero.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path


def read_jsonl(path: str):
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl")) if p.is_dir() else [p]
    rows = []
    for f in files:
        text = f.read_text(encoding="utf-8-sig")
        if f.suffix == ".json" and text.lstrip().startswith("["):
            rows += json.loads(text)
        else:
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows


# ------------------------------------------------------------------------------------------------ history


def tensorboard_history(run_dir: Path):
    """(rows for history.jsonl, final train summary) from the HF TensorBoardCallback's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step, summary = {}, {}
    for d in sorted({os.path.dirname(f) for f in glob.glob(str(run_dir / "tensorboard" / "**" / "events.out.tfevents.*"),
                                                           recursive=True)}):
        acc = EventAccumulator(d, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if not tag.startswith("train/"):
                continue
            key = tag[len("train/"):]
            for ev in acc.Scalars(tag):
                if key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                           "total_flos"):
                    summary[key] = float(ev.value)
                else:
                    by_step.setdefault(int(ev.step), {})[key] = float(ev.value)
    rows = [{"step": s, **vals} for s, vals in sorted(by_step.items()) if "loss" in vals]
    return rows, summary


# ------------------------------------------------------------------------------------------------ metrics


def rank_metrics(scores, relevant, ks):
    """scores: list (per query) of lists of scores over candidates; relevant: list of sets of candidate indexes."""
    out = {f"recall_at_{k}": 0.0 for k in ks}
    mrr = ndcg = 0.0
    for sc, rel in zip(scores, relevant):
        order = sorted(range(len(sc)), key=lambda i: -sc[i])
        ranks = [r for r, i in enumerate(order, start=1) if i in rel]
        for k in ks:
            out[f"recall_at_{k}"] += sum(1 for r in ranks if r <= k) / len(rel)
        mrr += 1.0 / min(ranks)
        dcg = sum(1.0 / math.log2(r + 1) for r in ranks if r <= 10)
        idcg = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(rel), 10) + 1))
        ndcg += dcg / idcg
    n = max(1, len(scores))
    out = {k: v / n for k, v in out.items()}
    out.update(mrr=mrr / n, ndcg_at_10=ndcg / n)
    return out


def group_loss(logits_per_row):
    """Mean cross-entropy with the positive at index 0."""
    tot = 0.0
    for lg in logits_per_row:
        m = max(lg)
        tot += -(lg[0] - m - math.log(sum(math.exp(x - m) for x in lg)))
    return tot / max(1, len(logits_per_row))


def evaluate(cfg: dict, model_path: str, eval_path: str, corpus_path) -> dict:
    b = cfg["backend"]
    task = b["task"]
    qlen = b["query_max_len"] or (512 if task == "embedder" else 256)
    plen = b["passage_max_len"] or (512 if task == "embedder" else 256)
    group = int(b["train_group_size"])
    ks = [int(k) for k in b["eval_k"]]
    rows = read_jsonl(eval_path)
    corpus = read_jsonl(corpus_path) if corpus_path else None

    queries = [r["query"] for r in rows]
    if corpus is not None:
        docs = [c["text"] for c in corpus]
        ids = {str(c["id"]): i for i, c in enumerate(corpus)}
        index = {t: i for i, t in enumerate(docs)}
        relevant = []
        for r in rows:
            if "pos_id" in r and str(r["pos_id"]) in ids:
                relevant.append({ids[str(r["pos_id"])]})
                continue
            rel = set()
            for p in r["pos"]:
                if p not in index:                         # a positive the corpus lacks: add it
                    index[p] = len(docs)
                    docs.append(p)
                rel.add(index[p])
            relevant.append(rel)
        candidates = None
    else:
        docs = None
        candidates = [list(r["pos"]) + list(r.get("neg") or []) for r in rows]
        relevant = [set(range(len(r["pos"]))) for r in rows]
    groups = [[r["pos"][0]] + list(r.get("neg") or [])[: group - 1] for r in rows if r.get("neg")]
    group_q = [r["query"] for r in rows if r.get("neg")]

    t0 = time.time()
    if task == "embedder":
        import numpy as np
        from FlagEmbedding import FlagModel

        model = FlagModel(model_path, normalize_embeddings=bool(b["normalize_embeddings"]), use_fp16=False,
                          query_instruction_for_retrieval=b["query_instruction_for_retrieval"],
                          query_instruction_format=b["query_instruction_format"], devices="cpu",
                          pooling_method=b["sentence_pooling_method"], trust_remote_code=bool(cfg["trust_remote_code"]),
                          batch_size=int(b["eval_batch_size"]), query_max_length=qlen, passage_max_length=plen)
        q = np.asarray(model.encode_queries(queries))
        if docs is not None:
            scores = (q @ np.asarray(model.encode_corpus(docs)).T).tolist()
        else:
            scores = [(q[i:i + 1] @ np.asarray(model.encode_corpus(c)).T)[0].tolist() for i, c in enumerate(candidates)]
        logits = []
        if groups:
            gq = np.asarray(model.encode_queries(group_q))
            for i, g in enumerate(groups):
                p = np.asarray(model.encode_corpus(g))
                logits.append(((gq[i:i + 1] @ p.T)[0] / float(b["temperature"])).tolist())
    else:
        from FlagEmbedding import FlagReranker

        model = FlagReranker(model_path, use_fp16=False, devices="cpu",
                             query_instruction_for_rerank=b["query_instruction_for_rerank"],
                             query_instruction_format=b["query_instruction_format"],
                             trust_remote_code=bool(cfg["trust_remote_code"]), batch_size=int(b["eval_batch_size"]),
                             max_length=qlen + plen)

        def score(pairs):
            s = model.compute_score(pairs)
            return [float(x) for x in (s if isinstance(s, (list, tuple)) else [s])]

        if docs is not None and len(docs) <= int(b["eval_max_corpus"]):
            flat = score([(qq, d) for qq in queries for d in docs])
            scores = [flat[i * len(docs):(i + 1) * len(docs)] for i in range(len(queries))]
        else:
            if docs is not None:                             # too big to score everything: rank pos + neg only
                candidates = [list(r["pos"]) + list(r.get("neg") or []) for r in rows]
                relevant = [set(range(len(r["pos"]))) for r in rows]
            scores = [score([(qq, d) for d in c]) for qq, c in zip(queries, candidates)]
        logits = [score([(qq, d) for d in g]) for qq, g in zip(group_q, groups)]
    m = rank_metrics(scores, relevant, ks)
    if logits:
        m["loss"] = group_loss(logits)
    return {"metrics": m, "queries": len(queries), "corpus": len(docs) if docs is not None else None,
            "eval_seconds": round(time.time() - t0, 3)}


# ------------------------------------------------------------------------------------------------ after training


def model_facts(cfg: dict, model_path: str, train_path: str, summary: dict) -> dict:
    """Load the saved model with transformers (as FlagEmbedding does), count parameters, estimate tokens/s."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    b = cfg["backend"]
    task = b["task"]
    cls = AutoModel if task == "embedder" else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_path, trust_remote_code=bool(cfg["trust_remote_code"]))
    total = sum(p.numel() for p in model.parameters())
    out = {"total_params": total, "trainable_params": total}   # full fine-tuning: every parameter trains
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=bool(cfg["trust_remote_code"]))
    qlen = b["query_max_len"] or (512 if task == "embedder" else 256)
    plen = b["passage_max_len"] or (512 if task == "embedder" else 256)
    group = int(b["train_group_size"])
    instr = b["query_instruction_for_retrieval"] if task == "embedder" else b["query_instruction_for_rerank"]
    per_row = []
    for r in read_jsonl(train_path):
        qtext = b["query_instruction_format"].format(r.get("prompt", instr), r["query"]) if instr is not None else r["query"]
        nq = len(tok(qtext, truncation=True, max_length=qlen)["input_ids"])
        passages = list(r["pos"][:1]) + list(r.get("neg") or [])
        np_ = [len(tok(p, truncation=True, max_length=plen)["input_ids"]) for p in passages]
        avg_p = sum(np_) / len(np_)
        # embedder: one query + group passages; reranker: group (query, passage) pairs ([CLS] q [SEP] p [SEP])
        per_row.append(nq + group * avg_p if task == "embedder" else group * (nq + avg_p - 1))
    sps = summary.get("train_samples_per_second")
    if per_row and sps:
        out["tokens_per_s"] = round(sps * sum(per_row) / len(per_row), 1)
        out["train_samples_per_s"] = sps
    if summary.get("train_runtime") is not None:
        out["train_runtime_s"] = summary["train_runtime"]
    if summary.get("train_loss") is not None:
        out["train_loss_avg"] = summary["train_loss"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=("before", "after"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train-data", required=True)
    ap.add_argument("--eval-data")
    ap.add_argument("--corpus")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    run_dir = Path(cfg["_run_dir"])
    result = {"stage": args.stage, "model": args.model, "task": cfg["backend"]["task"]}
    if args.stage == "after":
        if not (Path(args.model) / "config.json").exists():
            print(f"embed_eval: no trained model at {args.model} (config.json missing)", file=sys.stderr)
            return 1
        rows, summary = tensorboard_history(run_dir)
        if not rows:
            print(f"embed_eval: no training losses in {run_dir / 'tensorboard'}", file=sys.stderr)
            return 1
        from finetune.report.history import write_history

        write_history(run_dir, rows)
        result.update(model_facts(cfg, args.model, args.train_data, summary))
        print(f"embed_eval: {len(rows)} logged steps, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
    if not args.no_eval and args.eval_data:
        result.update(evaluate(cfg, args.model, args.eval_data, args.corpus))
        print(f"embed_eval ({args.stage}): " + "  ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items()))
    from finetune.run_dir import atomic_write_json

    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "eval" / f"{args.stage}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
