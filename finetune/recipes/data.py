"""Training data for the recipes: alpaca / sharegpt / messages rows from a .json/.jsonl file or a folder of them,
tokenised with alpaca-lora's label masking (train_on_inputs, cutoff_len + EOS) through the shared data cache, the
held-out split, packing, and the collator. Standard library at import; torch/numpy inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from finetune.datafiles import data_files, read_rows  # noqa: F401 - the one reader (validation's too)
from finetune.recipes.common import IGNORE_INDEX, log
from finetune.recipes.templates import alpaca_prompt, load_template

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def row_format(row: dict) -> str:
    if "messages" in row or "conversations" in row:
        return "sharegpt"
    return "alpaca"


_ROLE = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "user",
    "tool": "user",
}


def to_messages(row: dict) -> List[dict]:
    """sharegpt ({conversations: [{from, value}]}) or messages ({messages: [{role, content}]}) -> messages. A tool
    description (``tools``, from a LLaMA-Factory dataset) goes into the system turn, as LLaMA-Factory's default
    tool format puts it into the system prompt."""
    if "messages" in row:
        msgs = [{"role": _ROLE.get(m["role"], m["role"]), "content": m["content"]} for m in row["messages"]]
    else:
        msgs = [{"role": _ROLE.get(m["from"], m["from"]), "content": m["value"]} for m in row["conversations"]]
    if row.get("system") and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": row["system"]})
    if row.get("tools"):
        from finetune.lfdata import TOOLS_PREFIX

        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + TOOLS_PREFIX + row["tools"]}
        else:
            msgs.insert(0, {"role": "system", "content": TOOLS_PREFIX + row["tools"]})
    return msgs


def _tokenize(tokenizer, text: str, cutoff_len: int, add_eos: bool) -> List[int]:
    """alpaca-lora's tokenize(): truncate to cutoff_len, append EOS if room and asked."""
    ids = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    if add_eos and (not ids or ids[-1] != tokenizer.eos_token_id) and len(ids) < cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def encode_alpaca(row: dict, tokenizer, template: dict, cutoff_len: int, train_on_inputs: bool) -> dict:
    """alpaca-lora's generate_and_tokenize_prompt, with train_on_inputs honoured.

    The full prompt+response always gets EOS (as in the reference); with train_on_inputs=False the prompt's
    tokens (tokenised alone, without EOS) are masked with -100, relying on the prompt being a token prefix.
    """
    prompt = alpaca_prompt(template, row.get("instruction", ""), row.get("input") or None)
    ids = _tokenize(tokenizer, prompt + str(row.get("output", "")), cutoff_len, add_eos=True)
    labels = list(ids)
    if not train_on_inputs:
        n = len(_tokenize(tokenizer, prompt, cutoff_len, add_eos=False))
        labels = [IGNORE_INDEX] * n + labels[n:]
    return {"input_ids": ids, "labels": labels[: len(ids)]}


def encode_messages(messages: List[dict], tokenizer, cutoff_len: int, train_on_inputs: bool) -> dict:
    """A conversation through the model's chat template. With train_on_inputs=False only assistant turns are
    trained: each assistant turn's span is found by rendering the conversation up to it and through it."""

    def render(msgs) -> List[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        return tokenizer(text, add_special_tokens=False, padding=False)["input_ids"]

    ids = render(messages)
    if ids and ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(render(messages[:i])) if i else 0
            end = len(render(messages[: i + 1])) if i + 1 < len(messages) else len(ids)
            labels[start:end] = ids[start:end]
    return {"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len]}


def encode_rows(rows: List[dict], tokenizer, template_name: str, cutoff_len: int, train_on_inputs: bool) -> List[dict]:
    template = load_template(template_name)
    out = []
    for row in rows:
        if row_format(row) == "sharegpt":
            ex = encode_messages(to_messages(row), tokenizer, cutoff_len, train_on_inputs)
        else:
            ex = encode_alpaca(row, tokenizer, template, cutoff_len, train_on_inputs)
        if any(label != IGNORE_INDEX for label in ex["labels"][1:]):  # nothing to learn after truncation: drop
            out.append(ex)
    return out


def tokenized_data(cfg: dict, tokenizer, cache_dir: Path = None, which: str = "train") -> List[dict]:
    """Rows -> tokenised examples, through the tokenised-dataset cache that sweep jobs share
    (finetune/data_cache.py: <outputs>/cache/tokenized, or $FINETUNE_DATA_CACHE; built once under a lock,
    written atomically). The key is everything that changes the result: data bytes (and for datasets of a
    dataset_info.json their entries, mixture and seed), tokenizer files, template, cutoff_len, train_on_inputs,
    max_samples. ``which``: the training rows, or the held-out dataset's (data.eval_dataset)."""
    from finetune import sources
    from finetune.data_cache import file_digest, get_or_build

    model_dir = Path(cfg["model"]["path"])
    tok_files = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    data = sources.fingerprint(cfg)
    key = {
        "data": data["files"] if not sources.registry(cfg["data"]) else {**data, "which": which},
        "tokenizer": file_digest(tok_files),
        "template": load_template(cfg["prompt_template_name"]),
        "cutoff_len": cfg["cutoff_len"],
        "train_on_inputs": cfg["train_on_inputs"],
        "max_samples": cfg.get("max_samples"),
        "v": 2,
    }

    def build() -> List[dict]:
        rows = sources.train_rows(cfg) if which == "train" else sources.eval_rows(cfg)
        return encode_rows(
            rows, tokenizer, cfg["prompt_template_name"], int(cfg["cutoff_len"]), bool(cfg["train_on_inputs"])
        )

    info: dict = {}
    examples = get_or_build(key, build, cache_dir=cache_dir, info=info)
    log(
        f"tokenised data: {'cache hit' if info.get('hit') else 'built'} in {info.get('seconds', 0):.2f} s "
        f"({info.get('path') or 'cache off'})"
    )
    return examples


def split_train_val(examples: List[dict], val_set_size: float, seed: int = 42) -> Tuple[List[dict], List[dict]]:
    """Held-out split with a fixed seed, the same rows as alpaca-lora's
    ``train_test_split(test_size=val_set_size, shuffle=True, seed=42)`` (datasets draws
    ``np.random.default_rng(seed).permutation(n)``: the first k are the test rows, the rest the training rows).
    val_set_size >= 1 is a row count, in (0, 1) a fraction, 0 none."""
    import numpy as np

    n = len(examples)
    k = int(val_set_size) if val_set_size >= 1 else int(np.ceil(val_set_size * n))
    if k <= 0:
        return list(examples), []
    if k >= n:
        raise ValueError(f"val_set_size={val_set_size} leaves no training rows ({n} rows after tokenising)")
    perm = np.random.default_rng(seed).permutation(n)
    return [examples[i] for i in perm[k:]], [examples[i] for i in perm[:k]]


def pack_examples(examples: List[dict], max_len: int, seed: int = 42) -> List[dict]:
    """Packing without cross-contamination: examples (shuffled with a fixed seed) are concatenated greedily into
    rows of at most max_len tokens. Each row carries position_ids that restart at 0 for every example; with no
    attention mask, transformers builds a block-diagonal causal mask from them (masking_utils
    find_packed_sequence_indices; flash-attention's varlen path on GPUs), so no token attends to another example.
    The first label of each example is -100: it would otherwise be predicted from the previous example's last
    token (in an unpacked batch that label is never predicted either, so the trained tokens are the same)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(examples))
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
    for i in order:
        ex = examples[int(i)]
        ids, labels = list(ex["input_ids"][:max_len]), list(ex["labels"][:max_len])
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_len:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
        cur["input_ids"] += ids
        cur["labels"] += [IGNORE_INDEX] + labels[1:]
        cur["position_ids"] += list(range(len(ids)))
        cur["n_examples"] += 1
    if cur["input_ids"]:
        rows.append(cur)
    return rows


class Collator:
    """Pads input_ids (pad id) and labels (-100) to the longest in the batch, a multiple of 8 (as the reference's
    DataCollatorForSeq2Seq(pad_to_multiple_of=8)); right padding with an attention mask.

    Packed rows (with position_ids, see pack_examples) get no attention mask: the padding is a block of its own
    (positions restart at 0), after every real token, so the causal block mask already keeps it out.

    ``flatten=True`` (padding-free, finetune/recipes/padding_free.py): the batch's examples in one row (padded at
    its end to a multiple of 8, the padding a block of its own), position_ids restarting at each example, each
    example's own labels (the Trainer counts its items on them), ``logits_to_keep``: the positions that have a
    target (each example's labels shifted by one; not its last position, nor a masked prompt token), where alone
    the model computes logits, and ``shift_labels``: those targets, which the causal-LM loss takes as they are."""

    def __init__(self, pad_id: int, multiple: int = 8, flatten: bool = False):
        self.pad_id, self.multiple, self.flatten = pad_id, multiple, flatten

    def __call__(self, batch: List[dict]):
        import torch

        if self.flatten and "position_ids" not in batch[0]:
            ids, labels, shift, pos = [], [], [], []
            for b in batch:
                ids += b["input_ids"]
                labels += b["labels"]
                shift += list(b["labels"][1:]) + [IGNORE_INDEX]
                pos += range(len(b["input_ids"]))
            keep = [i for i, t in enumerate(shift) if t != IGNORE_INDEX]
            # the row padded to a multiple of 8, the padding a block of its own: with an odd row length the
            # backward's GEMMs summed in an order that depends on the thread count (measured: 1 vs 2 threads gave
            # different gradients; a multiple of 8 gives the same)
            pad = -len(ids) % self.multiple
            ids += [self.pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            pos += range(pad)
            row = {"input_ids": ids, "labels": labels, "position_ids": pos, "shift_labels": [shift[i] for i in keep]}
            out = {k: torch.tensor([v], dtype=torch.long) for k, v in row.items()}
            out["logits_to_keep"] = torch.tensor(keep, dtype=torch.long)  # the output layer only where a target is
            return out
        n = max(len(b["input_ids"]) for b in batch)
        n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in batch[0]
        mask = None if packed else torch.zeros((len(batch), n), dtype=torch.long)
        pos = torch.zeros((len(batch), n), dtype=torch.long) if packed else None
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            if packed:
                pos[i, :k] = torch.tensor(b["position_ids"])
                pos[i, k:] = torch.arange(n - k)
            else:
                mask[i, :k] = 1
        if packed:
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
