"""Backend adapters: one module per backend, each satisfying finetune.interfaces.Backend (standard library +
omegaconf only at import):

    NOT_USED                            root keys it would ignore -> what to use instead (refused when typed)
    check(cfg)                          backend-specific rules; raise ConfigError (before anything is written)
    plan(cfg, run_dir, ctx) -> Plan     files to write and steps to run (argv lists, env); no side effects
    collect(cfg, run_dir, ctx) -> dict  metrics read back from what the steps wrote

``ctx`` is a finetune.interfaces.PlanContext: facts from validation (data format, rows) and the world size.
Dispatch is on ``cfg.backend.name`` (never on hydra.runtime.choices, which is empty when re-run from a file).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from finetune.errors import ConfigError, one_of, suggest

BACKENDS = ("alpacalora", "llamafactory", "flagembedding", "collie", "auto", "dummy")


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ConfigError("backend", name, one_of(BACKENDS), suggest(name, BACKENDS))
    return importlib.import_module(f"finetune.backends.{name}")
