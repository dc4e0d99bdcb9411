"""Run folders and their manifest. Every file is written atomically (temp file in the same folder + rename).

outputs/runs/<date>/<time>-<name>/          one run (python train.py ...)
outputs/multiruns/<date>/<time>/<job>/      one job of a sweep (python train.py -m ...)

Each run folder holds:
  manifest.json          resolved config, overrides as typed, git commit + dirty flag, package versions, Python
                         and platform, seed, sha256 of each data file, steps run (argv, exit code, duration),
                         status (planned/running/completed/failed/interrupted), final metrics
  config.yaml            the resolved config;  resolved_config.json: the same for worker processes
  overrides.yaml         the overrides as typed (replayed by `finetune reproduce`)
  logs/<step>.log        each step's output
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from finetune.config.paths import OUTPUTS_ROOT
from finetune.config.resolvers import REPO_ROOT
from finetune.osutil import atomic_write, atomic_write_json  # noqa: F401 - imported from here by many modules
from finetune.secrets import redact

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "trl",
    "deepspeed",
    "llamafactory",
    "FlagEmbedding",
    "hydra-core",
    "omegaconf",
    "galore-torch",
    "badam",
    "submitit",
    "tokenizers",
    "sentence-transformers",
    "tensorboard",
    "numpy",
)


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return s[:60] or "run"


def default_run_dir(name: str, now: Optional[_dt.datetime] = None) -> Path:
    now = now or _dt.datetime.now()
    return OUTPUTS_ROOT / "runs" / now.strftime("%Y-%m-%d") / f"{now.strftime('%H-%M-%S')}-{slug(name)}"


def create_run_dir(path: Path, resume: bool) -> Path:
    """Create the folder. Never reuse a non-empty folder unless resuming; a clash of default names gets -2, -3."""
    from finetune.errors import ConfigError

    path = Path(path)
    try:
        if resume:
            path.mkdir(parents=True, exist_ok=True)
            return path
    except OSError as e:
        raise ConfigError("output_dir", str(path), f"cannot be created ({e.strerror})") from None
    base, n = path, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            if path.is_dir() and not any(path.iterdir()):
                return path  # an empty folder made for us (Hydra's multirun job folder)
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as e:
            raise ConfigError("output_dir", str(path), f"cannot be created ({e.strerror})") from None


def git_info() -> Dict[str, Any]:
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> Dict[str, Optional[str]]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


class Manifest:
    """The run's manifest.json, rewritten atomically at each change."""

    def __init__(self, run_dir: Path, data: Dict[str, Any]):
        self.path = Path(run_dir) / "manifest.json"
        self.data = data

    @classmethod
    def new(
        cls, run_dir: Path, *, config: dict, overrides, choices: dict, data_facts: dict, seed: int, command: list
    ) -> "Manifest":
        data = {
            "schema": 1,
            "status": "created",
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "run_dir": str(run_dir),
            "command": redact(command),
            "cwd": os.getcwd(),
            "overrides": redact(list(overrides)),
            "choices": choices,
            "seed": seed,
            "git": git_info(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": package_versions(),
            "data": data_facts,
            "config": redact(config),
            "steps": [],
            "metrics": {},
        }
        m = cls(run_dir, data)
        m.save()
        return m

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = Path(run_dir) / "manifest.json"
        return cls(run_dir, json.loads(path.read_text(encoding="utf-8")))

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def update(self, **kw) -> None:
        self.data.update(redact(kw))
        self.save()

    def add_step(self, record: dict) -> None:
        self.data["steps"].append(redact(record))
        self.save()
