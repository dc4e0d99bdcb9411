"""Runs that never collide, never restart silently and fail before they start (the run folder's life):

- a run claims its folder before it plans (4 runs started in the same second, 2 sweeps likewise: each its own);
- a second resume=true of a running run is refused; a crashed run's lock does not outlive it;
- Ctrl-C pauses and resume continues (alpacalora: tests/test_alpacalora.py, beside the run it compares with;
  LLaMA-Factory and FlagEmbedding: here);
- the same overrides compose the same config whether a first-use model is built yet or not;
- the data the worker reads is what validation read (a BOM), and what validation refuses it refuses in one line;
- the dry run applies the run's checks; the terminal gets our lines, the step log the libraries'.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, REPO, read_json, refusal, run_train, start_train, user_env

TINY = ["max_samples=40", "val_set_size=8", "batch_size=4", "micro_batch_size=4", "report_to=none", "merge=false"]


def _history(run: Path):
    return [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_runs_started_in_the_same_second_each_get_their_own_folder(tmp_path):
    """Four runs started together with default folder names (the same name, the same second): four folders, each
    holding its own config, adapter and history; two sweeps started together: two sweep folders."""
    env = user_env(OMP_NUM_THREADS="1")
    ranks = [2, 4, 6, 8]
    procs = [start_train(*TINY, "max_steps=1", f"lora_r={r}", f"name=same-{tmp_path.name}", env=env) for r in ranks]
    sweeps = [
        subprocess.Popen(
            [PY, str(REPO / "train.py"), "-m", "backend=dummy", f"lora_r=3,{r}", f"name=sw-{tmp_path.name}"],
            cwd=str(REPO),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (5, 7)
    ]
    folders = {}
    for r, p in zip(ranks, procs):
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
        folders[r] = Path(re.search(r"run folder: (\S+)", out).group(1))
    assert len(set(folders.values())) == len(ranks)
    for r, run in folders.items():
        assert read_json(run / "resolved_config.json")["lora_r"] == r
        assert json.loads((run / "lazyllm_lora" / "adapter_config.json").read_text())["r"] == r
        assert read_json(run / "manifest.json")["run_dir"] == str(run)
        assert [row["step"] for row in _history(run) if "loss" in row] == [1]
    sweep_dirs = set()
    for p in sweeps:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        sweep_dirs.add(re.search(r"sweep of 2 jobs into (\S+)", out).group(1))
    assert len(sweep_dirs) == 2
    for d in sweep_dirs:
        assert sorted(p.name for p in Path(d).iterdir() if p.is_dir()) == ["0", "1"]


@pytest.mark.slow
def test_first_use_model_composes_like_a_built_one(tmp_path, tiny_model):
    """Every fact validation reads from a model (precision=auto's hidden size, tied embeddings, module names) comes
    from the builder's plan before a model built on first use exists, so the first run composes what later runs
    compose (and a first run can be resumed)."""
    from omegaconf import OmegaConf

    from finetune.auto.hardware import cpu_precision
    from finetune.config import model_facts

    built = tiny_model("tiny_llama_30m")
    for builder, folder in (("tiny_llama_30m", built), ("smollm2_135m", REPO / "models" / "smollm2-135m")):
        planned = OmegaConf.create({"path": str(tmp_path / "not-built"), "builder": builder, "name": builder})
        assert model_facts.hidden_size(planned) > 0 and model_facts.module_names(planned)
        if (folder / "config.json").exists():
            real = OmegaConf.create({"path": str(folder), "builder": builder, "name": builder})
            assert cpu_precision(planned) == cpu_precision(real)
            assert model_facts.hidden_size(planned) == model_facts.hidden_size(real)
            assert model_facts.tied_embeddings(planned) == model_facts.tied_embeddings(real)
            assert model_facts.module_names(planned) <= model_facts.module_names(real) | {"norm"}


def test_data_read_as_validation_read_it_and_refused_early(tmp_path):
    """One reader: a UTF-8 file with a byte-order mark validates and trains; val_set_size above the rows and a row
    of another format are refused in one line before any folder exists."""
    rows = [{"instruction": "Copy the words.", "input": f"red rice {i}", "output": f"red rice {i}"} for i in range(20)]
    bom = tmp_path / "bom.json"
    bom.write_text(json.dumps(rows), encoding="utf-8-sig")
    from finetune.datafiles import read_rows

    assert read_rows(str(bom)) == rows
    code, msg = refusal("data=alpaca", f"data.path={bom}", outputs=tmp_path)
    assert (code, msg) == (
        2,
        f"val_set_size=200: holds out 200 of the 20 rows of {bom}, leaving none to train on; use val_set_size=2 "
        "(any count below 20, or a fraction such as 0.1), or 0 for no held-out rows",
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    code, msg = refusal("data=alpaca", f"data.path={chat}", outputs=tmp_path)
    assert (code, msg) == (
        2,
        f"data.path='{chat}': row 1 is a sharegpt row (messages), not alpaca: use data=sharegpt (data.format=alpaca)",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bom_file_trains_and_the_terminal_gets_our_lines(tmp_path):
    rows = [{"instruction": "Copy the words.", "input": f"red rice {i}", "output": f"red rice {i}"} for i in range(24)]
    bom = tmp_path / "bom.json"
    bom.write_text(json.dumps(rows), encoding="utf-8-sig")
    proc, run = run_train(
        "data=alpaca", f"data.path={bom}", "val_set_size=4", "max_steps=2", "logging_steps=5", "merge=true",
        outputs=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # no loss was logged (2 steps, one log every 5): the lines say so and why, never `train_loss=None`
    assert "train_loss: none (logging_steps=5 is more than the 2 steps trained; set logging_steps=2 or fewer)" in (
        proc.stdout
    )
    assert "None" not in proc.stdout and re.search(r"mean_train_loss=\d", proc.stdout), proc.stdout
    ours = re.compile(r"^(\[\d\d:\d\d:\d\d\] |\[finetune\] |step=\d+ )")
    assert all(ours.match(line) for line in proc.stdout.splitlines() if line.strip()), proc.stdout
    log = (run / "logs" / "train.log").read_text()
    assert "Setting accelerator to CPU" in log + (run / "logs" / "preload.log").read_text()
    assert "Setting accelerator" not in proc.stdout + proc.stderr


def test_dry_run_applies_the_runs_checks(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    for extra in ([], ["dry_run=true"]):
        proc, _ = run_train(f"output_dir={used}", *extra, outputs=None)
        assert proc.returncode == 2 and "exists and is not empty" in proc.stderr, proc.stderr


def _pause(proc: subprocess.Popen, run: Path, at: int = 2) -> tuple:
    """Ctrl-C (the driver's SIGINT) once the trainer has logged `at` steps (LLaMA-Factory's own live log, or our
    history); (stdout, stderr) after the driver exits."""
    logs = [run / "checkpoints" / "trainer_log.jsonl", run / "history.jsonl"]
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if any(f.exists() and f.read_text().count('"loss"') >= at for f in logs):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    return proc.communicate(timeout=600)


@pytest.mark.slow
def test_llamafactory_and_flagembedding_pause_like_alpacalora(tmp_path, tiny_model):
    """The first Ctrl-C on the other trainers that can pause (LLaMA-Factory through its own run_exp, FlagEmbedding):
    a complete checkpoint at the end of the current step, one line with the command that continues (exit 130,
    manifest `paused`), and that command finishes the run from the checkpoint without retraining its steps."""
    tiny_model("tiny_llama")
    env = user_env(OMP_NUM_THREADS="1")
    lf, fe = tmp_path / "lf", tmp_path / "fe"
    jobs = {
        lf: ["backend=llamafactory", "max_samples=64", "val_set_size=0", "max_steps=300", "merge=false"],
        fe: ["backend=flagembedding", "backend.query_max_len=32", "backend.passage_max_len=32", "max_steps=300"],
    }
    common = ["batch_size=4", "micro_batch_size=4", "logging_steps=1", "save_steps=0", "report_to=none"]
    procs = {out: start_train(*job, *common, f"output_dir={out}", env=env) for out, job in jobs.items()}
    paused = {out: _pause(p, out) for out, p in procs.items()}
    for out, (stdout, err) in paused.items():
        assert procs[out].returncode == 130, stdout[-2000:] + err[-2000:]
        m = re.search(r"paused: (checkpoint-(\d+)) saved in (\S+); continue with: (.+)$", err, re.M)
        assert m and err.strip().count("\n") == 0 and "Traceback" not in stdout + err, err
        assert (out / "checkpoints" / m.group(1) / "FINETUNE_COMPLETE").exists()
        assert read_json(out / "manifest.json")["status"] == "paused"
        assert m.group(4) == f"python train.py output_dir={out} resume=true"
    resumed = {out: start_train(f"output_dir={out}", "resume=true", env=env) for out in jobs}
    for out, p in resumed.items():
        stdout, err = p.communicate(timeout=900)
        assert p.returncode == 0, stdout[-2000:] + err[-2000:]
        m = read_json(out / "manifest.json")
        assert m["status"] == "completed" and len(m["resumes"]) == 1
        steps = [r["step"] for r in _history(out) if "loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] > 2  # each step once: nothing retrained
