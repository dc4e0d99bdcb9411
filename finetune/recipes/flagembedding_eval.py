"""Held-out retrieval evaluation for the flagembedding backend, through FlagEmbedding's own inference classes.

    python -m finetune.recipes.flagembedding_eval --config <run>/resolved_config.json --stage before|after --model PATH

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
import json
import math
import sys
import time
from pathlib import Path

from finetune.recipes.common import read_config, require_device
from finetune.run_files import RUN_DIR_KEY


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


def relevance(rows: list, corpus):
    """(docs, candidates, relevant). With a corpus: every query ranks all of ``docs`` (the corpus texts plus any
    positive it lacks), relevant = the row's pos_id or the indexes of its pos texts; candidates is None. Without:
    docs is None and each query ranks its own pos + neg (candidates), relevant = the pos indexes."""
    if corpus is None:
        return None, own_candidates(rows), own_relevant(rows)
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
            if p not in index:  # a positive the corpus lacks: add it
                index[p] = len(docs)
                docs.append(p)
            rel.add(index[p])
        relevant.append(rel)
    return docs, None, relevant


def own_candidates(rows: list) -> list:
    return [list(r["pos"]) + list(r.get("neg") or []) for r in rows]


def own_relevant(rows: list) -> list:
    return [set(range(len(r["pos"]))) for r in rows]


def loss_groups(rows: list, group: int):
    """(queries, groups) for the held-out loss: each row with negatives, its first pos + group-1 negatives."""
    groups = [[r["pos"][0]] + list(r.get("neg") or [])[: group - 1] for r in rows if r.get("neg")]
    return [r["query"] for r in rows if r.get("neg")], groups


def embedder_scores(cfg: dict, model_path: str, device: str, queries, docs, candidates, group_q, groups):
    """FlagModel: inner products of the query and passage embeddings; (scores per query, logits per loss group:
    the group's scores over the training temperature)."""
    import numpy as np
    from FlagEmbedding import FlagModel

    b = cfg["backend"]
    qlen, plen = max_lengths(b)
    model = FlagModel(
        model_path,
        normalize_embeddings=bool(b["normalize_embeddings"]),
        use_fp16=False,
        query_instruction_for_retrieval=b["query_instruction_for_retrieval"],
        query_instruction_format=b["query_instruction_format"],
        devices=device,
        pooling_method=b["sentence_pooling_method"],
        trust_remote_code=bool(cfg["trust_remote_code"]),
        batch_size=int(b["eval_batch_size"]),
        query_max_length=qlen,
        passage_max_length=plen,
    )
    q = np.asarray(model.encode_queries(queries))
    if docs is not None:
        scores = (q @ np.asarray(model.encode_corpus(docs)).T).tolist()
    else:
        scores = [(q[i : i + 1] @ np.asarray(model.encode_corpus(c)).T)[0].tolist() for i, c in enumerate(candidates)]
    logits = []
    if groups:
        gq = np.asarray(model.encode_queries(group_q))
        for i, g in enumerate(groups):
            p = np.asarray(model.encode_corpus(g))
            logits.append(((gq[i : i + 1] @ p.T)[0] / float(b["temperature"])).tolist())
    return scores, logits


def rerank_scores(model, pairs) -> list:
    """FlagReranker.compute_score as a list of floats (it returns a bare number for one pair)."""
    s = model.compute_score(pairs)
    return [float(x) for x in (s if isinstance(s, (list, tuple)) else [s])]


def reranker_scores(
    cfg: dict, model_path: str, device: str, rows, queries, docs, candidates, relevant, group_q, groups
):
    """FlagReranker scores every (query, passage) pair; a corpus larger than backend.eval_max_corpus is too big to
    score everything, so each query then ranks its own pos + neg. Returns (scores, relevant, logits)."""
    from FlagEmbedding import FlagReranker

    b = cfg["backend"]
    qlen, plen = max_lengths(b)
    model = FlagReranker(
        model_path,
        use_fp16=False,
        devices=device,
        query_instruction_for_rerank=b["query_instruction_for_rerank"],
        query_instruction_format=b["query_instruction_format"],
        trust_remote_code=bool(cfg["trust_remote_code"]),
        batch_size=int(b["eval_batch_size"]),
        max_length=qlen + plen,
    )
    if docs is not None and len(docs) <= int(b["eval_max_corpus"]):
        flat = rerank_scores(model, [(qq, d) for qq in queries for d in docs])
        scores = [flat[i * len(docs) : (i + 1) * len(docs)] for i in range(len(queries))]
    else:
        if docs is not None:  # too big to score everything: rank pos + neg only
            candidates, relevant = own_candidates(rows), own_relevant(rows)
        scores = [rerank_scores(model, [(qq, d) for d in c]) for qq, c in zip(queries, candidates)]
    logits = [rerank_scores(model, [(qq, d) for d in g]) for qq, g in zip(group_q, groups)]
    return scores, relevant, logits


def max_lengths(b: dict):
    """(query, passage) token limits: the configured ones, else FlagEmbedding's defaults for the task."""
    default = 512 if b["task"] == "embedder" else 256
    return b["query_max_len"] or default, b["passage_max_len"] or default


def eval_device(hw: dict) -> str:
    """The evaluation's device: one GPU (cuda:0 of the visible ones) on GPU hardware, else the CPU. Not
    devices=None: FlagEmbedding would then take every GPU and start a process pool."""
    return "cuda:0" if require_device(hw) == "cuda" else "cpu"


def evaluate(cfg: dict, model_path: str, eval_path: str, corpus_path) -> dict:
    """recall@k / MRR / nDCG / held-out loss, in fp32 (before and after stay comparable) on the run's device: one
    GPU (cuda:0 of the visible ones) on GPU hardware, else the CPU. Not devices=None: FlagEmbedding would then take
    every GPU and start a process pool."""
    b = cfg["backend"]
    device = eval_device(cfg["hardware"])
    rows = read_jsonl(eval_path)
    corpus = read_jsonl(corpus_path) if corpus_path else None
    queries = [r["query"] for r in rows]
    docs, candidates, relevant = relevance(rows, corpus)
    group_q, groups = loss_groups(rows, int(b["train_group_size"]))

    t0 = time.time()
    if b["task"] == "embedder":
        scores, logits = embedder_scores(cfg, model_path, device, queries, docs, candidates, group_q, groups)
    else:
        scores, relevant, logits = reranker_scores(
            cfg, model_path, device, rows, queries, docs, candidates, relevant, group_q, groups
        )
    m = rank_metrics(scores, relevant, [int(k) for k in b["eval_k"]])
    if logits:
        m["loss"] = group_loss(logits)
    return {
        "metrics": m,
        "queries": len(queries),
        "corpus": len(docs) if docs is not None else None,
        "eval_seconds": round(time.time() - t0, 3),
    }


# ------------------------------------------------------------------------------------------------ after training


def model_facts(cfg: dict, model_path: str) -> dict:
    """Load the saved model with transformers (as FlagEmbedding does) and count its parameters."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    b = cfg["backend"]
    task = b["task"]
    cls = AutoModel if task == "embedder" else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_path, trust_remote_code=bool(cfg["trust_remote_code"]))
    total = sum(p.numel() for p in model.parameters())
    out = {"total_params": total, "trainable_params": total}  # full fine-tuning: every parameter trains
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
    cfg = read_config(args.config)
    run_dir = Path(cfg[RUN_DIR_KEY])
    result = {"stage": args.stage, "model": args.model, "task": cfg["backend"]["task"]}
    if args.stage == "after":
        if not (Path(args.model) / "config.json").exists():
            print(f"embed_eval: no trained model at {args.model} (config.json missing)", file=sys.stderr)
            return 1
        result.update(model_facts(cfg, args.model))
        train = run_dir / "flagembedding_train.json"  # written by the train step (flagembedding_train.py)
        if train.is_file():
            result.update({k: v for k, v in json.loads(train.read_text()).items() if v is not None})
    if not args.no_eval and args.eval_data:
        result.update(evaluate(cfg, args.model, args.eval_data, args.corpus))
        print(f"embed_eval ({args.stage}): " + "  ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items()))
    from finetune.run_dir import atomic_write_json

    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "eval" / f"{args.stage}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
