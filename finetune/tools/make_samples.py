"""Make the shipped sample datasets, deterministically (python -m finetune.tools.make_samples [out_dir]).

Synthetic tasks a tiny model can visibly learn: copy, reverse, sort and add, written as alpaca rows and as
sharegpt / messages conversations, plus preference (dpo/rm), kto, plain-text and a tiny retrieval set, and the
preference pairs of the SmolLM2 preference showcase (pairs_*.json: right answer vs a plausible wrong one).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = (
    "red green blue cat dog sun moon tree bird fish star rock leaf rain snow wind lake hill road ship "
    "gold iron salt milk corn rice bean apple pear plum lime"
).split()


def _task(rng: random.Random):
    kind = rng.choice(["copy", "reverse", "sort", "add"])
    if kind == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return kind, "Add the two numbers.", f"{a} {b}", str(a + b)
    n = rng.randint(2, 5)
    items = [rng.choice(WORDS) for _ in range(n)]
    if kind == "copy":
        return kind, "Copy the words.", " ".join(items), " ".join(items)
    if kind == "reverse":
        return kind, "Reverse the words.", " ".join(items), " ".join(reversed(items))
    return kind, "Sort the words.", " ".join(items), " ".join(sorted(items))


def _wrong(rng: random.Random, kind: str, inp: str, out: str) -> str:
    if kind == "add":
        return str(int(out) + rng.choice([-3, -2, -1, 1, 2, 3]))
    words = out.split()
    rng.shuffle(words)
    cand = " ".join(words)
    return cand if cand != out else " ".join(words + [rng.choice(WORDS)])


def _pair(rng: random.Random) -> dict:
    """A task with its right answer and a plausible wrong one, the mistakes a model makes on these tasks: the input
    copied instead of reversed or sorted, the words reversed instead of copied, a sum off by one."""
    while True:
        kind, ins, inp, out = _task(rng)
        if kind == "add":
            return {"instruction": ins, "input": inp, "chosen": out, "rejected": str(int(out) + rng.choice([-1, 1]))}
        words = inp.split()
        wrong = inp if kind in ("reverse", "sort") else " ".join(reversed(words))
        if wrong != out:
            return {"instruction": ins, "input": inp, "chosen": out, "rejected": wrong}


def make_pairs(out_dir: Path, n_train: int = 256, n_heldout: int = 64, seed: int = 4321) -> None:
    """Preference pairs for DPO / ORPO / SimPO (pairs_train.json, pairs_heldout.json: no prompt in both) and the same
    pairs as KTO rows (pairs_kto_*.json: the chosen answer desirable, the rejected one not; a held-out prompt keeps
    both rows, so the preference evaluation pairs them up again). Their own random stream: the other files stay."""
    rng = random.Random(seed)
    heldout, seen = [], set()
    while len(heldout) < n_heldout:
        p = _pair(rng)
        if (p["instruction"], p["input"]) not in seen:
            seen.add((p["instruction"], p["input"]))
            heldout.append(p)
    train = []
    while len(train) < n_train:
        p = _pair(rng)
        if (p["instruction"], p["input"]) not in seen:
            seen.add((p["instruction"], p["input"]))
            train.append(p)
    for name, pairs in (("train", train), ("heldout", heldout)):
        (out_dir / f"pairs_{name}.json").write_text(json.dumps(pairs, indent=1) + "\n")
        kto = [
            {"instruction": p["instruction"], "input": p["input"], "output": p[k], "kto_tag": k == "chosen"}
            for p in pairs
            for k in ("chosen", "rejected")
        ]
        (out_dir / f"pairs_kto_{name}.json").write_text(json.dumps(kto, indent=1) + "\n")


def make(out_dir: Path, n: int = 320, seed: int = 1234, n_alpaca: int = 1000) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = [_task(rng) for _ in range(n)]
    # tiny_alpaca (the default job's data) has n_alpaca rows: the n shared ones, then more from a second stream,
    # so every other file keeps its rows; 800 training rows give the default job (batch 64) about 25 steps
    extra = random.Random(seed + 1)
    alpaca = [
        {"instruction": ins, "input": inp, "output": out}
        for _, ins, inp, out in rows + [_task(extra) for _ in range(max(0, n_alpaca - n))]
    ]
    (out_dir / "tiny_alpaca.json").write_text(json.dumps(alpaca, indent=1) + "\n")
    share = [
        {"conversations": [{"from": "human", "value": f"{ins}\n{inp}"}, {"from": "gpt", "value": out}]}
        for _, ins, inp, out in rows
    ]
    (out_dir / "tiny_sharegpt.json").write_text(json.dumps(share, indent=1) + "\n")
    with open(out_dir / "tiny_messages.jsonl", "w") as f:
        for _, ins, inp, out in rows:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "You follow instructions exactly."},
                            {"role": "user", "content": f"{ins}\n{inp}"},
                            {"role": "assistant", "content": out},
                        ]
                    }
                )
                + "\n"
            )
    pref = [
        {"instruction": ins, "input": inp, "chosen": out, "rejected": _wrong(rng, k, inp, out)}
        for k, ins, inp, out in rows[:128]
    ]
    (out_dir / "tiny_preference.json").write_text(json.dumps(pref, indent=1) + "\n")
    kto = []
    for k, ins, inp, out in rows[:128]:
        good = rng.random() < 0.5
        kto.append(
            {"instruction": ins, "input": inp, "output": out if good else _wrong(rng, k, inp, out), "kto_tag": good}
        )
    (out_dir / "tiny_kto.json").write_text(json.dumps(kto, indent=1) + "\n")
    with open(out_dir / "tiny_text.jsonl", "w") as f:
        for _, ins, inp, out in rows[:200]:
            f.write(json.dumps({"text": f"{ins} {inp} => {out}"}) + "\n")
    _retrieval(out_dir, rng)
    make_pairs(out_dir)


def _retrieval(out_dir: Path, rng: random.Random) -> None:
    """A tiny retrieval set where word order matters, so fine-tuning has something to learn that generalises.

    For a pair of things (X, Y) the corpus holds both "the X near the Y is A" and "the Y near the X is B"
    (A != B). The query "what colour is the X near the Y" has the first as its positive and the second as its
    hardest negative: a bag-of-words encoder cannot tell them apart (recall@1 about 0.5 for a pretrained
    MiniLM), a fine-tuned one can. Pairs are split between training and the held-out queries, so the held-out
    passages and their twins are never trained on. Files: tiny_embedding_{train,eval,corpus}.jsonl
    (eval rows carry pos_id, an id of the corpus).
    """
    things = (
        "cat dog sun moon tree bird fish star rock leaf rain snow wind lake hill road ship "
        "milk corn rice bean apple pear plum lime"
    ).split()
    colours = ["red", "green", "blue", "yellow", "black", "white", "brown", "grey"]
    all_pairs = [(a, b) for i, a in enumerate(things) for b in things[i + 1 :]]
    pairs = rng.sample(all_pairs, 40)
    corpus, by_pair = [], []
    for k, (x, y) in enumerate(pairs):
        c1, c2 = rng.sample(colours, 2)
        corpus.append({"id": f"p{k}a", "text": f"the {x} near the {y} is {c1}"})
        corpus.append({"id": f"p{k}b", "text": f"the {y} near the {x} is {c2}"})
        by_pair.append(
            [
                {"query": f"what colour is the {x} near the {y}", "pos_id": f"p{k}a", "twin": f"p{k}b"},
                {"query": f"what colour is the {y} near the {x}", "pos_id": f"p{k}b", "twin": f"p{k}a"},
            ]
        )
    text = {c["id"]: c["text"] for c in corpus}
    n_eval = len(pairs) // 4
    eval_q = [q for two in by_pair[:n_eval] for q in two]
    train_q = [q for two in by_pair[n_eval:] for q in two]
    rng.shuffle(train_q)

    train_ids = {q["pos_id"] for q in train_q}

    def row(q, with_id: bool) -> dict:
        # training rows draw their negatives from training passages only: held-out passages stay unseen
        others = [
            c["text"] for c in corpus if c["id"] not in (q["pos_id"], q["twin"]) and (with_id or c["id"] in train_ids)
        ]
        r = {"query": q["query"], "pos": [text[q["pos_id"]]], "neg": [text[q["twin"]]] + rng.sample(others, 6)}
        if with_id:
            r["pos_id"] = q["pos_id"]
        return r

    with open(out_dir / "tiny_embedding_corpus.jsonl", "w") as f:
        for c in corpus:
            f.write(json.dumps(c) + "\n")
    with open(out_dir / "tiny_embedding_train.jsonl", "w") as f:
        for q in train_q:
            f.write(json.dumps(row(q, False)) + "\n")
    with open(out_dir / "tiny_embedding_eval.jsonl", "w") as f:
        for q in eval_q:
            f.write(json.dumps(row(q, True)) + "\n")


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "data" / "samples")
