"""The one room for other libraries' private APIs. Every touch of an internal of Hydra, OmegaConf, submitit,
transformers, LLaMA-Factory, llama-cpp-python, Collie or the Python runtime goes through a module here, one per
library, so that an upgrade fails in one known place:

    hydra.py          error reporting (run_and_report), the mode probe (Hydra.get_mode), a failed job's exception
    omegaconf.py      walking a config node by key (_get_node)
    submitit.py       the sbatch text submitit would write (_make_submission_file_text)
    transformers.py   the attention implementation switched per batch (config._attn_implementation), a hook around
                      Trainer._save_checkpoint, and the Trainer's _save / _load_from_checkpoint
    flagembedding.py  how FlagEmbedding's Trainers save the tokenizer (_save_processing_class)
    llamafactory.py   the chat template LLaMA-Factory writes for its template (Template._get_jinja_template)
    llama_cpp.py      the token texts of a loaded GGUF (Llama._model)
    python.py         running atexit handlers before a forked step ends (atexit._run_exitfuncs)
    collie.py         the CPU patches that let collie-lm run without a GPU (in Collie's own environment)

Each module names the version it was written for (PINNED, the lock file's pin) and what it touches (TOUCHES);
tests/test_compat.py checks both against what is installed. At run time, ``private`` fails with one line naming
the library, its version and the pinned one when a touched name is gone, and ``guard`` notes once when another
version than the pinned one is installed. Standard library only."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

_noted: set = set()


def installed(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def guard(dist: str, pinned: str, what: str) -> None:
    """A note, once per process and library, when the installed version is not the one ``what`` was written for."""
    have = installed(dist)
    if have != pinned and dist not in _noted:
        _noted.add(dist)
        print(
            f"[finetune] note: {what} uses internals of {dist} {pinned}; {have} is installed (finetune/compat/)",
            file=sys.stderr,
            flush=True,
        )


def private(obj: Any, name: str, dist: str, pinned: str) -> Any:
    """getattr(obj, name) for a private name, or one clear error when this version of the library has none."""
    try:
        return getattr(obj, name)
    except AttributeError:
        owner = getattr(obj, "__name__", type(obj).__name__)
        raise RuntimeError(
            f"{dist} {installed(dist)} has no {owner}.{name}, which finetune/compat/ relies on (written for "
            f"{dist} {pinned}); install the pinned version (requirements*.lock)"
        ) from None
