"""Small standard-library helpers the driver and the worker processes share (also Collie's, which runs in its own
environment): atomic file writes and a free TCP port. One definition of each."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    """Write text (UTF-8) to path atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a reader sees the old file or the new one, never
    half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can this port be bound now?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# Set in a step forked from the preloaded process (finetune/launchers/zygote.py) at the fork: the preloaded
# process's resident size, and this process's own resident (and file-backed resident) size then.
FORKED_FROM: dict = {}


def _status(pid="self") -> dict:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...), in bytes; {} without /proc."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def note_forked_from(parent_pid: int) -> None:
    """Called by a forked step first thing: what the preloaded process holds, and what this process starts with."""
    own, parent = _status(), _status(parent_pid)
    if own and parent:
        FORKED_FROM.update(
            preloaded=parent.get("VmRSS", 0), start=own.get("VmRSS", 0), start_file=own.get("RssFile", 0)
        )


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM of /proc/self/status. Not ru_maxrss: Linux carries the
    high-water mark across fork + exec, so a worker started by a large process (a test runner, a notebook) would
    report its parent's peak as its own.

    A step forked from the preloaded process starts with the preloaded process's anonymous pages counted but not
    its libraries' pages (a fork maps those lazily), so its own VmHWM understates what the run holds. What it
    reports instead is what a fresh process's peak would have been: the preloaded process's resident size at the
    fork, plus what this process grew by since, less the library pages it faulted in (already counted in the
    preloaded process's size)."""
    status = _status()
    if "VmHWM" in status:
        if not FORKED_FROM:
            return status["VmHWM"]
        grew = status["VmHWM"] - FORKED_FROM["start"]
        libraries = max(0, status.get("RssFile", 0) - FORKED_FROM["start_file"])
        return FORKED_FROM["preloaded"] + max(0, grew - libraries)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: Linux reports KiB
