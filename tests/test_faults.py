"""Faults through the real driver and launcher, on the dummy backend (a real tiny process, no torch):
a step that exits non-zero, hangs past the timeout, is killed by a signal, or is interrupted with SIGINT.
Each must fail the run (or mark it interrupted) in the manifest, with the log tail, and a non-zero exit code.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_json, run_train, signal_workers, user_env


@pytest.mark.slow
def test_dummy_run_writes_a_complete_manifest():
    """In the default folder a user gets (outputs/runs/<date>/<time>-<name> of the repository)."""
    proc, run = run_train("backend=dummy", "name=plumbing", "seed=7", outputs=None)
    assert proc.returncode == 0, proc.stderr
    try:
        _check_manifest(run)
    finally:
        shutil.rmtree(run)


def _check_manifest(run):
    m = read_json(run / "manifest.json")
    assert m["status"] == "completed"
    assert m["overrides"] == ["backend=dummy", "name=plumbing", "seed=7"]
    assert m["seed"] == 7 and m["config"]["seed"] == 7
    assert m["choices"]["backend"] == "dummy" and m["choices"]["model"] == "tiny_llama"
    assert set(m["git"]) == {"commit", "dirty"}
    assert m["packages"]["hydra-core"] and m["packages"]["torch"] and m["python"] and m["platform"]
    ((path, digest),) = m["data"]["files"].items()
    assert path.endswith("tiny_alpaca.json") and re.fullmatch(r"[0-9a-f]{64}", digest)
    step = m["steps"][-1]
    assert step["name"] == "dummy_train" and step["exit_code"] == 0 and step["duration_s"] >= 0
    assert step["argv"][1:3] == ["-m", "finetune.recipes.dummy"]
    assert m["metrics"]["train_loss"] < m["metrics"]["first_train_loss"]
    for f in ("config.yaml", "overrides.yaml", "resolved_config.json", "metrics.json", "loss.png", "result.json"):
        assert (run / f).exists(), f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert run.parent.parent == REPO / "outputs" / "runs" and re.fullmatch(r"\d\d-\d\d-\d\d-plumbing(-\d+)?", run.name)


def test_dry_run_writes_nothing(tmp_path):
    proc, run = run_train("backend=dummy", "dry_run=true", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "argv:" in proc.stdout and "finetune.recipes.dummy" in proc.stdout and "nothing was written" in proc.stdout
    assert run is None and not tmp_path.exists() or not any(tmp_path.rglob("*"))


@pytest.mark.slow
def test_step_exit_code_fails_the_run_with_log_tail(tmp_path):
    proc, run = run_train("backend=dummy", "backend.fail=true", outputs=tmp_path)
    assert proc.returncode == 1
    assert "run failed: step 'dummy_train' exited with code 3" in proc.stderr
    assert "failing as asked" in proc.stderr  # the log tail
    m = read_json(run / "manifest.json")
    assert m["status"] == "failed" and m["steps"][-1]["exit_code"] == 3
    assert any("failing as asked" in line for line in m["log_tail"])
    assert not (run / "metrics.json").exists()
    assert read_json(run / "result.json")["status"] == "failed"


@pytest.mark.slow
def test_step_timeout_fails_the_run(tmp_path):
    t0 = time.monotonic()
    proc, run = run_train(
        "backend=dummy", "backend.steps=100", "backend.sleep_s=1", "timeout_min=0.05", outputs=tmp_path
    )
    assert proc.returncode == 1 and "timed out after" in proc.stderr
    assert time.monotonic() - t0 < 60
    assert read_json(run / "manifest.json")["steps"][-1]["status"] == "timeout"


def _start(tmp_path, *overrides):
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *overrides, f"output_dir={tmp_path / 'run'}"],
        cwd=str(REPO),
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_manifest(tmp_path, status="running", timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in tmp_path.rglob("manifest.json"):
            data = json.loads(m.read_text())
            if data["status"] == status and (m.parent / "history.jsonl").exists():
                return m
        time.sleep(0.2)
    raise AssertionError("the run did not start")


@pytest.mark.slow
def test_sigint_stops_cleanly_and_marks_interrupted(tmp_path):
    proc = _start(tmp_path, "backend=dummy", "backend.steps=200", "backend.sleep_s=0.2")
    manifest = _wait_for_manifest(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    data = json.loads(manifest.read_text())
    assert data["status"] == "interrupted"
    assert data["steps"][-1]["status"] == "interrupted"


@pytest.mark.slow
def test_worker_killed_by_the_os_fails_the_run(tmp_path):
    proc = _start(tmp_path, "backend=dummy", "backend.steps=200", "backend.sleep_s=0.2")
    manifest = _wait_for_manifest(tmp_path)
    assert signal_workers("dummy", tmp_path / "run", signal.SIGKILL), "worker not found"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "was killed by signal 9" in err
    assert json.loads(manifest.read_text())["status"] == "failed"


@pytest.mark.slow
def test_worker_crash_in_native_code_leaves_its_python_stack_in_the_error(tmp_path):
    """A segfault (seen once on CI in Collie's CPU training) names the worker's Python frames, not only the signal."""
    proc = _start(tmp_path, "backend=dummy", "backend.steps=200", "backend.sleep_s=0.2")
    manifest = _wait_for_manifest(tmp_path)
    assert signal_workers("dummy", tmp_path / "run", signal.SIGSEGV), "worker not found"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "was killed by signal 11" in err, err
    assert "Fatal Python error: Segmentation fault" in err and "finetune/recipes/dummy.py" in err, err
    assert json.loads(manifest.read_text())["status"] == "failed"


@pytest.mark.slow
def test_rank_crash_under_torchrun_names_the_frame_not_only_torchruns_summary(tmp_path):
    """Two ranks under torchrun, one segfaults: torchrun exits 1 with its own summary last in the log, and the
    error still shows the crashed rank's Python stack (as it would have for the Collie crash seen on CI)."""
    proc = _start(tmp_path, "backend=dummy", "backend.steps=200", "backend.sleep_s=0.2", "launcher.nproc_per_node=2")
    manifest = _wait_for_manifest(tmp_path)
    deadline = time.monotonic() + 60
    while not signal_workers("dummy", tmp_path / "run", signal.SIGSEGV, one_rank=True):
        assert time.monotonic() < deadline, "no rank found"
        time.sleep(0.2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "exited with code 1" in err, err
    assert "Fatal Python error: Segmentation fault" in err and "finetune/recipes/dummy.py" in err, err
    assert "Root Cause" not in err  # torchrun's summary gives way to the report
    assert json.loads(manifest.read_text())["status"] == "failed"


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc, _ = run_train("backend=dummy", f"output_dir={blocker}/run", outputs=tmp_path / "outputs")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: output_dir=") and "cannot be created" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_secrets_never_reach_manifest_or_logs(tmp_path):
    secret = "hf_SECRETVALUE123456"
    proc, run = run_train("backend=dummy", outputs=tmp_path, env={"HF_TOKEN": secret, "WANDB_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr
    for f in run.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".log", ".jsonl"):
            assert secret not in f.read_text(errors="replace"), f


def test_no_shell_true_anywhere():
    """User strings must never reach a shell: no shell=True in the code (tests excluded)."""
    hits = []
    for folder in ("finetune", "bench", "scripts"):
        for f in (REPO / folder).rglob("*.py"):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"shell\s*=\s*True", line) or re.search(r"os\.system\(|os\.popen\(", line):
                    hits.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert (REPO / "train.py").read_text().count("shell=True") == 0
    assert not hits, "\n".join(hits)


def test_trust_remote_code_is_off_by_default():
    from hydra import compose, initialize_config_dir

    from finetune.cli import setup

    setup()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        assert compose("config").trust_remote_code is False
    code = "\n".join(p.read_text() for p in (REPO / "finetune").rglob("*.py"))
    assert "trust_remote_code=True" not in code
