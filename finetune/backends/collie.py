"""collie backend adapter (being built; see its issue)."""
from __future__ import annotations

from finetune.errors import ConfigError


def check(cfg) -> None:
    pass


def plan(cfg, run_dir, ctx):
    raise ConfigError("backend", "collie", "is not implemented yet in this checkout")


def collect(cfg, run_dir, ctx) -> dict:
    return {}
