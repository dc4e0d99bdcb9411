"""What a backend and a launcher are, declared: the driver (finetune/run.py) calls these verbs and nothing else, and
tests/test_interfaces.py checks every backend and launcher module against them (what torchtune's
FTRecipeInterface is to its recipes). Standard library only.

A backend is a module of finetune/backends/ (``get_backend(name)``), a launcher a module of finetune/launchers/
(``get_launcher(name)``); a module satisfies a Protocol by defining its names at the top level."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, runtime_checkable


@dataclasses.dataclass
class PlanContext:
    """Facts the driver gives a backend's plan and collect: what validation found in the data (format, rows,
    sampled, composition), the processes per step, and the claimed run folder. backend=auto records its choice in
    ``auto_choice``. Written into resolved_config.json as ``_ctx`` (the workers read the data facts there)."""

    data: Dict[str, Any]
    world_size: int
    run_dir: str
    auto_choice: Optional[Dict[str, Any]] = None

    def as_json(self) -> Dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@runtime_checkable
class Backend(Protocol):
    """A fine-tuning backend (finetune/backends/<name>.py)."""

    # root keys this backend would silently ignore -> what to use instead; refused when typed (run.check_unused_keys)
    NOT_USED: Mapping[str, str]

    def check(self, cfg) -> None:
        """Backend-specific rules on the composed config: raise ConfigError before anything is written."""

    def plan(self, cfg, run_dir: Path, ctx: PlanContext):
        """The run's Plan (finetune/plan.py): files to write and steps to run (argv lists, env); no side effects."""

    def collect(self, cfg, run_dir: Path, ctx: PlanContext) -> dict:
        """Metrics read back from what the steps wrote."""


@runtime_checkable
class Launcher(Protocol):
    """Where and how a plan's steps run (finetune/launchers/<name>.py); launchers know nothing of backends."""

    def check(self, cfg) -> None:
        """Launcher rules (ConfigError), run by the driver after the backend's."""

    def argv(self, step, cfg) -> List[str]:
        """The final command of a step (what a dry run shows)."""

    def env(self, step, cfg) -> Dict[str, str]:
        """Environment added for a step."""

    def plan_files(self, plan, cfg, run_dir: Path) -> Dict[str, str]:
        """Extra files for the run folder ({path: text}: sbatch scripts, k8s manifests); {} when none."""

    def run_step(self, step, cfg, run_dir: Path, timeout_s):
        """Run one step to its end; a StepResult (finetune/launchers/process.py)."""
