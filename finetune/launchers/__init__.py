"""Launchers: where and how a Plan's steps run. They know nothing of backends.

Each launcher module satisfies finetune.interfaces.Launcher:
    check(cfg)                                         launcher rules (ConfigError), run by the driver
    argv(step, cfg) -> list[str]                       the final command for a step (dry runs show it)
    env(step, cfg) -> dict                             environment added for that step
    plan_files(plan, cfg, run_dir) -> {path: text}     extra files for the run folder (sbatch, k8s manifests; {})
    run_step(step, cfg, run_dir, timeout_s) -> StepResult
"""

from __future__ import annotations

import importlib
from types import ModuleType

from finetune.config.schema import LauncherConfig, choices
from finetune.errors import ConfigError, one_of, suggest

LAUNCHERS = choices(LauncherConfig, "name")


def get_launcher(name: str) -> ModuleType:
    if name not in LAUNCHERS:
        raise ConfigError("launcher", name, one_of(LAUNCHERS), suggest(name, LAUNCHERS))
    try:
        return importlib.import_module(f"finetune.launchers.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"finetune.launchers.{name}":
            raise ConfigError("launcher", name, "is not available in this version") from None
        raise
