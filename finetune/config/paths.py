"""Where things live, and how the paths a user types are read. Standard library + omegaconf only.

Two rules, applied once, at validation (finetune/config/validate.py), so that every later step (the run folder's
workers, a Slurm job, a reproduction) sees the same absolute paths:

- What the project owns lives under the repository (the folder holding conf/), whatever the working folder:
  run folders in ``outputs/runs`` and ``outputs/multiruns``, the tokenised-data cache in ``outputs/cache``, the
  models it builds itself (tiny random models, SmolLM2 converted from its GGUF file) in ``models/``.
- What you type is relative to the folder you ran the command from: ``output_dir=``, ``model.path=``,
  ``data.path=``, ``merge_path=``, ``backend.deepspeed=``, ... are made absolute against it (``~`` expanded).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.config.root import REPO_ROOT

OUTPUTS_ROOT = REPO_ROOT / "outputs"
MODELS_DIR = REPO_ROOT / "models"

# config keys that hold a path typed by the user (or a default that is already absolute)
PATH_KEYS = (
    "output_dir",
    "target_path",
    "merge_path",
    "model.gguf_file",
    "model.path",
    "data.path",
    "data.eval_path",
    "data.corpus_path",
    "data.dataset_dir",
    "adapter",
    "backend.deepspeed",
    "backend.venv",
)


def absolute(path, base: Path = None) -> Path:
    """``path`` with ``~`` expanded, made absolute against ``base`` (default: the current folder), not resolved
    through symlinks (the user's spelling of a folder is kept)."""
    p = Path(str(path)).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return Path(*_normalise(p.parts))


def _normalise(parts) -> List[str]:
    out: List[str] = []
    for part in parts:
        if part == ".":
            continue
        if part == ".." and len(out) > 1:
            out.pop()
            continue
        out.append(part)
    return out


def resolve_user_paths(cfg: DictConfig, base: Path = None) -> None:
    """Replace every path key's value by its absolute form (in place). Missing keys and nulls stay as they are."""
    with open_dict(cfg):
        for key in PATH_KEYS:
            value = OmegaConf.select(cfg, key, default=None)
            if value is None or value == "":
                continue
            OmegaConf.update(cfg, key, str(absolute(value, base)), merge=False)


def model_cache_dir(builder: str, gguf_file: str = None) -> Path:
    """The folder a model the project builds itself (``model.builder``) is built into, on first use."""
    if builder == "gguf" and gguf_file:
        return Path(gguf_model_dir(gguf_file))
    return MODELS_DIR / builder.replace("_", "-")


def gguf_model_dir(gguf_file: str) -> str:
    """Where ``model=gguf model.gguf_file=F`` is converted to: models/gguf/<stem>-<key>, the key made of the file's
    absolute path, size and modification time (hashing gigabytes at every compose would be slow; the conversion
    records the real sha256)."""
    path = absolute(gguf_file)
    try:
        st = path.stat()
        stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        stamp = f"{path}|missing"
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return str(MODELS_DIR / "gguf" / f"{stem}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}")
