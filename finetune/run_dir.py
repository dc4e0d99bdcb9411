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
import fcntl
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
from finetune.run_files import LOCK, MANIFEST
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


# LOCK (run_files): in every run folder, created exclusively when a run claims it, flock-ed while it runs
PAUSE_NAME = ".pause"  # made by the driver on the first Ctrl-C: the training step saves a checkpoint and stops


class RunFolder:
    """A run folder this process has claimed, and the lock it holds on it until the run ends (``release``). The lock
    is an flock on <run>/.finetune.lock: the kernel drops it when the process ends however it ends, so a crashed run
    never leaves a stale lock; the file says which process holds it."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path, self._fd, self.created = path, fd, created

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Nothing was written (planning failed): give the folder back as it was."""
        self.release()
        if self.created:
            try:
                (self.path / LOCK).unlink()
                self.path.rmdir()
            except OSError:
                pass


def claim_run_dir(path: Path, resume: bool, exact: bool) -> RunFolder:
    """Claim the run's folder before anything is planned into it, atomically: a new folder is made with an
    exclusive mkdir (a default name taken by another run started in the same second gets -2, -3, ...); a folder
    that already exists (output_dir=, a sweep job's folder, resume=true) is claimed by creating its lock file
    exclusively. ``exact``: that folder or none (what the user typed, a job folder). The claimed folder is locked
    for the life of the run: a second resume=true of a run that is running is refused."""
    from finetune.errors import ConfigError

    key = "resume" if resume else "output_dir"
    base, n = Path(path), 1
    while True:
        existed = path.exists()
        try:
            path.mkdir(parents=True, exist_ok=exact or resume)
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
            continue
        except OSError as e:
            raise ConfigError("output_dir", str(path), f"cannot be created ({e.strerror})") from None
        flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_EXCL)
        try:
            fd = os.open(path / LOCK, flags, 0o644)
        except FileExistsError:
            if exact:
                raise ConfigError(key, str(path), "was claimed by another run just now; choose a new folder") from None
            n += 1
            path = base.with_name(f"{base.name}-{n}")
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(
                key,
                str(path),
                f"the run in this folder is running ({holder or 'another process'}); wait for it to end or stop it",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()} since {_dt.datetime.now():%Y-%m-%d %H:%M:%S}".encode())
        return RunFolder(path, fd, created=not existed)


def running(path: Path) -> Optional[str]:
    """Who holds the run folder's lock (a run in it is running), or None."""
    try:
        fd = os.open(Path(path) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


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
        self.path = Path(run_dir) / MANIFEST
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
        path = Path(run_dir) / MANIFEST
        return cls(run_dir, json.loads(path.read_text(encoding="utf-8")))

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def update(self, **kw) -> None:
        self.data.update(redact(kw))
        self.save()

    def add_step(self, record: dict) -> None:
        self.data["steps"].append(redact(record))
        self.save()
