"""Run one process: argv list (no shell), output streamed to the terminal and a log file, timeout, signals.

Shared by every launcher that ends in a local process (local, torchrun, and the Slurm job body).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

# in every step's environment, whatever the launcher (a value the step sets itself wins)
STEP_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # a worker that crashes in native code (SIGSEGV, SIGFPE, SIGABRT, SIGBUS) prints every thread's Python stack
    # into its step log first, so the run's error shows where it died
    "PYTHONFAULTHANDLER": "1",
}

# a model this narrow (the project's tiny models) does matmuls too small to split across threads: a second OpenMP
# thread only spins at every barrier, and when another process holds the other core each op waits for a time
# slice. Measured on the 2-core machine, `python train.py backend=collie lora_r=16` (hidden 64): alone 78 s with
# 2 threads, 47 s with 1; two such runs at once 430-520 s each with 2 threads, 44 s with 1.
SINGLE_THREAD_MAX_HIDDEN = 256


def model_hidden(cfg) -> int:
    """The model's hidden size from its config.json, or from the builder's plan for a tiny model that is not built
    yet (0 when neither says)."""
    from finetune.auto.hardware import model_hidden_size

    hidden = model_hidden_size(str(cfg.model.path))
    builder = cfg.model.get("builder") if hasattr(cfg.model, "get") else None
    if not hidden and builder:
        from finetune.tools.tiny_models import planned_config

        hidden = int((planned_config(str(builder)) or {}).get("hidden_size") or 0)
    return hidden


def omp_threads(cfg, cores: int, nproc: int) -> int:
    """OMP_NUM_THREADS for one process of a step: launcher.omp_num_threads when set; 1 for a model of hidden size
    <= SINGLE_THREAD_MAX_HIDDEN off the GPU; else the cores shared out between the step's processes."""
    if int(cfg.launcher.omp_num_threads):
        return int(cfg.launcher.omp_num_threads)
    if str(cfg.hardware.device) != "cuda" and 0 < model_hidden(cfg) <= SINGLE_THREAD_MAX_HIDDEN:
        return 1
    return max(1, cores // max(1, nproc))


@dataclass
class StepResult:
    name: str
    argv: List[str]
    exit_code: Optional[int]
    duration_s: float
    log: str
    status: str  # completed | failed | timeout | killed | interrupted
    tail: List[str] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def record(self) -> dict:
        return {
            "name": self.name,
            "argv": self.argv,
            "exit_code": self.exit_code,
            "status": self.status,
            "duration_s": round(self.duration_s, 3),
            "log": self.log,
            **self.extra,
        }

    def reason(self) -> str:
        if self.status == "timeout":
            return f"step {self.name!r} timed out after {self.duration_s:.0f} s"
        if self.status == "killed":
            return f"step {self.name!r} was killed by signal {-(self.exit_code or 0)}"
        if self.status == "interrupted":
            return f"step {self.name!r} was interrupted"
        return f"step {self.name!r} exited with code {self.exit_code}"


def _last_lines(path: Path) -> List[str]:
    """The lines of a log's last 64 KB ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def tail_of(path: Path, n: int = 20) -> List[str]:
    """The last n lines of a log; when it ends in a native crash, faulthandler's report of it instead."""
    lines = _last_lines(path)
    return crash_report(lines) or lines[-n:]


def crash_report(lines: List[str], limit: int = 25) -> Optional[List[str]]:
    """faulthandler's report (STEP_ENV turns it on): the 5 lines before it, its 'Fatal Python error' line and the
    crashing thread's stack, without the other threads' stacks (gloo and the data loader add several). None when
    the lines hold no report."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error:")]
    if not starts:
        return None
    before, rest = lines[max(0, starts[-1] - 5) : starts[-1]], lines[starts[-1] :]
    current = next((i for i, line in enumerate(rest) if line.startswith("Current thread")), None)
    if current is None:
        return [*before, *rest][:limit]
    stack = [rest[current]]
    for line in rest[current + 1 :]:
        if not line.startswith("  "):
            break
        stack.append(line)
    return [*before, rest[0], *stack][:limit]


def run_process(
    name: str,
    argv: List[str],
    env: Dict[str, str],
    cwd: Optional[str],
    log_path: Path,
    timeout_s: Optional[float] = None,
    echo: bool = True,
    progress: Optional[Path] = None,
    signals: bool = True,
    started: Optional[Callable[[subprocess.Popen], None]] = None,
) -> StepResult:
    """Start argv in its own process group; copy its output to log_path (and our stdout when echo). On a terminal,
    a step that names a progress file (Step.progress) gets a live progress line below its output. ``signals``:
    Ctrl-C / SIGTERM interrupt the step (the driver); off in a Slurm job body, which handles them itself.
    ``started`` receives the child's Popen."""
    from finetune.launchers.progress import live_progress

    live = live_progress(name, progress, echo)
    with live if live is not None else contextlib.nullcontext():
        return _run(name, argv, env, cwd, log_path, timeout_s, echo, live, signals, started)


def _run(name, argv, env, cwd, log_path: Path, timeout_s, echo: bool, live, signals: bool, started) -> StepResult:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    start = time.monotonic()
    tail: deque = deque(maxlen=20)
    caught: List[int] = []  # Ctrl-C / SIGTERM seen while the step runs (installed before the child starts)
    in_main = signals and threading.current_thread() is threading.main_thread()
    old = (
        {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
        if in_main
        else {}
    )
    try:
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    env=full_env,
                    cwd=cwd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:
                log.write(f"cannot start: {e}\n".encode())
                return StepResult(
                    name, argv, 127, 0.0, str(log_path), "failed", [f"cannot start {argv[0]!r}: {e.strerror}"]
                )
            if started is not None:
                started(proc)
            reader = threading.Thread(target=_pump, args=(proc, log, tail, echo, live), daemon=True)
            reader.start()
            status = _wait(proc, caught, start + timeout_s if timeout_s else None)
            reader.join(timeout=10)
            code = proc.returncode
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if status is None:
        status = "completed" if code == 0 else ("killed" if code is not None and code < 0 else "failed")
    # a native crash: faulthandler's report names the frame. Under torchrun the crashed rank's report sits above
    # torchrun's own summary (the step then exits 1), so the whole log's end is searched, not only the last lines.
    lines = (crash_report(_last_lines(log_path)) if status in ("killed", "failed") else None) or list(tail)
    return StepResult(name, argv, code, time.monotonic() - start, str(log_path), status, lines)


def _wait(proc: subprocess.Popen, caught: List[int], deadline: Optional[float]) -> Optional[str]:
    """Wait for the step; "interrupted" (the user's signal is passed on as SIGINT, then SIGKILL), "timeout", or
    None when it ended by itself."""
    while True:
        if caught:
            kill_group(proc, first=signal.SIGINT)
            return "interrupted"
        try:
            proc.wait(timeout=0.2)
            return None
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                kill_group(proc)
                return "timeout"


def _pump(proc: subprocess.Popen, log, tail: deque, echo: bool, live) -> None:
    """Copy the child's output to its log, the tail buffer and (echo) our stdout or the live progress display."""
    for line in iter(proc.stdout.readline, b""):
        log.write(line)
        log.flush()
        text = line.decode("utf-8", "replace").rstrip("\n")
        tail.append(text)
        if echo:
            try:
                if live is not None:
                    live.print(text)
                else:
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
            except (OSError, ValueError):
                pass


def kill_group(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Stop a step's process group: `first` (SIGTERM), then SIGKILL after `grace` seconds."""
    try:
        os.killpg(proc.pid, first)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
