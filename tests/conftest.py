"""Shared test helpers.

- ``run_train(*overrides, outputs=...)`` runs ``python train.py`` as a subprocess, the way users run it (their
  environment, no FINETUNE_* variables), isolated the way a user would (``output_dir=`` / ``hydra.sweep.dir=``),
  and returns the CompletedProcess plus the run folder.
- Tiny models are built by the runs themselves on first use, into ``models/`` (as for a user); ``tiny_model``
  builds one for tests that load it directly.
- ``mlflow_server``: a real MLflow tracking server (SQLite store, local artifact folder, a free localhost port, from
  its own environment .venv-mlflow, built on first use), stopped by process group whatever happens.
- Markers: slow (real training), gpu (skipped here), slurm, collie, optuna (skipped with a reason when the
  tool is missing). ``--strict-markers`` is on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.config.overrides import typed_keys

# absl's log handler (imported by rouge-score, so by tests that score generations in-process) keeps the sys.stderr
# it found at import, and closes that stream when a logging.config.dictConfig (Hydra's, in in-process runs) closes
# every handler while sys.stderr is another object: under pytest's capture, the stream it closes is pytest's own,
# and every later test of that worker errors with "I/O operation on closed file". Bound to sys.__stderr__, absl
# never closes it.
try:
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
FINETUNE = str(Path(PY).parent / "finetune")  # the console script, as users type it


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install means no GPU tests, not a failed collection
        return False


# The files with the longest runs, longest first (CI's timings). Each file runs on one worker (--dist loadfile, so
# that its module fixtures are shared) and scripts/test.sh turns off xdist's own order (by number of tests): a
# long file started last would keep one worker busy while the other idles. Within a file, the order is kept.
LONGEST_FIRST = [
    "test_readme.py",
    "test_readme_sweeps.py",
    "test_llamafactory.py",
    "test_alpacalora.py",
    "test_tracking.py",
    "test_collie.py",
    "test_smollm2.py",
    "test_flagembedding.py",
    "test_launchers.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# a tiny alpacalora job: 12 optimizer steps of 8 rows (2 micro-batches of 4), a fixed held-out set of 32 rows
TINY_JOB = [
    "max_samples=160",
    "val_set_size=32",
    "batch_size=8",
    "micro_batch_size=4",
    "max_steps=12",
    "learning_rate=1e-3",
    "logging_steps=1",
    "eval_steps=12",
    "report_to=none",
]
_README_TIMES: list = []
_COSTS: list = []  # (CPU seconds, wall seconds, test id): what each test costs, whatever else shares the cores


def _cpu_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._cost_start = (time.monotonic(), _cpu_seconds())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """CPU time of the test and of every process it waited for (runs, their zygotes and steps): unlike wall time,
    it does not grow when the other worker or another program shares the cores. Recorded on the teardown report."""
    if call.when == "teardown" and hasattr(item, "_cost_start"):
        t0, c0 = item._cost_start
        item.user_properties.append(("cost", (round(_cpu_seconds() - c0, 1), round(time.monotonic() - t0, 1))))
    yield


def pytest_runtest_logreport(report):
    """The README commands' wall times (tests/test_readme*.py record them) and every test's cost, for the tables at
    the end."""
    props = dict(report.user_properties)
    if report.when == "call" and "readme_command" in props:
        _README_TIMES.append((props["readme_command"], props.get("exit"), props.get("seconds"), report.outcome))
    if report.when == "teardown" and "cost" in props:
        _COSTS.append((*props["cost"], report.nodeid))


def pytest_terminal_summary(terminalreporter):
    """The 20 costliest tests (CPU seconds of the test and its processes; wall seconds, setup to teardown), and each
    README command as typed, its exit code and wall time on this machine (under the suite's load)."""
    if _COSTS:
        terminalreporter.section("the 20 costliest tests: CPU s (test + its processes), wall s")
        for cpu_s, wall_s, nodeid in sorted(_COSTS, reverse=True)[:20]:
            terminalreporter.write_line(f"{cpu_s:>8} {wall_s:>8}  {nodeid}")
        total = sum(c for c, _, _ in _COSTS)
        terminalreporter.write_line(f"{total:>8.0f} CPU s in all, {len(_COSTS)} tests")
        files: dict = {}
        for cpu_s, wall_s, nodeid in _COSTS:
            f = files.setdefault(nodeid.split("::")[0], [0.0, 0.0, 0])
            f[0], f[1], f[2] = f[0] + cpu_s, f[1] + wall_s, f[2] + 1
        terminalreporter.section("by file: CPU s, wall s, tests")
        for name, (cpu_s, wall_s, n) in sorted(files.items(), key=lambda kv: -kv[1][0]):
            terminalreporter.write_line(f"{cpu_s:>8.0f} {wall_s:>8.0f} {n:>5}  {name}")
    if _README_TIMES:
        terminalreporter.section("README commands: exit code and wall time")
        for command, code, seconds, outcome in _README_TIMES:
            terminalreporter.write_line(f"{seconds:>7} s  exit {code}  {outcome:<7} {command}")


def user_env(**extra) -> dict:
    """The environment a user's shell gives train.py: this one without our own FINETUNE_* settings or
    HYDRA_FULL_ERROR (tests get isolation the way a user would: output_dir=, hydra.sweep.dir=)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") and k != "HYDRA_FULL_ERROR"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(
    *overrides: str,
    outputs: Path | None,
    timeout: float = 900,
    env: dict | None = None,
    multirun=False,
    cwd: Path = REPO,
):
    """Run train.py as a user types it; return (CompletedProcess, the run folder or None).

    ``outputs`` is this test's folder: a single run goes to ``outputs/run`` (``output_dir=``), a sweep to
    ``outputs`` (``hydra.sweep.dir=``), unless the overrides already say where; ``outputs=None`` leaves the
    default folders (the repository's outputs/)."""
    keys = set(typed_keys(overrides))
    sweep = multirun or "hydra.mode=MULTIRUN" in overrides or bool(keys & {"sweep", "hparams_search"})
    where = []
    if outputs is not None and sweep and "hydra.sweep.dir" not in keys:
        where = [f"hydra.sweep.dir={outputs}"]
    elif outputs is not None and not sweep and "output_dir" not in keys:
        where = [f"output_dir={Path(outputs) / 'run'}"]
    argv = [PY, str(REPO / "train.py"), *(["-m"] if multirun else []), *overrides, *where]
    proc = subprocess.run(
        argv, cwd=str(cwd), env=user_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )
    found = re.findall(r"^\[finetune\] backend=\S+ run folder: (.+)$", proc.stdout, re.M)
    run = Path(found[-1]) if found and not sweep else None
    return proc, (run if run is not None and (run / "manifest.json").exists() else None)


def start_train(*overrides: str, env: dict, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`python train.py OVERRIDES` started in the background from the repo root, its output piped as text."""
    return subprocess.Popen(
        [PY, str(REPO / "train.py"), *overrides],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def signal_workers(recipe: str, run_dir: Path, sig=9, one_rank=False, wait_s: float = 180) -> int:
    """Send sig to the worker processes of one run (the recipe module, the run folder on the command line): never
    to another test's workers. ``one_rank``: only one rank's process, never torchrun's agent. Waits up to wait_s for
    them to exist (a step forked from the preloaded process starts once its imports are done). Returns how many
    were signalled."""
    deadline = time.monotonic() + wait_s
    while True:
        n = _signal_workers(recipe, run_dir, sig, one_rank)
        if n or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def _signal_workers(recipe: str, run_dir: Path, sig, one_rank) -> int:
    n = 0
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if one_rank and b"torch.distributed.run" in cmd:
            continue
        if f"finetune.recipes.{recipe}".encode() in cmd and str(run_dir).encode() in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), sig)
                n += 1
            if one_rank and n:
                break
    return n


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def run_in_terminal(argv, cwd=None, answers=(), timeout: float = 600) -> str:
    """Run argv under a pseudo-terminal, as in a user's terminal (COLUMNS=120), with the user's
    environment; each of ``answers`` is typed once a prompt (`you> ` or `...> `) shows. Returns the screen."""
    import pty
    import select
    import signal

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec with the user's environment
        if cwd is not None:
            os.chdir(cwd)
        os.execve(argv[0], argv, user_env(COLUMNS="120"))
    out, deadline, todo = b"", time.time() + timeout, list(answers)
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                out += data
            if todo and out.rstrip().endswith((b"you>", b"...>")):
                os.write(fd, (todo.pop(0) + "\n").encode())
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.waitpid(pid, 0)
    return out.decode("utf-8", "replace").replace("\r\n", "\n")


def refusal(*overrides: str, outputs: Path) -> tuple:
    """(exit code, message) train.py gives for these overrides, found in-process: Hydra's compose, then every check
    of finetune.run.prepare, errors turned into the one line by finetune.cli.classify. 0 and "" when accepted.
    About 0.3 s a case instead of a process start; the exit-code / one-line / nothing-written contract itself is
    run as a user would in tests/test_validation.py."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from finetune.cli import classify, setup
    from finetune.run import prepare

    setup()
    GlobalHydra.instance().clear()
    typed = [f"output_dir={outputs / 'run'}", *overrides]
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=typed)
        prepare(cfg, typed)
    except Exception as e:  # noqa: BLE001 - every refusal, as the CLI reports it
        return classify(e)
    finally:
        GlobalHydra.instance().clear()
    return 0, ""


@pytest.fixture(scope="session")
def tiny_model():
    """Build (once) and return the path of a tiny model by builder name."""
    from finetune.tools.tiny_models import build

    def get(name: str = "tiny_llama") -> Path:
        folder = {"tiny_llama": "tiny-llama", "tiny_llama_30m": "tiny-llama-30m", "tiny_bert": "tiny-bert"}[name]
        return build(name, str(REPO / "models" / folder))

    return get


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (finetune/tracking/server.py: the same code as `finetune mlflow-server start`):
    SQLite backend store and artifact folder in a temporary folder, on a free port. Yields {url, pid, store, ...}."""
    from finetune.tracking.server import start_server, stop_server

    info = start_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield info
    finally:
        stop_server(info)
