"""A local MLflow tracking server and UI for this clone: ``finetune mlflow-server start|stop|url|status``.

    finetune mlflow-server start          # http://127.0.0.1:5000 (or a free port), in the background
    MLFLOW_TRACKING_URI=$(finetune mlflow-server url) python train.py -m lora_r=4,8 report_to=mlflow
    finetune mlflow-server stop

It serves the same store that runs use when no server is set (outputs/mlflow/mlflow.db, artifacts in
outputs/mlflow/artifacts), so runs logged before the server started are in its UI too. The server is full mlflow,
which cannot share the main environment: it runs from .venv-mlflow (scripts/setup_mlflow_env.sh, built on the
first start). It listens on 127.0.0.1 only; artifacts are written by the clients straight into the store's folder
(--no-serve-artifacts), the same as without a server. State: outputs/mlflow/server.json (pid, port, url).

start_server / stop_server are also what the tests' server fixture uses (a real server on a free port, in a
temporary store, stopped by process group whatever happens). Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from finetune.config.resolvers import REPO_ROOT
from finetune.errors import ConfigError
from finetune.osutil import free_port, port_free
from finetune.tracking import LOCAL_STORE

SETUP = REPO_ROOT / "scripts" / "setup_mlflow_env.sh"
LOCK = REPO_ROOT / "requirements-mlflow.lock"
DEFAULT_PORT = 5000


def venv_dir() -> Path:
    p = Path(os.environ.get("FINETUNE_MLFLOW_VENV") or REPO_ROOT / ".venv-mlflow").expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def venv_ready() -> bool:
    import hashlib

    stamp = venv_dir() / ".finetune-lock.sha256"
    return (
        (venv_dir() / "bin" / "mlflow").exists()
        and stamp.is_file()
        and stamp.read_text().strip() == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    )


def ensure_venv() -> Path:
    """The server's environment, built (once per lock, shared by clones) when missing."""
    if not venv_ready():
        code = subprocess.call(["bash", str(SETUP)])
        if code != 0:
            raise RuntimeError(f"bash {SETUP} failed (exit {code})")
    return venv_dir().resolve() / "bin" / "mlflow"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def server_argv(mlflow: Path, store: Path, port: int, host: str = "127.0.0.1") -> list:
    """mlflow server on a SQLite store, artifacts in a local folder beside it, one worker."""
    return [
        str(mlflow),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--default-artifact-root",
        str(store / "artifacts"),
        "--no-serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def start_server(store: Path, port: int = 0, wait_s: float = 180.0) -> dict:
    """Start a server in its own process group (so that stop_server ends every process it forks) and wait until
    /health answers. Returns {pid, port, url, store, log}; raises RuntimeError (with the log tail) if it dies."""
    mlflow = ensure_venv()
    store = Path(store).absolute()
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = store / "server.log"
    # job execution (GenAI judges, trace roll-ups) starts 8 more processes we do not need
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            server_argv(mlflow, store, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(store),
            start_new_session=True,
        )
    info = {"pid": proc.pid, "port": port, "url": f"http://127.0.0.1:{port}", "store": str(store), "log": str(log)}
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if healthy(info["url"], 1.0):
            return info
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}: {_tail(log)}")
        time.sleep(0.2)
    stop_server(info)
    raise RuntimeError(f"the MLflow server did not answer within {wait_s:.0f} s: {_tail(log)}")


def _tail(log: Path, n: int = 5) -> str:
    try:
        return " | ".join(Path(log).read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_server(info: dict, wait_s: float = 20.0) -> None:
    """TERM to the server's process group, then KILL what is left after wait_s."""
    pid = int(info["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                _reap(pid)
                return
            _reap(pid)
            time.sleep(0.2)


def _is_server(pid: int) -> bool:
    """Is pid still an `mlflow server` (and not a process that got its number since)?"""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(c.decode(errors="replace")).name == "mlflow" for c in cmd) and b"server" in cmd


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ------------------------------------------------------------------------------------------ the command


def state_file(store: Path = LOCAL_STORE) -> Path:
    return Path(store) / "server.json"


def running(store: Path = LOCAL_STORE) -> Optional[dict]:
    """The server of this clone, if it is running and answers."""
    try:
        info = json.loads(state_file(store).read_text())
    except (OSError, ValueError):
        return None
    return info if _is_server(int(info.get("pid", 0))) and healthy(str(info.get("url"))) else None


def main(action: str, port: Optional[int] = None) -> int:
    store = LOCAL_STORE
    info = running(store)
    if action == "start":
        if info:
            print(f"mlflow-server: already running: {info['url']} (store {store})")
            return 0
        if port is None:
            port = DEFAULT_PORT if port_free(DEFAULT_PORT) else 0
        elif port and not port_free(port):
            raise ConfigError("--port", port, "is in use; choose another port, or --port 0 for a free one")
        version = next((ln.split("==")[1] for ln in LOCK.read_text().splitlines() if ln.startswith("mlflow==")), "?")
        print(f"mlflow-server: starting MLflow {version} on store {store}", flush=True)
        info = start_server(store, port or 0)
        from finetune.run_dir import atomic_write_json

        atomic_write_json(state_file(store), info)
        print(f"mlflow-server: running: {info['url']} (pid {info['pid']}, log {info['log']})")
        print(
            f"mlflow-server: log runs to it: MLFLOW_TRACKING_URI={info['url']} python train.py report_to=mlflow  "
            "(runs without MLFLOW_TRACKING_URI write to the same store; both show here)"
        )
        return 0
    if action == "url":
        if not info:
            raise ConfigError(
                "mlflow-server",
                "url",
                "no MLflow server of this clone is running (start one: finetune mlflow-server start)",
            )
        print(info["url"])
        return 0
    if action == "status":
        print(f"mlflow-server: running: {info['url']} (pid {info['pid']})" if info else "mlflow-server: not running")
        return 0 if info else 1
    if action == "stop":
        try:
            saved = json.loads(state_file(store).read_text())
        except (OSError, ValueError):
            print("mlflow-server: not running")
            return 0
        if _is_server(int(saved.get("pid", 0))):
            stop_server(saved)
        state_file(store).unlink(missing_ok=True)
        print(f"mlflow-server: stopped (pid {saved.get('pid')}); the store stays in {store}")
        return 0
    raise ConfigError("mlflow-server", action, "one of start, stop, status, url")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
