"""Shared test helpers.

- ``run_train(*overrides, outputs=...)`` runs ``python train.py`` as a subprocess (the way users run it) with
  outputs redirected to a temp folder, and returns the CompletedProcess plus the run folder.
- Tiny models are built once into ``models/`` (a cache shared with the default job) by ``tiny_model``.
- Markers: slow (real training), gpu (skipped here), slurm, collie, optuna (skipped with a reason when the
  tool is missing). ``--strict-markers`` is on.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def train_env(outputs: Path, **extra) -> dict:
    env = dict(os.environ)
    env["FINETUNE_OUTPUTS"] = str(outputs)
    env.setdefault("FINETUNE_MODELS", str(REPO / "models"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(*overrides: str, outputs: Path, timeout: float = 900, env: dict | None = None, multirun=False):
    """Run train.py; return (CompletedProcess, newest run folder or None)."""
    argv = [PY, str(REPO / "train.py"), *(["-m"] if multirun else []), *overrides]
    proc = subprocess.run(argv, cwd=str(REPO), env={**train_env(outputs), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    runs = sorted(glob.glob(str(outputs / "runs" / "*" / "*")), key=os.path.getmtime)
    return proc, (Path(runs[-1]) if runs else None)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_model():
    """Build (once) and return the path of a tiny model by builder name."""
    from finetune.tools.tiny_models import build

    def get(name: str = "tiny_llama") -> Path:
        folder = {"tiny_llama": "tiny-llama", "tiny_llama_30m": "tiny-llama-30m", "tiny_bert": "tiny-bert"}[name]
        return build(name, str(REPO / "models" / folder))

    return get
