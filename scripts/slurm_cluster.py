#!/usr/bin/env python3
"""A real single-node Slurm cluster on this machine, with accounting (for tests and for trying launcher=slurm).

    sudo apt-get install -y slurm-wlm slurmdbd mariadb-server      # Debian 12: slurm 22.05, munge, MariaDB 10.11
    python scripts/slurm_cluster.py start /tmp/slurm               # prints: export SLURM_CONF=/tmp/slurm/etc/slurm.conf
    export SLURM_CONF=/tmp/slurm/etc/slurm.conf
    python train.py backend=dummy launcher=slurm
    python scripts/slurm_cluster.py stop /tmp/slurm

Everything lives in the given folder: slurm.conf + slurmdbd.conf (etc/), state, spool, logs, pid files and a
private MariaDB (db/). Daemons: munged (only if none is running; stopped again only if we started it),
mariadbd, slurmdbd, slurmctld, slurmd. Ports are chosen free at start. Must run as root (slurmd runs the jobs
of any user; as another user, only that user's jobs run). Accounting matters: without it sacct fails, submitit
cannot read job states and waiting on a cancelled job blocks forever.

Standard library only; no shell strings (every command is an argv list).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd")  # stop order
NEEDED = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db", "sacctmgr", "sinfo")
CLUSTER = "finetune"
DB_PASS = "finetune-test"  # a throw-away database bound to 127.0.0.1 in a temp folder


class ClusterError(RuntimeError):
    pass


def missing_tools() -> List[str]:
    paths = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [t for t in NEEDED if not shutil.which(t, path=paths)]


def _which(tool: str) -> str:
    return shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin") or tool


def _free_port_range(n: int) -> int:
    """First of n consecutive free ports (slurmd i listens on first + i)."""
    for _ in range(100):
        first = _free_ports(1)[0]
        if first + n >= 65535:
            continue
        try:
            socks = []
            for i in range(n):
                sk = socket.socket()
                sk.bind(("127.0.0.1", first + i))
                socks.append(sk)
            return first
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise ClusterError(f"no {n} consecutive free ports")


def _free_ports(n: int) -> List[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _run(
    argv: List[str], env: Optional[dict] = None, check: bool = True, timeout: float = 60, **kw
) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    return p


def _munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge(state: dict) -> None:
    if _munge_ok():
        state["munge_started"] = False
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    munge = pwd.getpwnam("munge")
    os.chown(run_dir, munge.pw_uid, munge.pw_gid)
    if not Path("/etc/munge/munge.key").exists():
        _run([_which("mungekey"), "--create"], check=True)
        os.chown("/etc/munge/munge.key", munge.pw_uid, munge.pw_gid)
    _run(["runuser", "-u", "munge", "--", _which("munged")])
    for _ in range(50):
        if _munge_ok():
            state["munge_started"] = True
            return
        time.sleep(0.1)
    raise ClusterError("munged started but `munge -n | unmunge` fails")


def _wait_for(cond, what: str, timeout: float, log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    tail = ""
    if log and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise ClusterError(f"{what} not ready after {timeout:.0f} s{tail}")


def _running(pid: int) -> bool:
    """True while pid runs; reaps it when it is our own exited child (mariadbd), so zombies count as gone."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pid_alive(pid_file: Path) -> Optional[int]:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _running(pid) else None


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def node_names(nodes: int) -> List[str]:
    host = socket.gethostname().split(".")[0]
    return [host] if nodes == 1 else [f"{host}n{i}" for i in range(nodes)]


def write_configs(base: Path, ports: Dict[str, int], nodes: int = 1) -> Path:
    """slurm.conf and slurmdbd.conf. nodes > 1: that many slurmd on this machine (each with its own port,
    NodeAddr 127.0.0.1), each seeing (and offering) all of its CPUs, so multi-node jobs can be tested on one
    machine (the CPUs are then oversubscribed)."""
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem = max(1024, int(_mem_mb() * 0.8) // nodes)
    names = node_names(nodes)
    if nodes == 1:
        node_lines = [f"NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN"]
    else:
        node_lines = [
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports['slurmd'] + i} CPUs={cpus} "
            f"RealMemory={mem} State=UNKNOWN"
            for i, n in enumerate(names)
        ]
    etc = base / "etc"
    for d in ("etc", "state", "spool", "log", "run"):
        (base / d).mkdir(parents=True, exist_ok=True)
    conf = etc / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                f"ClusterName={CLUSTER}",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                f"SlurmctldPort={ports['slurmctld']}",
                f"SlurmdPort={ports['slurmd']}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"StateSaveLocation={base}/state",
                f"SlurmdSpoolDir={base}/spool/slurmd-%n",
                f"SlurmctldPidFile={base}/run/slurmctld.pid",
                f"SlurmdPidFile={base}/run/slurmd-%n.pid",
                f"SlurmctldLogFile={base}/log/slurmctld.log",
                f"SlurmdLogFile={base}/log/slurmd-%n.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "DefMemPerCPU=1024",
                "ReturnToService=2",
                "MailProg=/bin/true",
                "KillWait=5",
                "MinJobAge=300",
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=localhost",
                f"AccountingStoragePort={ports['slurmdbd']}",
                "JobAcctGatherType=jobacct_gather/linux",
                "JobAcctGatherFrequency=30",
                *node_lines,
                f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    dbd = etc / "slurmdbd.conf"
    dbd.write_text(
        "\n".join(
            [
                "AuthType=auth/munge",
                "DbdHost=localhost",
                f"DbdPort={ports['slurmdbd']}",
                "SlurmUser=root",
                f"LogFile={base}/log/slurmdbd.log",
                f"PidFile={base}/run/slurmdbd.pid",
                "StorageType=accounting_storage/mysql",
                "StorageHost=127.0.0.1",
                f"StoragePort={ports['mariadb']}",
                "StorageUser=slurm",
                f"StoragePass={DB_PASS}",
                "StorageLoc=slurm_acct_db",
                "",
            ]
        )
    )
    dbd.chmod(0o600)
    return conf


def _start_mariadb(base: Path, port: int) -> None:
    db = base / "db"
    mysql = pwd.getpwnam("mysql")
    for p in (base, base / "run", base / "log"):
        p.chmod(0o755)
    if not (db / "mysql").exists():
        db.mkdir(exist_ok=True)
        os.chown(db, mysql.pw_uid, mysql.pw_gid)
        _run(
            [
                _which("mariadb-install-db"),
                "--user=mysql",
                f"--datadir={db}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            timeout=120,
        )
    dbrun = base / "dbrun"  # socket and pid file: a folder the mysql user owns
    dbrun.mkdir(exist_ok=True)
    os.chown(dbrun, mysql.pw_uid, mysql.pw_gid)
    sock = dbrun / "mariadb.sock"
    log = base / "log" / "mariadb.log"
    log.touch()
    os.chown(log, mysql.pw_uid, mysql.pw_gid)
    proc = subprocess.Popen(
        [
            _which("mariadbd"),
            "--no-defaults",
            "--user=mysql",
            f"--datadir={db}",
            f"--socket={sock}",
            f"--pid-file={dbrun}/mariadbd.pid",
            "--bind-address=127.0.0.1",
            f"--port={port}",
            f"--log-error={log}",
            "--skip-log-bin",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (base / "run" / "mariadbd.pid").write_text(str(proc.pid))
    _wait_for(
        lambda: proc.poll() is not None or (sock.exists() and _pid_alive(dbrun / "mariadbd.pid")), "mariadbd", 60, log
    )
    if proc.poll() is not None:
        raise ClusterError(
            f"mariadbd exited {proc.returncode}: " + " | ".join(log.read_text(errors="replace").splitlines()[-3:])
        )
    sql = (
        f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{DB_PASS}';"
        f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    )
    _run([_which("mariadb"), f"--socket={sock}", "-u", "root", "-e", sql])


def _env(conf: Path) -> dict:
    return {**os.environ, "SLURM_CONF": str(conf)}


def start(base: Path, timeout: float = 60.0, nodes: int = 1) -> Dict[str, str]:
    """Start the cluster in ``base``; return the environment to use it ({"SLURM_CONF": ...})."""
    if os.geteuid() != 0:
        raise ClusterError("run as root (slurmd must be able to run jobs as their owner)")
    miss = missing_tools()
    if miss:
        raise ClusterError(f"missing {', '.join(miss)}: apt-get install -y slurm-wlm slurmdbd mariadb-server")
    base = Path(base).absolute()
    base.mkdir(parents=True, exist_ok=True)
    if (base / "cluster.json").exists() and _pid_alive(base / "run" / "slurmctld.pid"):
        raise ClusterError(f"a cluster is already running from {base} (stop it first)")
    t0 = time.monotonic()
    state: dict = {"base": str(base)}
    ports = dict(zip(("slurmctld", "slurmdbd", "mariadb"), _free_ports(3)))
    ports["slurmd"] = _free_port_range(nodes)
    state["ports"], state["nodes"] = ports, node_names(nodes)
    conf = write_configs(base, ports, nodes)
    state["slurm_conf"] = str(conf)
    (base / "cluster.json").write_text(json.dumps(state, indent=2))
    env = _env(conf)
    try:
        _start_munge(state)
        (base / "cluster.json").write_text(json.dumps(state, indent=2))
        _start_mariadb(base, ports["mariadb"])
        _run([_which("slurmdbd")], env=env)
        _wait_for(
            lambda: _run(["sacctmgr", "-n", "list", "cluster"], env=env, check=False, timeout=10).returncode == 0,
            "slurmdbd",
            timeout,
            base / "log" / "slurmdbd.log",
        )
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], env=env, check=False)
        _run([_which("slurmctld"), "-f", str(conf)], env=env)
        for name in state["nodes"]:
            _run([_which("slurmd"), "-f", str(conf), *(["-N", name] if nodes > 1 else [])], env=env)

        def idle() -> bool:
            p = _run(["sinfo", "-h", "-N", "-o", "%t"], env=env, check=False, timeout=10)
            states = p.stdout.split()
            return p.returncode == 0 and len(states) == nodes and all(t in ("idle", "mix", "alloc") for t in states)

        _wait_for(idle, "slurm node (sinfo)", timeout, base / "log" / "slurmctld.log")
    except BaseException:
        stop(base)
        raise
    state["start_s"] = round(time.monotonic() - t0, 2)
    (base / "cluster.json").write_text(json.dumps(state, indent=2))
    return {"SLURM_CONF": str(conf)}


def stop(base: Path, grace: float = 15.0) -> None:
    """Stop every daemon started from ``base`` (by pid file), and munged if we started it."""
    base = Path(base).absolute()
    try:
        state = json.loads((base / "cluster.json").read_text())
    except (OSError, ValueError):
        state = {}
    conf = base / "etc" / "slurm.conf"
    if conf.exists() and _pid_alive(base / "run" / "slurmctld.pid"):
        _run(["scancel", "--full", "-u", "root"], env=_env(conf), check=False, timeout=10)
    pid_files = [base / "run" / f"{name}.pid" for name in DAEMONS]
    pid_files[1:1] = sorted((base / "run").glob("slurmd-*.pid"))  # every slurmd, before slurmctld
    for pid_file in pid_files:
        pid = _pid_alive(pid_file)
        if not pid:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _running(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if state.get("munge_started"):
        pid = _pid_alive(Path("/run/munge/munged.pid"))
        if pid:
            os.kill(pid, signal.SIGTERM)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("start", "stop", "status"))
    ap.add_argument("folder", help="where configs, state, logs and the database live")
    ap.add_argument("--nodes", type=int, default=1, help="slurmd daemons (nodes) on this machine")
    a = ap.parse_args(argv)
    base = Path(a.folder)
    try:
        if a.action == "start":
            env = start(base, nodes=a.nodes)
            state = json.loads((base / "cluster.json").read_text())
            print(f"slurm cluster up in {state['start_s']} s; use it with:\nexport SLURM_CONF={env['SLURM_CONF']}")
        elif a.action == "stop":
            stop(base)
            print("stopped")
        else:
            conf = base / "etc" / "slurm.conf"
            p = _run(["sinfo"], env=_env(conf), check=False)
            print(p.stdout or p.stderr)
            return p.returncode
    except ClusterError as e:
        print(f"slurm_cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
