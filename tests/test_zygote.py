"""Steps forked from the preloaded process (finetune/launchers/zygote.py) behave as fresh `python -m` processes:
exit codes, output, working folder, sys.path, environment, threads, signals, timeouts and native crashes, each
step in its own process; what cannot be forked runs as a fresh process and its log says why."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

from finetune.launchers.process import run_process

STEP = """
import os, sys, time
import torch
print("argv", sys.argv[1:], "cwd", os.getcwd(), "path0", sys.path[0], flush=True)
print("cmdline", open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip(), flush=True)
print("threads", torch.get_num_threads(), "X", os.environ.get("X"), "pgid", os.getpgid(0) == os.getpid(), flush=True)
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
if mode == "segv":
    import ctypes
    ctypes.string_at(0)
print("to stderr", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("zygote")
    (d / "zstep.py").write_text(STEP)
    return d


def _run(folder: Path, mode: str, fork=True, **kw):
    env = {"X": "mine", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(REPO)}
    log = folder / f"{mode}-{fork}.log"
    t = time.perf_counter()
    res = run_process(mode, [sys.executable, "-m", "zstep", mode], env, str(folder), log, echo=False, fork=fork, **kw)
    return res, log.read_text(), time.perf_counter() - t


@pytest.mark.slow
def test_forked_step_is_a_fresh_python_m_process(folder):
    res, text, _ = _run(folder, "ok")  # the first one waits for the imports
    zygote = re.search(r"runs as forked from the preloaded process (\d+)", text.splitlines()[1]).group(1)
    assert res.ok and f"argv ['ok'] cwd {folder} path0 {folder}" in text
    assert "threads 1 X mine pgid True" in text and "to stderr" in text
    assert f"cmdline {sys.executable} -m zstep ok" in text  # what ps and top show (and what tests look for)
    res, text, _ = _run(folder, "ok")  # the same preloaded process: its imports are not paid again
    assert res.ok and f"runs as forked from the preloaded process {zygote} " in text
    assert (folder / "preload.log").read_text().count("] imported ") == 1
    res, text, _ = _run(folder, "exit3")
    assert (res.status, res.exit_code) == ("failed", 3)
    res, text, _ = _run(folder, "raise")
    assert (res.status, res.exit_code) == ("failed", 1) and res.tail[-1] == "ValueError: boom"


@pytest.mark.slow
def test_forked_step_timeout_interrupt_and_crash(folder):
    res, _, _ = _run(folder, "sleep", timeout_s=3)
    assert res.status == "timeout" and res.exit_code == -signal.SIGTERM
    threading.Timer(3, os.kill, (os.getpid(), signal.SIGINT)).start()
    res, text, _ = _run(folder, "sleep")
    assert res.status == "interrupted" and "KeyboardInterrupt" in text
    res, text, _ = _run(folder, "segv")
    assert res.status == "killed" and res.exit_code == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in text and any("zstep.py" in line for line in res.tail)


def test_what_cannot_be_forked_runs_fresh_and_says_why(folder, tmp_path):
    res = run_process("c", [sys.executable, "-c", "print('hi')"], {}, str(tmp_path), tmp_path / "c.log", fork=True)
    assert res.ok and "c runs as a fresh process (not a `python -m module` command)" in (tmp_path / "c.log").read_text()
    res, text, _ = _run(folder, "ok", fork=False)
    assert res.ok and "ok runs as a fresh process\n" in text
