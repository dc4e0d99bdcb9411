"""Sweeps: multiruns with paired interpolations, per-job results, the summary (also after a failed job),
fail_fast, `finetune summarize`, the sweep files and the shared tokenised-data cache.

Plumbing runs on backend=dummy (about a second a job). The real sweeps (LoRA ranks, methods, two backends side by
side, the Optuna search) are the README's commands, run and inspected by tests/test_readme_sweeps.py.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FINETUNE, REPO, read_json, run_train

PNG = b"\x89PNG\r\n\x1a\n"


def sweep(tmp_path: Path, *overrides: str, name: str = "sweep"):
    folder = tmp_path / name
    proc, _ = run_train(*overrides, f"hydra.sweep.dir={folder}", outputs=tmp_path / "outputs", multirun=True)
    return proc, folder


def summary_rows(folder: Path):
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- dummy plumbing


@pytest.fixture(scope="module")
def dummy_sweep(tmp_path_factory):
    """lora_r=4,8 with lora_alpha paired by the nested interpolation the issue names (quoted for Hydra's
    command-line grammar, which refuses an unquoted nested ${...})."""
    tmp = tmp_path_factory.mktemp("dummy_sweep")
    proc, folder = sweep(
        tmp, "backend=dummy", "lora_r=4,8", 'lora_alpha="${eval:2*${lora_r}}"', "learning_rate=1e-4,3e-4"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, folder


@pytest.mark.slow
def test_sweep_pairs_alpha_and_writes_results(dummy_sweep):
    proc, folder = dummy_sweep
    jobs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        cfg = read_json(job / "manifest.json")["config"]
        assert cfg["lora_alpha"] == 2 * cfg["lora_r"], (job, cfg["lora_r"], cfg["lora_alpha"])
        assert cfg["method"]["lora_alpha"] == 2 * cfg["lora_r"]  # the group reads the paired value
        seen.add((cfg["lora_r"], cfg["learning_rate"]))
        result = read_json(job / "result.json")
        assert result["status"] == "completed" and result["metric"] is None and result["metrics"]["train_loss"] > 0
    assert seen == {(4, 1e-4), (4, 3e-4), (8, 1e-4), (8, 3e-4)}


@pytest.mark.slow
def test_sweep_summary_files(dummy_sweep):
    proc, folder = dummy_sweep
    rows = summary_rows(folder)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert {(r["lora_r"], r["lora_alpha"]) for r in rows} == {("4", "8"), ("8", "16")}
    assert all(r["status"] == "completed" and float(r["objective"]) == float(r["train_loss"]) for r in rows)
    md = (folder / "summary.md").read_text()
    assert "| job | status | lora_r | lora_alpha | learning_rate | objective |" in md
    for png in ("loss_curves.png", "metric_vs_lora_r.png", "metric_vs_lora_alpha.png", "metric_vs_learning_rate.png"):
        assert (folder / png).read_bytes()[:8] == PNG, png
        assert f"({png})" in md
    summary = read_json(folder / "summary.json")
    assert (
        summary["n_jobs"] == 4
        and summary["n_failed"] == 0
        and summary["params"] == ["lora_r", "lora_alpha", "learning_rate"]
    )
    assert len(read_json(folder / "sweep_jobs.json")["jobs"]) == 4
    assert "summary: " in proc.stdout and "lora_alpha" in proc.stdout  # the rich table was printed


@pytest.mark.slow
def test_summarize_by_hand(dummy_sweep, tmp_path):
    _, folder = dummy_sweep
    for f in ("summary.csv", "summary.md", "loss_curves.png"):
        (folder / f).unlink()
    proc = subprocess.run([FINETUNE, "summarize", str(folder)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "summary.csv").exists() and (folder / "loss_curves.png").read_bytes()[:8] == PNG
    assert len(summary_rows(folder)) == 4
    bad = subprocess.run(
        [FINETUNE, "summarize", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: folder=") and len(bad.stderr.splitlines()) == 1


@pytest.mark.slow
def test_failed_jobs_do_not_stop_the_sweep(tmp_path):
    """A refused config (steps=0) and a crashing step (fail=true) fail their jobs; the others still run; the
    summary is written although Hydra skips on_multirun_end; the sweep exits non-zero."""
    proc, folder = sweep(tmp_path, "backend=dummy", "backend.steps=0,2", "backend.fail=false,true")
    assert proc.returncode != 0
    rows = {r["job"]: r for r in summary_rows(folder)}
    assert [rows[j]["status"] for j in "0123"] == ["failed", "failed", "completed", "failed"]
    assert rows["0"]["error"] == "ConfigError: backend.steps=0: must be > 0"
    assert rows["3"]["error"].startswith("step 'dummy_train' exited with code 3")
    assert rows["2"]["objective"] and (folder / "loss_curves.png").exists()
    assert "3 not completed" in proc.stdout and "job 3 failed: step 'dummy_train' exited with code 3" in proc.stdout


@pytest.mark.slow
def test_fail_fast_stops_at_first_failure(tmp_path):
    proc, folder = sweep(tmp_path, "backend=dummy", "fail_fast=true", "backend.fail=true,false")
    assert proc.returncode != 0
    rows = summary_rows(folder)
    assert [r["status"] for r in rows] == ["failed", "not run"]
    assert not (folder / "1").exists()


@pytest.mark.slow
def test_hydra_mode_multirun_without_dash_m(tmp_path):
    """hydra.mode=MULTIRUN without -m is still a sweep: our shortcut past Hydra's mode probe (finetune/cli.py)
    only applies when no override could set hydra.mode."""
    folder = tmp_path / "sweep"
    proc, _ = run_train(
        "backend=dummy", "lora_r=4,8", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={folder}", outputs=tmp_path / "outputs"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["status"] for r in summary_rows(folder)] == ["completed", "completed"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_sweep_files_compose(name):
    """Every sweep file composes (in the multirun config and in each job config) without running anything."""
    from hydra import compose, initialize_config_dir

    from finetune.cli import setup

    setup()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
        key, values = next(iter(cfg.hydra.sweeper.params.items()))
        first = values.split(",")[0] if not values.startswith("[") else values[: values.index("]") + 1]
        job = compose("config", overrides=[f"+sweep={name}", f"{key}={first}"])
        if name in ("lora_rank", "lora_grid"):
            assert job.lora_alpha == 2 * job.lora_r


# ------------------------------------------------------------------------------------------- data cache


def _cache_job(args):
    cache_dir, counter, key = args
    from finetune.data_cache import get_or_build

    def build():
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # a slow build: the other jobs must wait, not rebuild
        return [
            {"input_ids": list(range(i, i + 5)), "labels": [-100] * 2 + list(range(i + 2, i + 5))} for i in range(100)
        ]

    info = {}
    value = get_or_build(key, build, cache_dir=cache_dir, info=info)
    return len(value), value[7]["input_ids"], info["hit"]


@pytest.mark.slow
def test_data_cache_builds_once_under_parallel_jobs(tmp_path):
    key = {"data": "abc", "tokenizer": "def", "template": "alpaca", "cutoff_len": 128}
    counter = tmp_path / "builds.txt"
    with mp.get_context("spawn").Pool(3) as pool:
        out = pool.map(_cache_job, [(str(tmp_path / "c"), str(counter), key)] * 3)
    assert counter.read_text().count("built") == 1
    assert {(n, tuple(ids)) for n, ids, _ in out} == {(100, (7, 8, 9, 10, 11))}
    assert sorted(hit for *_, hit in out) == [False, True, True]
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]
    # another cutoff is another entry
    from finetune.data_cache import get_or_build

    info = {}
    get_or_build({**key, "cutoff_len": 64}, lambda: [1], cache_dir=tmp_path / "c", info=info)
    assert info["hit"] is False and len(list((tmp_path / "c").glob("*.key.json"))) == 2


def test_data_cache_datasets_and_failed_build(tmp_path):
    import datasets

    from finetune.data_cache import get_or_build

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[1, 2, 3], [-100, 5]]})
    info = {}
    first = get_or_build({"k": 1}, lambda: ds, cache_dir=tmp_path, info=info)
    again = get_or_build({"k": 1}, lambda: pytest.fail("rebuilt"), cache_dir=tmp_path, info=info)
    assert (
        info["hit"]
        and isinstance(again, datasets.Dataset)
        and again["input_ids"] == first["input_ids"] == ds["input_ids"]
    )

    def boom():
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        get_or_build({"k": 2}, boom, cache_dir=tmp_path)
    assert get_or_build({"k": 2}, lambda: {"ok": True}, cache_dir=tmp_path) == {"ok": True}


@pytest.mark.slow
def test_sweep_jobs_reuse_the_base_models_answers(tmp_path):
    """The base model's answers of the evaluation by generation are computed by the first job of a sweep and reused
    by the next (keyed by content: the model's bytes, the prompt ids, decoding; in <outputs>/cache/generations),
    which records it in its manifest's "reused"; the base scores are the same in both jobs."""
    import random

    from conftest import PY, user_env

    sweep = tmp_path / "sweep"
    seed = random.randrange(10**6)  # held-out rows of their own: no other test or run has these answers cached
    argv = [PY, str(REPO / "train.py"), "-m", "lora_r=4,8", "generate_eval=true", "generate_eval_rows=4",
            "max_new_tokens=4", "max_steps=2", "max_samples=40", "val_set_size=8", "merge=false",
            f"seed={seed}", "report_to=none", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(argv, cwd=str(REPO), env=user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first, second = (read_json(sweep / j / "manifest.json") for j in ("0", "1"))
    assert "reused" not in first, first.get("reused")
    record = second["reused"]["generate_eval_before"]
    assert record["reused"] is True and Path(record["path"]).exists()
    before = [read_json(sweep / j / "eval" / "generate_before.json") for j in ("0", "1")]
    assert before[1]["cache"]["key"] == before[0]["cache"]["key"]
    assert [s["answer"] for s in before[1]["samples"]] == [s["answer"] for s in before[0]["samples"]]
    assert first["metrics"]["base_eval_exact_match"] == second["metrics"]["base_eval_exact_match"]
