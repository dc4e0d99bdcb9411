"""Helpers shared by the training recipes (worker side). Generic on purpose: other recipes may import them.

- prompt templates by name (finetune/templates/<name>.json, the alpaca-lora format)
- data: alpaca / sharegpt / messages rows from a .json/.jsonl file or a folder of them
- tokenising with alpaca-lora's label masking (train_on_inputs, cutoff_len + EOS), cached in the run folder
- callbacks: history.jsonl writer with real tokens/s (unmasked target tokens) and peak RSS
- merge helper: base + adapter -> merged model folder with the tokenizer files copied

torch / transformers / peft are imported inside the functions that need them; the module itself is stdlib only.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
IGNORE_INDEX = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def log(msg: str) -> None:
    """Plain log lines (the launcher writes them to <run>/logs/<step>.log); rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_config(path: str) -> dict:
    """The run's resolved_config.json (written by the driver, secrets redacted), with the secrets put back from
    this process's environment (finetune/secrets.py)."""
    from finetune.secrets import merge_secrets

    return merge_secrets(json.loads(Path(path).read_text(encoding="utf-8")))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def free_cores() -> int:
    """Cores not already busy (cores minus the 1-minute load average, at least 1). On a shared 2-core machine a
    second compute thread only spins while another process holds the other core: measured here for SmolLM2-135M
    at load average 8, a forward of 8 x 70 tokens took 8.5 s on 1 thread and 18.8 s on 2, greedy generation of 16
    tokens 15.7 s and 86 s."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, int(cores - os.getloadavg()[0] + 0.5)))


def deepspeed_env() -> None:
    """DeepSpeed needs the torchrun environment even for one process: without RANK/WORLD_SIZE it falls into MPI
    discovery (ModuleNotFoundError: mpi4py). torchrun sets them for several processes; this fills them for one."""
    if "RANK" not in os.environ:
        from launchers.process import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def require_device(hw: dict) -> str:
    """The torch device a worker runs on, from the config's hardware.device: 'cpu', or 'cuda' only when this
    process sees a CUDA GPU. A GPU hardware option where the job got no GPU (a Slurm node, a pod, a laptop) fails
    here with one line, instead of training on the CPU in silence."""
    if hw.get("device") != "cuda":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"hardware.device=cuda, but this process sees no CUDA GPU (torch {torch.__version__}, CUDA "
                         f"build {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) "
                         "on " + os.uname().nodename)
    return "cuda"


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------- prompt templates


def load_template(name: str) -> dict:
    path = TEMPLATES / f"{name or 'alpaca'}.json"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES.glob("*.json"))
        raise ValueError(f"prompt_template_name={name!r}: no {path}; known: {', '.join(known)}")
    return json.loads(path.read_text(encoding="utf-8"))


def template_names() -> List[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.json"))


def alpaca_prompt(template: dict, instruction: str, input: Optional[str] = None) -> str:
    """alpaca-lora's Prompter.generate_prompt without the label: prompt_input if input is non-empty."""
    if input:
        return template["prompt_input"].format(instruction=instruction, input=input)
    return template["prompt_no_input"].format(instruction=instruction)


# ---------------------------------------------------------------------------------------------- data


def data_files(path: str) -> List[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix in (".json", ".jsonl") and f.is_file())
    return [p]


def read_rows(path: str) -> List[dict]:
    """Every row of a .json (list) / .jsonl file, or of every such file in a folder (sorted by name)."""
    rows: List[dict] = []
    for f in data_files(path):
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".jsonl":
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows += data if isinstance(data, list) else [data]
    return rows


def row_format(row: dict) -> str:
    if "messages" in row or "conversations" in row:
        return "sharegpt"
    return "alpaca"


_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "function_call": "assistant", "observation": "user", "tool": "user"}


def to_messages(row: dict) -> List[dict]:
    """sharegpt ({conversations: [{from, value}]}) or messages ({messages: [{role, content}]}) -> messages."""
    if "messages" in row:
        return [{"role": _ROLE.get(m["role"], m["role"]), "content": m["content"]} for m in row["messages"]]
    msgs = [{"role": _ROLE.get(m["from"], m["from"]), "content": m["value"]} for m in row["conversations"]]
    if row.get("system"):
        msgs.insert(0, {"role": "system", "content": row["system"]})
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
        if any(label != IGNORE_INDEX for label in ex["labels"][1:]):   # nothing to learn after truncation: drop
            out.append(ex)
    return out


def tokenized_data(cfg: dict, tokenizer, cache_dir: Path = None) -> List[dict]:
    """Rows -> tokenised examples, through the tokenised-dataset cache that sweep jobs share
    (finetune/data_cache.py: <outputs>/cache/tokenized, or $FINETUNE_DATA_CACHE; built once under a lock,
    written atomically). The key is everything that changes the result: data bytes, tokenizer files, template,
    cutoff_len, train_on_inputs, max_samples."""
    from finetune.data_cache import file_digest, get_or_build

    model_dir = Path(cfg["model"]["path"])
    tok_files = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    key = {"data": file_digest(data_files(cfg["data"]["path"])), "tokenizer": file_digest(tok_files),
           "template": load_template(cfg["prompt_template_name"]), "cutoff_len": cfg["cutoff_len"],
           "train_on_inputs": cfg["train_on_inputs"], "max_samples": cfg.get("max_samples"), "v": 2}

    def build() -> List[dict]:
        rows = read_rows(cfg["data"]["path"])
        if cfg.get("max_samples"):
            rows = rows[: int(cfg["max_samples"])]
        return encode_rows(rows, tokenizer, cfg["prompt_template_name"], int(cfg["cutoff_len"]),
                           bool(cfg["train_on_inputs"]))

    info: dict = {}
    examples = get_or_build(key, build, cache_dir=cache_dir, info=info)
    log(f"tokenised data: {'cache hit' if info.get('hit') else 'built'} in {info.get('seconds', 0):.2f} s "
        f"({info.get('path') or 'cache off'})")
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
    (positions restart at 0), after every real token, so the causal block mask already keeps it out."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, batch: List[dict]):
        import torch

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


def target_tokens(labels) -> int:
    """Tokens that are really trained on: labels (after the causal shift) that are not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def input_tokens(inputs, pad_id=None) -> int:
    """Non-padding input tokens of a batch (what other tools count as tokens/s): the attention masks' sum, also for
    nested batches (FlagEmbedding's queries + passages); packed rows (no mask) count every token that is not
    padding or is trained on (a pad id that is also a real token, such as EOS, is trained on)."""
    mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
    if mask is not None:
        return int(mask.sum())
    if hasattr(inputs, "get") and inputs.get("input_ids") is not None:
        ids, labels = inputs["input_ids"], inputs.get("labels")
        real = ids != pad_id if pad_id is not None else ids == ids
        if labels is not None:
            real = real | (labels != IGNORE_INDEX)
        return int(real.sum())
    values = inputs.values() if hasattr(inputs, "values") else inputs if isinstance(inputs, (list, tuple)) else []
    return sum(input_tokens(v, pad_id) for v in values if hasattr(v, "get") or isinstance(v, (list, tuple)))


class TokenMeter:
    """Tokens a training run processes, for the tokens/s in every log event: input tokens (every non-padding token,
    ``tokens_per_s``, what other tools mean) and supervised target tokens (``target_tokens_per_s``), over all
    ranks (this rank's count x world size), per interval between two log events."""

    def __init__(self, world_size: int = 1, pad_id=None):
        self.world, self.pad_id = world_size, pad_id
        self.input = self.target = 0
        self._mark = None                     # (time, input, target) at the start or the last log event

    def count(self, inputs) -> None:
        if self._mark is None:
            self._mark = (time.perf_counter(), 0, 0)
        self.input += input_tokens(inputs, self.pad_id)
        labels = inputs.get("labels") if hasattr(inputs, "get") else None
        if labels is not None:
            self.target += target_tokens(labels)

    def rates(self) -> Dict[str, float]:
        """tokens_per_s and target_tokens_per_s since the last call (or the first counted batch)."""
        if self._mark is None:
            return {}
        now = time.perf_counter()
        t0, i0, g0 = self._mark
        self._mark = (now, self.input, self.target)
        if now <= t0:
            return {}
        out = {"tokens_per_s": (self.input - i0) * self.world / (now - t0)}
        if self.target:
            out["target_tokens_per_s"] = (self.target - g0) * self.world / (now - t0)
        return out


# ---------------------------------------------------------------------------------------------- history callback


def history_callback(run_dir: Path):
    """A TrainerCallback that appends each log event to <run>/history.jsonl (rank 0): every number the Trainer
    logged (loss, learning rate, grad norm, tokens/s, ...), the step out of total_steps (what the driver's progress
    line reads while the step runs) and peak RSS, and prints a plain log line."""
    from transformers import TrainerCallback

    class HistoryCallback(TrainerCallback):
        def __init__(self):
            self.path = Path(run_dir) / "history.jsonl"

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "total_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4)}
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    row[k] = v
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(shown, flush=True)

    return HistoryCallback()


COMPLETE = "FINETUNE_COMPLETE"        # written into checkpoint-N last, once the checkpoint is whole


def last_complete_checkpoint(ckpt_dir: Path):
    """The newest checkpoint-N folder holding the COMPLETE marker (one cut by a kill has none), or None."""
    import re

    found = [(int(p.name.split("-")[1]), p) for p in Path(ckpt_dir).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / COMPLETE).exists()]
    return max(found)[1] if found else None


def truncate_history(run_dir: Path, last_step: int) -> None:
    """On resume: drop history rows logged after the checkpoint we continue from (they will be logged again)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) <= last_step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


# ---------------------------------------------------------------------------------------------- merge


def copy_tokenizer_files(src: Path, dst: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def merge_adapter(base_path: str, adapter_path: str, out_path: str, dtype: str = "float32",
                  trust_remote_code: bool = False, replace: bool = False) -> Path:
    """base + LoRA adapter -> merged model (merge_and_unload), written to a temp folder then renamed, with the
    tokenizer files copied from the adapter folder (or the base model's when the adapter has none).

    An existing non-empty ``out_path`` is never deleted or written into, unless ``replace`` (a resumed run
    replacing the merged model it made itself; validation checked that it is the run's own)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out_path)
    if out.exists() and not replace and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"merge: {out} exists and is not empty; it is not replaced (choose another merge_path)")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype),
                                                trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    model.save_pretrained(tmp)
    src = adapter_path if (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
    copy_tokenizer_files(Path(src), tmp)
    for name in ("generation_config.json", "finetune_prompt.json"):    # what the run saved for generation
        if (Path(adapter_path) / name).is_file():
            shutil.copy2(Path(adapter_path) / name, tmp / name)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():                              # replace: the resumed run's own merged model
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(tmp, out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """python -m finetune.recipes.common merge --base B --adapter A --out O"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m finetune.recipes.common")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="float32")
    m.add_argument("--trust-remote-code", action="store_true")
    m.add_argument("--replace", action="store_true", help="replace the run's own merged model (a resumed run)")
    a = ap.parse_args(argv)
    out = merge_adapter(a.base, a.adapter, a.out, a.dtype, a.trust_remote_code, a.replace)
    log(f"merged {a.adapter} into {a.base} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
