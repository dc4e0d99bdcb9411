"""What validation needs to know about a model before anything heavy is imported: read from the folder's
config.json / tokenizer files, or, for a model the project builds on first use and has not built yet, from the
builder's declared facts (finetune/tools/gguf_model.py BUILDERS). Standard library only.

Used by the checks that follow the model rather than its family: tied embeddings (PEFT's modules_to_save and
LoRA targets), rope settings (Collie), and the special tokens a LLaMA-Factory template needs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List, Optional, Set

EMBEDDING_NAMES = (
    "embed_tokens",
    "lm_head",
    "wte",
    "word_embeddings",
    "tok_embeddings",
    "output",
    "output_layer",
    "embed_out",
)


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _builder_facts(model, part: str) -> dict:
    """A model built on first use: what its builder's plan says ("config": the config.json it will write, from
    the builder's declared shape (finetune/tools/tiny_models.py planned_config) or, for a GGUF file you hold, from
    the file's own metadata; "tokenizer": the declared special tokens). The first run and every later run read the
    same facts, so they compose the same config."""
    builder = model.get("builder")
    if not builder:
        return {}
    if part == "config":
        if builder == "gguf":
            from finetune.config.model_builds import gguf_config

            return gguf_config(model.get("gguf_file"))
        from finetune.config.model_builds import planned_config

        return dict(planned_config(str(builder)) or {})
    from finetune.config.model_builds import BUILDERS

    return dict((BUILDERS.get(str(builder)) or {}).get(part) or {})


def model_config(model) -> dict:
    """config.json of the model folder, else the builder's declared config, else {}."""
    meta = _read(Path(str(model.path)) / "config.json")
    return meta if meta is not None else _builder_facts(model, "config")


def hidden_size(model) -> int:
    """The model's hidden size (config.json's hidden_size / d_model / n_embd, or the builder's plan); 0 unknown."""
    c = model_config(model)
    try:
        return int(c.get("hidden_size") or c.get("d_model") or c.get("n_embd") or 0)
    except (TypeError, ValueError):
        return 0


def tied_embeddings(model) -> bool:
    """Does the model share one matrix between its input embedding and its output layer?"""
    return bool(model_config(model).get("tie_word_embeddings", False))


def rope(model) -> tuple:
    """(rope base, rope type, scaling) as config.json states them (transformers 5 nests them in rope_parameters)."""
    meta = model_config(model)
    params = meta.get("rope_parameters") or {}
    theta = meta.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), str(params.get("rope_type", "default")), meta.get("rope_scaling")


# the module names a Hugging Face model of these types has (planning before a model built on first use exists)
PLANNED_MODULES = {
    "llama": {
        "embed_tokens",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "lm_head",
    },
    "bert": {
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "LayerNorm",
        "query",
        "key",
        "value",
        "dense",
    },
}


def _tensor_names(folder: Path) -> Optional[List[str]]:
    """The weight names of a model folder, read from the safetensors headers (or their index) without torch; None
    when the weights are in another format (.bin, .gguf) or cannot be read."""
    index = _read(folder / "model.safetensors.index.json")
    if index is not None and isinstance(index.get("weight_map"), dict):
        return list(index["weight_map"])
    names: List[str] = []
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        names += [k for k in header if k != "__metadata__"]
    return names or None


def module_names(model) -> Optional[Set[str]]:
    """Every module name (each dotted segment of the weight names, without the parameter's own name) of the model:
    what lora_target_modules and modules_to_save may name. From the weights' headers, or the builder's plan of a
    model not built yet; None when neither tells (the check is then left to the worker)."""
    folder = Path(str(model.path))
    names = _tensor_names(folder) if folder.is_dir() else None
    if names is not None:
        found = {seg for n in names for seg in n.split(".")[:-1] if not seg.isdigit()}
        # a tied output layer has no weight of its own in the file (it is the embedding): the module is there
        return found | ({"lm_head"} if tied_embeddings(model) and "embed_tokens" in found else set())
    if not (folder / "config.json").is_file() and model.get("builder"):
        return PLANNED_MODULES.get(str(model_config(model).get("model_type")))
    return None


def embedding_names(model) -> Set[str]:
    """Names that denote the input embedding or the output layer (the family's own, and the common ones)."""
    return set(EMBEDDING_NAMES) | {str(n) for n in (model.get("embedding_modules") or [])}


def _token(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_tokens(model) -> Optional[Set[str]]:
    """Every token the tokenizer has as ONE id (tokenizer.json's vocabulary and added tokens,
    tokenizer_config.json's added tokens); None when that cannot be read without the tokenizer libraries
    (a sentencepiece-only tokenizer). For a model not built yet: its builder's declared special tokens."""
    folder = Path(str(model.path))
    tj = _read(folder / "tokenizer.json")
    tc = _read(folder / "tokenizer_config.json") or {}
    if tj is None and not folder.exists():
        facts = _builder_facts(model, "tokenizer")
        return set(facts["special_tokens"]) if "special_tokens" in facts else None
    if tj is None:
        return None
    tokens: Set[str] = set()
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        tokens |= set(vocab)
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        tokens |= {v[0] for v in vocab if isinstance(v, list) and v}
    tokens |= {t.get("content") for t in tj.get("added_tokens") or [] if isinstance(t, dict)}
    tokens |= {_token(t) for t in (tc.get("added_tokens_decoder") or {}).values()}
    tokens.discard(None)
    return tokens


def special_token(model, role: str) -> Optional[str]:
    """The tokenizer's bos_token / eos_token / pad_token string (tokenizer_config.json), or the builder's fact."""
    tc = _read(Path(str(model.path)) / "tokenizer_config.json")
    if tc is not None:
        return _token(tc.get(role))
    return _builder_facts(model, "tokenizer").get(role)


def has_chat_template(model) -> bool:
    folder = Path(str(model.path))
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tc = _read(folder / "tokenizer_config.json")
    if tc is not None:
        return bool(tc.get("chat_template"))
    return bool(_builder_facts(model, "tokenizer").get("chat_template"))
