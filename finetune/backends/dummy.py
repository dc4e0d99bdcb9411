"""dummy: a placeholder backend. Trains nothing, but runs a real (tiny) process through the same
plan -> launcher -> collect path as every backend, so the plumbing is tested without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.history import read_history
from finetune.plan import Plan, Step
from finetune.run_files import RESOLVED_CONFIG

NOT_USED: dict = {}  # every root key means something here (the chosen backend's rules apply: finetune/run.py)


def check(cfg) -> None:
    if cfg.backend.steps <= 0:
        from finetune.errors import ConfigError

        raise ConfigError("backend.steps", cfg.backend.steps, "must be > 0")


def plan(cfg, run_dir: Path, ctx: dict) -> Plan:
    argv = [sys.executable, "-m", "finetune.recipes.dummy", "--config", str(Path(run_dir) / RESOLVED_CONFIG)]
    return Plan(
        backend="dummy",
        steps=[Step(name="dummy_train", argv=argv, distributed="torchrun")],
        notes=["dummy backend: logs a synthetic loss; no model is trained"],
    )


def collect(cfg, run_dir: Path, ctx: dict) -> dict:
    hist = read_history(run_dir)
    losses = [r["loss"] for r in hist if "loss" in r]
    return {
        "train_loss": losses[-1] if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "steps": len(losses),
    }
