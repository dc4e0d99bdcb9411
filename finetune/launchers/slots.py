"""Slots of a parallel local sweep (``hydra/launcher=parallel``, ``hydra.launcher.n_jobs=N``): each job running at
once holds one slot, 0..N-1, for its whole life, and takes that slot's share of the machine: its GPUs (slot k of a
job that uses g GPUs gets the visible GPUs k*g .. k*g+g-1) and its threads (the CPUs divided by N). Standard library
only.

A slot is an exclusive ``flock`` on ``<sweep folder>/.slots/<k>.lock``, taken when the job starts and released when
its process ends or the job finishes (a crashed job never keeps one). Jobs of one sweep never hold the same slot at
the same time, whatever order joblib starts them in; at most N run at once, so a free slot always exists. A dry run
takes no lock and shows the slot the job would get in launch order (job number modulo N).

Everything else runs as slot 0 of 1: a single run, and the jobs of a sequential sweep.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional


@dataclass
class Slot:
    index: int = 0
    of: int = 1  # jobs that run at once
    lock_fd: Optional[int] = field(default=None, repr=False)


_current = Slot()


def current() -> Slot:
    return _current


def parallel_jobs(hydra_launcher) -> int:
    """Jobs a Hydra launcher config runs at once on this machine: joblib's n_jobs (-1: every CPU), else 1."""
    target = str(getattr(hydra_launcher, "_target_", "") or "")
    if "JoblibLauncher" not in target:
        return 1
    n = int(getattr(hydra_launcher, "n_jobs", 1) or 1)
    return max(1, os.cpu_count() or 1) if n < 0 else max(1, n)


def claim(sweep_dir: Path, jobs: int, job_num: int, dry_run: bool) -> Slot:
    """Take this job's slot (see the module docstring) and make it the current one."""
    global _current
    release()
    if jobs <= 1:
        _current = Slot()
        return _current
    if dry_run:
        _current = Slot(job_num % jobs, jobs)
        return _current
    folder = Path(sweep_dir) / ".slots"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for k in range(jobs):
            fd = os.open(folder / f"{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _current = Slot(k, jobs, fd)
            return _current
        time.sleep(0.2)  # a job that just finished is still releasing its slot


def release() -> None:
    """Give the current slot back (the end of a job; also when its process ends)."""
    global _current
    if _current.lock_fd is not None:
        os.close(_current.lock_fd)
    _current = Slot()


def devices_of(slot: Slot, visible: List[str], per_job: int) -> List[str]:
    """The slot's share of the visible GPUs."""
    return visible[slot.index * per_job : (slot.index + 1) * per_job]
