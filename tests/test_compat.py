"""Other libraries' private APIs are touched only in finetune/compat/, one module per library, each written for the
version the lock files pin: an upgrade fails here, in one known place. In-process, no runs."""

from __future__ import annotations

import importlib
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN = (
    "hydra",
    "omegaconf",
    "submitit",
    "transformers",
    "llamafactory",
    "flagembedding",
)  # installed in the main environment
LOCKS = {"llama_cpp": "requirements-llamacpp.lock", "collie": "requirements-collie.lock"}


def _pin(lock: str, dist: str) -> str:
    text = (REPO / lock).read_text(encoding="utf-8")
    found = re.search(rf"^{re.escape(dist)}==(\S+)$", text, re.M | re.I)
    assert found, f"{dist} is not pinned in {lock}"
    return found.group(1)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("name", MAIN)
def test_main_environment_internals_are_where_compat_expects_them(name):
    mod = importlib.import_module(f"finetune.compat.{name}")
    assert mod.PINNED == _pin("requirements.lock", mod.DIST), "compat's pin is not the lock file's"
    assert metadata.version(mod.DIST) == mod.PINNED, f"{mod.DIST} {metadata.version(mod.DIST)} is installed"
    for dotted in mod.TOUCHES:
        _resolve(dotted)  # AttributeError / ImportError: the internal moved; change finetune/compat/{name}.py


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_tool_environment_internals_are_pinned_by_their_lock(name):
    mod = importlib.import_module(f"finetune.compat.{name}")
    assert mod.PINNED == _pin(LOCKS[name], mod.DIST)
    for dist, version in getattr(mod, "ALSO_PINNED", {}).items():
        assert version == _pin(LOCKS[name], dist)


def test_python_internals():
    from finetune.compat import python

    assert f"{sys.version_info[0]}.{sys.version_info[1]}" == python.PINNED
    for dotted in python.TOUCHES:
        _resolve(dotted)


# names of other libraries' internals: touched (as an attribute) only inside finetune/compat/
PRIVATE = (
    "run_and_report",
    "get_mode",
    "_return_value",
    "_get_node",
    "_make_submission_file_text",
    "_attn_implementation",
    "_save_checkpoint",
    "_save",
    "_load_from_checkpoint",
    "_save_processing_class",
    "_get_jinja_template",
    "_model",
    "_run_exitfuncs",
    "_initialize_affine_weight_cpu",
)


def test_no_private_api_outside_compat():
    """No attribute access or definition of those names in finetune/ outside compat/ (the code, not its prose)."""
    import ast

    found = []
    for path in sorted((REPO / "finetune").rglob("*.py")):
        if path.parent.name == "compat":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "name", None)
            if isinstance(node, (ast.Attribute, ast.FunctionDef)) and name in PRIVATE:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{name}")
    assert not found, "private APIs outside finetune/compat/:\n" + "\n".join(found)


def test_train_py_runs_nothing_at_import():
    """Importing train.py registers nothing, patches nothing and leaves sys.argv alone."""
    import runpy

    argv = list(sys.argv)
    sys.argv[:] = ["train.py", "resume=true"]
    try:
        ns = runpy.run_path(str(REPO / "train.py"), run_name="not_main")
        assert sys.argv == ["train.py", "resume=true"] and callable(ns["main"])
    finally:
        sys.argv[:] = argv
