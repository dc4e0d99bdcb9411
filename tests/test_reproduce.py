"""`finetune reproduce <run>`: replay the recorded overrides into a new folder and compare curves and metrics.

Other engineers commit while tests run, so the real comparisons pass --allow-different (the commit may move
between the original run and its replay); the refusal itself is tested on a manifest edited to differ.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import FINETUNE, REPO, read_json, run_train, user_env

TINY = [
    "max_steps=4",
    "batch_size=4",
    "micro_batch_size=4",
    "val_set_size=8",
    "eval_steps=2",
    "logging_steps=1",
    "cutoff_len=128",
    "max_samples=64",
    "merge=false",
    "learning_rate=3e-3",
]


def finetune_cmd(*args: str, timeout: float = 900):
    """`finetune <args>` as a user types it (the console script of this clone's .venv)."""
    return subprocess.run([FINETUNE, *args], cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=timeout)


def new_folder(proc) -> Path:
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("new folder:"))
    return Path(line.split("new folder:", 1)[1].strip())


@pytest.fixture(scope="module")
def dummy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro_dummy")
    proc, run = run_train("backend=dummy", "backend.steps=5", "name=orig", outputs=out)
    assert proc.returncode == 0, proc.stderr
    return out, run


@pytest.mark.slow
def test_reproduce_dummy_identical(dummy_run):
    out, run = dummy_run
    proc = finetune_cmd("reproduce", str(run), "--allow-different", "--output-dir", str(out / "again"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    new = new_folder(proc)
    assert new == out / "again"
    report = read_json(new / "reproduce.json")
    assert report["identical"] and report["matched"]
    assert report["curves"][0]["key"] == "loss" and report["curves"][0]["steps_compared"] == 5
    assert report["replayed"][-2:] == [f"output_dir={new}", "hydra.mode=RUN"]
    assert read_json(new / "manifest.json")["overrides"][:3] == ["backend=dummy", "backend.steps=5", "name=orig"]
    assert (new / "reproduce_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "reproduced: loss curves identical" in proc.stdout
    train_loss = next(m for m in report["metrics"] if m["metric"] == "train_loss")
    assert train_loss["recorded"] == train_loss["new"] == 0.4 and train_loss["diff"] == 0


@pytest.mark.slow
def test_reproduce_refuses_different_versions(dummy_run, tmp_path):
    out, run = dummy_run
    copy = tmp_path / "edited"
    copy.mkdir()
    for f in ("manifest.json", "overrides.yaml", "history.jsonl", "metrics.json"):
        (copy / f).write_bytes((run / f).read_bytes())
    manifest = read_json(copy / "manifest.json")
    manifest["git"]["commit"] = "0" * 40
    manifest["packages"]["torch"] = "1.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = finetune_cmd("reproduce", str(copy))
    assert proc.returncode == 2
    assert "WARNING: differs from the recorded run: git commit: recorded 000000000000" in proc.stderr
    assert "WARNING: differs from the recorded run: package torch: recorded 1.0.0" in proc.stderr
    assert "pass --allow-different" in proc.stderr.splitlines()[-1]
    assert "new folder:" not in proc.stdout  # nothing was run


@pytest.mark.slow
def test_reproduce_flags_a_different_curve(dummy_run, tmp_path):
    """If the replay does not match (here: the recorded curve edited), the exit code says so."""
    out, run = dummy_run
    copy = tmp_path / "curve"
    copy.mkdir()
    for f in ("manifest.json", "overrides.yaml", "metrics.json"):
        (copy / f).write_bytes((run / f).read_bytes())
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    rows[2]["loss"] += 0.25
    (copy / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = finetune_cmd("reproduce", str(copy), "--allow-different", "--output-dir", str(tmp_path / "again"))
    assert proc.returncode == 1
    assert "loss curves differ (max |diff| 0.25" in proc.stderr


def test_reproduce_bad_folder(tmp_path):
    proc = finetune_cmd("reproduce", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: run_dir=") and len(proc.stderr.splitlines()) == 1


def test_replay_of_an_auto_run_pins_the_choice(tmp_path):
    from finetune.config.resume import replay_overrides

    choice = {
        "overrides": [
            "backend=alpacalora",
            "method=lora",
            "micro_batch_size=2",
            "gradient_checkpointing=false",
            "hardware.deepspeed_stage=null",
            "launcher.nproc_per_node=1",
        ]
    }
    got = replay_overrides(
        [
            "backend=auto",
            "backend.prefer=least_memory",
            "method=auto",
            "micro_batch_size=8",
            "lora_r=16",
            "output_dir=/old",
            "explain=true",
        ],
        choice,
    )
    assert got == ["lora_r=16", "explain=true", *choice["overrides"]]


@pytest.mark.slow
def test_reproduce_auto_run_uses_the_recorded_choice(tmp_path):
    """A backend=auto run is replayed with the backend and parameters it chose, and the curves match."""
    proc, run = run_train(*TINY, "backend=auto", "backend.candidates=[alpacalora]", "name=auto", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pins = read_json(run / "manifest.json")["auto_choice"]["overrides"]
    assert pins[0] == "backend=alpacalora"
    rep = finetune_cmd("reproduce", str(run), "--allow-different", "--output-dir", str(tmp_path / "again"))
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert "backend=auto chose: backend=alpacalora" in rep.stdout
    new = new_folder(rep)
    replayed = read_json(new / "manifest.json")
    assert "backend=auto" not in replayed["overrides"] and all(p in replayed["overrides"] for p in pins)
    report = read_json(new / "reproduce.json")
    assert {c["key"]: c for c in report["curves"]}["loss"]["identical"]
    assert not report["config_differences"]


@pytest.mark.slow
def test_reproduce_a_run_typed_with_relative_paths_in_another_folder(tmp_path):
    """A run started from the user's own folder with relative paths (`data.path=mydata.json`, `output_dir=runs/a`)
    records them absolute; reproducing it composes them against the same folder, so nothing reads as changed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mydata.json").write_text((REPO / "data" / "samples" / "tiny_alpaca.json").read_text())
    typed = ["backend=dummy", "backend.steps=3", "data=alpaca", "data.path=mydata.json", "output_dir=runs/a"]
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), str(REPO / "train.py"), *typed],
        cwd=work,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_json(work / "runs" / "a" / "resolved_config.json")["data"]["path"] == str(work / "mydata.json")
    # --allow-different only for the code version (other commits may land while the suite runs); the config must match
    rep = subprocess.run(
        [FINETUNE, "reproduce", "runs/a", "--allow-different", "--output-dir", "runs/b"],
        cwd=work,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-2000:]
    assert "config differs" not in rep.stdout + rep.stderr, rep.stdout + rep.stderr
    assert read_json(work / "runs" / "b" / "reproduce.json")["identical"]
