"""Steps started by fork from a process that has already imported torch, transformers and PEFT (a "zygote", as
Android starts its apps), instead of a fresh interpreter that pays those imports again: about 8-10 s a step on a
2-core machine, three to five times in a run (model build, evaluation before, train, merge, evaluation after).

Each step is still its own process: its own process group, environment, working folder, log and exit code; a
crash takes only the step down; its memory is returned when it ends; the zygote never touched CUDA, so a GPU step
starts with a clean CUDA context. What a fresh ``python -m <module> <args>`` would set up, the child sets up:
``sys.argv``, ``sys.path[0]`` (the working folder) and ``PYTHONPATH``, stdin from /dev/null, stdout and stderr to
the pipe the driver reads, faulthandler (``PYTHONFAULTHANDLER``), the OpenMP thread count (``OMP_NUM_THREADS``:
libgomp read it when the zygote loaded torch, so the child calls ``torch.set_num_threads``), fresh random seeds,
and the normal interpreter exit (atexit handlers, flushed streams).

Not multiprocessing's forkserver: it runs a pickled callable rather than a module's ``__main__``, re-imports the
driver's own ``__main__`` (train.py, with Hydra) in every child, and keeps one preload set per process.

Server:  python -m finetune.launchers.zygote --listen-fd N --alive-fd M --preload torch,transformers:Trainer,...
  single-threaded (a selector loop), so a fork never copies a Python lock held by another thread. A request
  (SOCK_SEQPACKET, JSON + the fd for the child's output) may name more modules to import first; they stay
  imported for later steps. When the driver goes away (the alive pipe closes), the server exits.
Client:  Zygote.get(import_env, log).spawn(argv, env, cwd) -> ForkedProcess (pid, stdout, wait, poll,
  returncode: what finetune/launchers/process.py uses of subprocess.Popen).

A step is forked only when it is ``<this python> -m <module> ...`` and its environment differs from the zygote's
only in variables read at run time (threads, ranks, GPUs, our own); else it runs as a fresh process and its log
says why (``fork_refusal``). One zygote per environment of the variables libraries read at import (a
LLaMA-Factory step's HF_HUB_OFFLINE=1, for example), for the life of the driver: all jobs of a sweep share it.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

# modules every recipe of ours imports at its top: loaded once, in the zygote
BASE_PRELOAD = (
    "torch",
    "transformers:Trainer,TrainingArguments,AutoModelForCausalLM,AutoTokenizer,AutoConfig",
    "peft:PeftModel,LoraConfig,get_peft_model",
    "accelerate",
    "datasets",
    "safetensors.torch",
    "deepspeed",  # accelerate imports it in every save_pretrained and Trainer (about 2.5 s)
)
# variables a step may set differently from the zygote: read at run time, not when a library is imported
RUNTIME_ENV = {
    "OMP_NUM_THREADS",  # applied with torch.set_num_threads in the child
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",  # read when CUDA initialises; the zygote never does
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "FORCE_TORCHRUN",
    "TOKENIZERS_PARALLELISM",
    "PYTHONFAULTHANDLER",  # applied with faulthandler.enable in the child
    "PYTHONPATH",  # applied to sys.path in the child
    "TENSORBOARD_LOGGING_DIR",
    "PYTHONUNBUFFERED",
}
RUNTIME_PREFIXES = ("FINETUNE_", "MLFLOW_", "WANDB_")


def import_env(env: Dict[str, str]) -> Dict[str, str]:
    """The part of an environment that libraries may read when they are imported (what a zygote is keyed by)."""
    return {k: v for k, v in env.items() if k not in RUNTIME_ENV and not k.startswith(RUNTIME_PREFIXES)}


def fork_refusal(argv: List[str], env: Dict[str, str]) -> Optional[str]:
    """Why this command cannot be forked from a zygote (None: it can)."""
    if len(argv) < 3 or argv[1] != "-m":
        return "not a `python -m module` command"
    if os.path.realpath(argv[0]) != os.path.realpath(sys.executable) and argv[0] != sys.executable:
        return f"another interpreter ({argv[0]})"
    if argv[2] in ("torch.distributed.run", "torch.distributed.launch"):
        return "torchrun starts its own processes"
    return None


# ------------------------------------------------------------------------------------------------ the server


def _import(spec: str) -> None:
    """'pkg.mod' or 'pkg:Attr,Attr' (lazy modules such as transformers load a submodule per attribute)."""
    import importlib

    name, _, attrs = spec.partition(":")
    mod = importlib.import_module(name)
    for attr in filter(None, attrs.split(",")):
        getattr(mod, attr)


def _python_threads() -> int:
    import threading

    return threading.active_count()


def _child(req: dict, out_fd: int) -> int:
    """In the forked child: become `python -m <module> <args>` in the step's environment; return its exit code."""
    from finetune import osutil

    osutil.note_forked_from(os.getppid())
    import faulthandler
    import random
    import runpy
    import traceback

    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    env, argv = req["env"], req["argv"]
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(env)
    # sys.path as `python -m` builds it: the working folder, then PYTHONPATH, then the interpreter's own
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in sys.path[1:] if p not in extra]
    sys.path[:] = [os.getcwd(), *extra, *rest]
    if env.get("PYTHONFAULTHANDLER"):
        faulthandler.enable(all_threads=True)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    try:  # what ps, top and /proc/<pid>/cmdline show: the step's own command, not the zygote's
        import setproctitle

        setproctitle.setproctitle(" ".join(argv))
    except ImportError:
        pass
    sys.argv = ["-m", *argv[3:]]
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130  # 128 + SIGINT, as a shell reports it
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a fresh interpreter
        traceback.print_exc()
        return 1


def _exit(code: int, conn: Optional[socket.socket] = None) -> None:
    """End the child as an interpreter exit does (non-daemon threads joined, atexit handlers run: TensorBoard,
    logging and multiprocessing flush and stop there; stdio flushed), without tearing down every module of torch
    and transformers object by object, which takes a fresh interpreter 1.5-3.5 s here and changes nothing on disk.
    Tells the driver its peak memory first (what a fresh process's would have been: finetune.osutil)."""
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    from finetune.compat.python import run_exit_handlers

    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if conn is not None:
        from finetune.osutil import peak_rss_bytes

        _send(conn, {"peak_rss_kb": peak_rss_bytes() // 1024})
    os._exit(code & 0xFF if code >= 0 else 1)


def serve(listen_fd: int, alive_fd: int, preload: List[str]) -> int:
    """The zygote's loop. Imports first (a request that arrives meanwhile waits in the socket's queue)."""
    try:  # set up while the process's own environment is intact: setproctitle finds argv's memory through it
        import setproctitle

        setproctitle.getproctitle()
    except ImportError:
        pass
    t0 = time.perf_counter()
    for spec in preload:
        _import(spec)
    print(f"[zygote {os.getpid()}] imported {', '.join(preload)} in {time.perf_counter() - t0:.1f} s", flush=True)
    listener = socket.socket(fileno=listen_fd)
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops the steps; its exit stops us
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(alive_fd, selectors.EVENT_READ, "alive")
    sel.register(sig_r, selectors.EVENT_READ, "signal")
    children: Dict[int, socket.socket] = {}
    while True:
        for key, _ in sel.select():
            if key.data == "alive":
                return 0  # the driver is gone (its children are in their own process groups and go on)
            if key.data == "signal":
                try:
                    os.read(sig_r, 4096)
                except BlockingIOError:
                    pass
                _reap(children)
                continue
            got = _request(listener, preload)
            if got is None:
                continue
            conn, req, out_fd = got
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the step
                listener.close()
                sel.close()
                for c in children.values():
                    c.close()
                for fd in (sig_r, sig_w, alive_fd):
                    os.close(fd)
                _exit(_child(req, out_fd), conn)
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass  # the child did it first
            os.close(out_fd)
            if not _send(conn, {"pid": pid}):  # the driver gave up waiting: stop the step it will not watch
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            children[pid] = conn


def _request(listener: socket.socket, preload: List[str]):
    """(connection, request, the child's output fd) of the next step, or None when it cannot be forked (the
    client is told why and runs it as a fresh process)."""
    conn, _ = listener.accept()
    fds: List[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
        req = json.loads(data.decode())
        if len(fds) != 1:
            raise ValueError(f"expected one file descriptor, got {len(fds)}")
        for spec in req.get("preload", []):
            if spec not in preload:
                _import(spec)
                preload.append(spec)
        if _python_threads() > 1:
            raise RuntimeError(f"{_python_threads()} Python threads in the zygote: a fork could copy a held lock")
        return conn, req, fds[0]
    except Exception as e:  # noqa: BLE001 - the client runs the step as a fresh process instead
        _send(conn, {"error": f"{type(e).__name__}: {e}"})
        conn.close()
        for fd in fds:
            os.close(fd)
        return None


def _reap(children: Dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, {"returncode": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss})
            conn.close()


def _send(conn: socket.socket, msg: dict) -> bool:
    try:
        conn.send(json.dumps(msg).encode())
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ the client


class Unavailable(RuntimeError):
    """The zygote cannot run this step (it failed to start, or refused): run it as a fresh process."""


class ForkedProcess:
    """What finetune/launchers/process.py uses of subprocess.Popen, for a step forked by the zygote."""

    def __init__(self, conn: socket.socket, stdout, pid: int):
        self.conn, self.stdout, self.pid = conn, stdout, pid
        self.returncode: Optional[int] = None
        self.maxrss_kb = 0  # the child's peak RSS (wait4), once it has ended
        self.peak_rss_kb = 0  # what the step reported as it exited (a fresh process's peak: finetune.osutil)
        self.args = None

    def send_signal(self, sig: int) -> None:
        """To the step's process group (its own: the zygote made it a group leader)."""
        try:
            os.killpg(self.pid, sig)
        except OSError:
            pass

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._read(0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self._read(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(["<forked step>"], timeout)
        return self.returncode

    def _read(self, timeout: Optional[float]) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.conn, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return
        finally:
            sel.close()
        while True:
            data = self.conn.recv(65536)
            if not data:  # the zygote died: the step is orphaned; stop it and call it killed
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.returncode = -signal.SIGKILL
                break
            msg = json.loads(data.decode())
            if "peak_rss_kb" in msg:  # the step's last word, sent as it exits: its return code follows
                self.peak_rss_kb = int(msg["peak_rss_kb"])
                continue
            self.returncode, self.maxrss_kb = int(msg["returncode"]), int(msg.get("maxrss_kb") or 0)
            if self.peak_rss_kb:  # the kernel's figure leaves out the libraries the fork shares
                self.maxrss_kb = self.peak_rss_kb
            break
        self.conn.close()


class Zygote:
    """A running zygote, started on first use; one per import environment for the life of this process."""

    _running: Dict[str, "Zygote"] = {}
    _ids = itertools.count()

    def __init__(self, env: Dict[str, str], log: Path, preload=BASE_PRELOAD):
        # an abstract socket (Linux): no file to clean up; its name is what a step gets in FINETUNE_ZYGOTE
        self.address = f"finetune-zygote-{os.getpid()}-{next(self._ids)}-{time.time_ns()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind("\0" + self.address)
        listener.listen(64)
        alive_r, self._alive_w = os.pipe()
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "finetune.launchers.zygote", "--listen-fd", str(listener.fileno())]
                + ["--alive-fd", str(alive_r), "--preload", ";".join(preload)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(), alive_r),
                start_new_session=True,
            )
        os.close(alive_r)
        listener.close()
        self.env = dict(env)

    @classmethod
    def connect(cls, address: Optional[str]) -> Optional["Zygote"]:
        """The zygote a forked step came from (its FINETUNE_ZYGOTE), for commands the step starts itself; None when
        the step was not forked."""
        if not address:
            return None
        z = cls.__new__(cls)
        z.address, z.proc, z.log, z.env = address, None, None, {}
        return z

    @classmethod
    def get(cls, env: Dict[str, str], log: Path) -> "Zygote":
        """The zygote for this import environment (started now, in the background, when there is none)."""
        key = json.dumps(import_env(env), sort_keys=True)
        z = cls._running.get(key)
        if z is None or z.proc.poll() is not None:
            if not cls._running:
                import atexit

                atexit.register(cls.stop_all)  # ends with this process, and is waited for (no orphan left)
            z = cls._running[key] = cls(env, log)
        return z

    @classmethod
    def stop_all(cls) -> None:
        for z in cls._running.values():
            z.stop()
        cls._running.clear()

    def stop(self) -> None:
        try:
            os.close(self._alive_w)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _ended(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def spawn(
        self, argv: List[str], env: Dict[str, str], cwd: str, preload=(), interrupted=lambda: False, stdout_fd=None
    ):
        """Fork argv; returns a ForkedProcess once the zygote has imported its modules and forked (waiting for the
        first import if it is still under way). Its output goes to ``stdout_fd`` when given, else to a pipe
        (``.stdout``). Unavailable when the zygote cannot run it."""
        if self._ended():
            raise Unavailable(f"the preloaded process ended (exit {self.proc.returncode}; log: {self.log})")
        r, w = os.pipe() if stdout_fd is None else (None, os.dup(stdout_fd))
        env = {**env, "FINETUNE_ZYGOTE": self.address}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect("\0" + self.address)
            req = {"argv": list(argv), "env": env, "cwd": str(cwd), "preload": list(preload)}
            socket.send_fds(conn, [json.dumps(req).encode()], [w])
        except OSError as e:
            conn.close()
            _close(r)
            raise Unavailable(f"cannot reach the preloaded process: {e}") from None
        finally:
            os.close(w)
        while True:  # the zygote may still be importing: wait, but let a Ctrl-C or its death end the wait
            if interrupted():
                conn.close()  # the zygote then stops the child it forks for us
                _close(r)
                raise KeyboardInterrupt
            ready = selectors.DefaultSelector()
            ready.register(conn, selectors.EVENT_READ)
            got = ready.select(0.2)
            ready.close()
            if got:
                break
            if self._ended():
                conn.close()
                _close(r)
                raise Unavailable(f"the preloaded process ended (exit {self.proc.returncode}; log: {self.log})")
        data = conn.recv(65536)
        msg = json.loads(data.decode()) if data else {"error": "no answer"}
        if "pid" not in msg:
            conn.close()
            _close(r)
            raise Unavailable(f"the preloaded process refused the step: {msg.get('error')}")
        return ForkedProcess(conn, os.fdopen(r, "rb") if r is not None else None, int(msg["pid"]))


def _close(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m finetune.launchers.zygote")
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--alive-fd", type=int, required=True)
    ap.add_argument("--preload", default="")
    a = ap.parse_args(argv)
    code = serve(a.listen_fd, a.alive_fd, [s for s in a.preload.split(";") if s])
    # Nothing of the zygote's outlives it (its steps are in their own process groups): it ends at once instead of
    # tearing down torch, transformers and DeepSpeed module by module, which the driver waited 2.5 s for at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
