"""Run one process: argv list (no shell), output streamed to the terminal and a log file, timeout, signals.

Shared by every launcher that ends in a local process (local, torchrun, and the Slurm job body).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from finetune.recipes.common import PAUSED_EXIT  # noqa: E402 - the workers' side of a pause

# The lines our own code prints in a step (a worker's log() with its time, history rows, tagged lines): these reach
# the terminal; library output (warnings, progress bars, LLaMA-Factory's INFO lines) stays in logs/<step>.log
# (verbose=true: every line). A failed step's last lines are shown whatever they are.
OURS = re.compile(
    r"^(\[\d\d:\d\d:\d\d\] |\[(finetune|llamafactory|collie(_\w+)?|slurm[^\]]*)\] |step=\d+ |setup-collie: |"
    r"embed_eval |dummy finetune|step \d+ loss |built )"
)

# in every step's environment, whatever the launcher (a value the step sets itself wins)
STEP_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # a worker that crashes in native code (SIGSEGV, SIGFPE, SIGABRT, SIGBUS) prints every thread's Python stack
    # into its step log first, so the run's error shows where it died
    "PYTHONFAULTHANDLER": "1",
}


def thread_count(cfg, cpus: int, nproc: int, environment: bool = True) -> Tuple[int, str]:
    """(OMP_NUM_THREADS for each process of a step, why), the same rule on every launcher and backend:

    1. ``launcher.omp_num_threads`` (or the alpacalora backend's ``backend.torch_threads``) when typed;
    2. else ``OMP_NUM_THREADS`` from the user's environment (what a user on a shared machine sets; not for a
       pod, whose environment is not the user's: ``environment=False``);
    3. else the CPUs this step may use (``cpus``: this process's affinity here, the job's cpus_per_task on a
       cluster) shared out between the step's processes and the jobs a parallel sweep runs at once.

    Never the load average: a run started right after another one trains as fast as the first."""
    from finetune.launchers import slots

    if int(cfg.launcher.omp_num_threads or 0) > 0:
        return int(cfg.launcher.omp_num_threads), "launcher.omp_num_threads"
    torch_threads = int(cfg.backend.get("torch_threads") or 0)  # alpacalora's key; the other backends have none
    if torch_threads > 0:
        return torch_threads, "backend.torch_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip() if environment else ""
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS in the environment"
    jobs = slots.current().of
    n = max(1, cpus // max(1, nproc * jobs))
    why = f"{cpus} CPU(s) for this step" + (f" / {nproc} processes" if nproc > 1 else "")
    return n, why + (f" / {jobs} sweep jobs at once" if jobs > 1 else "")


@dataclass
class StepResult:
    name: str
    argv: List[str]
    exit_code: Optional[int]
    duration_s: float
    log: str
    status: str  # completed | failed | timeout | killed | interrupted | paused
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
        if self.status == "paused":
            return f"step {self.name!r} paused on request (a complete checkpoint was saved)"
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
    fork: bool = False,
    preload: Tuple[str, ...] = (),
    header: Tuple[str, ...] = (),
    pause_file: Optional[Path] = None,
    verbose: bool = False,
) -> StepResult:
    """Start argv in its own process group; copy its output to log_path (and our stdout when echo). On a terminal,
    a step that names a progress file (Step.progress) gets a live progress line below its output. ``signals``:
    Ctrl-C / SIGTERM interrupt the step (the driver); off in a Slurm job body, which handles them itself.
    ``started`` receives the child's Popen. ``fork``: started by fork from the preloaded process
    (finetune/launchers/zygote.py, importing ``preload`` first) when the command allows it, else as a fresh
    process; the log's first lines say which, after the command and the ``header`` lines (threads).
    ``pause_file``: the step can pause: the first Ctrl-C / SIGTERM creates this file (the step saves a complete
    checkpoint at the end of its current step and exits PAUSED_EXIT: status "paused"), the second stops it at once.
    After the first, the step's output goes to its log only. The terminal gets the lines our own code prints
    (OURS); ``verbose``: every line."""
    from finetune.launchers.progress import live_progress

    live = live_progress(name, progress, echo)
    with live if live is not None else contextlib.nullcontext():
        return _run(
            name,
            argv,
            env,
            cwd,
            log_path,
            timeout_s,
            "" if not echo else ("all" if verbose else "ours"),
            live,
            signals,
            started,
            fork,
            preload,
            header,
            pause_file,
        )


def _start(argv, full_env: Dict[str, str], cwd, log_path: Path, fork: bool, preload, caught: List[int]):
    """(the step's process, how it was started): forked from the zygote when allowed, else a fresh process."""
    how = "a fresh process"
    if fork:
        from finetune.launchers import zygote

        why = zygote.fork_refusal(argv, full_env)
        if why is None:
            z = zygote.Zygote.get(full_env, log_path.parent / "preload.log")
            try:
                proc = z.spawn(argv, full_env, cwd or os.getcwd(), preload, interrupted=lambda: bool(caught))
                return proc, f"forked from the preloaded process {z.proc.pid} (imports paid once; log {z.log})"
            except zygote.Unavailable as e:
                why = str(e)
        how = f"a fresh process ({why})"
    proc = subprocess.Popen(
        argv,
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, how


def _run(
    name,
    argv,
    env,
    cwd,
    log_path: Path,
    timeout_s,
    echo: str,
    live,
    signals: bool,
    started,
    fork,
    preload,
    header,
    pause_file,
) -> StepResult:
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
            for line in header:
                log.write(f"[finetune] {line}\n".encode())
            log.flush()
            try:
                proc, how = _start(argv, full_env, cwd, log_path, fork, preload, caught)
            except KeyboardInterrupt:
                return StepResult(name, argv, None, time.monotonic() - start, str(log_path), "interrupted", [])
            except OSError as e:
                log.write(f"cannot start: {e}\n".encode())
                return StepResult(
                    name, argv, 127, 0.0, str(log_path), "failed", [f"cannot start {argv[0]!r}: {e.strerror}"]
                )
            log.write(f"[finetune] {name} runs as {how}\n".encode())
            log.flush()
            if started is not None:
                started(proc)
            reader = threading.Thread(target=_pump, args=(proc, log, tail, echo, live, caught), daemon=True)
            reader.start()
            status = _wait(proc, caught, start + timeout_s if timeout_s else None, pause_file)
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


def _wait(proc, caught: List[int], deadline: Optional[float], pause_file: Optional[Path] = None) -> Optional[str]:
    """Wait for the step: "paused" (asked to, it saved a checkpoint and stopped), "interrupted" (the user's signal
    is passed on as SIGINT, then SIGKILL; for a step that can pause, the second signal), "timeout", or None when it
    ended by itself."""
    asked = False
    while True:
        if caught and pause_file is not None and not asked:
            asked = True
            pause_file.touch()
            print(
                "\n[finetune] stopping: the step saves a checkpoint at the end of its current step "
                "(Ctrl-C again stops it at once, unsaved)",
                flush=True,
            )
        if (caught and pause_file is None) or len(caught) >= 2:
            kill_group(proc, first=signal.SIGINT)
            return "interrupted"
        try:
            proc.wait(timeout=0.2)
            if asked:
                return "paused" if proc.returncode == PAUSED_EXIT else "interrupted"
            return None
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                kill_group(proc)
                return "timeout"


def _pump(proc: subprocess.Popen, log, tail: deque, echo: str, live, caught: List[int]) -> None:
    """Copy the child's output to its log, the tail buffer and our stdout or the live progress display (echo
    "ours": the lines our code prints; "all"; "": none); once the user has asked the step to stop, to the log only."""
    for line in iter(proc.stdout.readline, b""):
        log.write(line)
        log.flush()
        text = line.decode("utf-8", "replace").rstrip("\n")
        tail.append(text)
        if echo and not caught and (echo == "all" or OURS.match(text)):
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
