"""The merge step: base + LoRA adapter -> a merged model folder (merge_and_unload), with the tokenizer files.

    python -m finetune.recipes.merge --base B --adapter A --out O [--dtype float32] [--replace]

Written to a temp folder, then renamed: a merged model appears only when complete; an existing non-empty folder is
never deleted or written into (--replace: a resumed run replacing its own). Standard library at import."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from finetune.recipes.common import log, quiet_false_tying_warning
from finetune.recipes.data import TOKENIZER_FILES


def copy_tokenizer_files(src: Path, dst: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def merge_adapter(
    base_path: str,
    adapter_path: str,
    out_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    replace: bool = False,
) -> Path:
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
    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    quiet_false_tying_warning(base)
    model = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    model.save_pretrained(tmp)
    src = adapter_path if (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
    copy_tokenizer_files(Path(src), tmp)
    for name in ("generation_config.json", "finetune_prompt.json"):  # what the run saved for generation
        if (Path(adapter_path) / name).is_file():
            shutil.copy2(Path(adapter_path) / name, tmp / name)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():  # replace: the resumed run's own merged model
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(tmp, out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """python -m finetune.recipes.merge --base B --adapter A --out O"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m finetune.recipes.merge")
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--replace", action="store_true", help="replace the run's own merged model (a resumed run)")
    a = ap.parse_args(argv)
    out = merge_adapter(a.base, a.adapter, a.out, a.dtype, a.trust_remote_code, a.replace)
    log(f"merged {a.adapter} into {a.base} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
