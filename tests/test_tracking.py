"""Experiment tracking (issue 18): report_to=mlflow / wandb, for every backend and every sweep.

Fast: refusals (one line, exit 2, nothing written), where a run will be logged (dry run), params and tags without
secrets, a run pointed at a closed port (one warning line, the run completes), W&B offline runs read back from
their local files with `wandb leet inspect` (no network).
Real (slow): a real MLflow tracking server (conftest.mlflow_server: SQLite store, local artifact folder, a free
port); a tiny alpacalora run and a 2-job sweep logged to it and read back with MlflowClient (parent and child runs,
params, one metric point per logged step, artifacts); failed jobs as failed children; every backend into one
experiment under the same scheme; a server killed in the middle of a run; `finetune reproduce <MLflow run id>`;
the MLflow UI in headless Chromium listing the sweep's jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import FINETUNE, PY, REPO, read_json, run_train, user_env

TINY = [
    "max_steps=6",
    "batch_size=4",
    "micro_batch_size=4",
    "val_set_size=8",
    "eval_steps=3",
    "logging_steps=1",
    "cutoff_len=128",
    "max_samples=64",
    "merge=false",
    "learning_rate=3e-3",
]
SECRET = "hf_TRACKINGSECRET000042"
ARTIFACTS = {"manifest.json", "config.yaml", "overrides.yaml", "metrics.json", "loss.png", "history.jsonl", "logs"}
SCHEME_TAGS = {
    "finetune.run_dir",
    "finetune.backend",
    "finetune.method",
    "finetune.model",
    "finetune.config_name",
    "finetune.status",
    "git.commit",
    "git.dirty",
    "mlflow.source.git.commit",
}
SCHEME_PARAMS = {
    "backend",
    "model",
    "method",
    "hardware",
    "data",
    "launcher",
    "overrides",
    "learning_rate",
    "seed",
    "batch_size",
    "micro_batch_size",
    "num_epochs",
    "max_steps",
    "model.path",
    "data.path",
    "hardware.precision",
    "launcher.nproc_per_node",
}
WANDB = str(Path(PY).parent / "wandb")


def client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def runs_of(url: str, experiment: str):
    c = client(url)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {url}"
    return exp.experiment_id, c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def history(run_dir: Path):
    return [json.loads(line) for line in (Path(run_dir) / "history.jsonl").read_text().splitlines() if line.strip()]


def assert_history_logged(url: str, run_id: str, run_dir: Path, keys=("loss", "eval_loss", "learning_rate")):
    """One MLflow point per logged step, with the value history.jsonl holds (peak_rss_mb is in both the train and
    the eval row of a step: its first value counts)."""
    rows = history(run_dir)
    c = client(url)
    checked = 0
    for key in keys:
        first = {}
        for r in rows:
            if isinstance(r.get(key), (int, float)):
                first.setdefault(int(r["step"]), float(r[key]))
        want = sorted(first.items())
        got = sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))
        assert got == [(s, pytest.approx(v)) for s, v in want], (key, got, want)
        checked += bool(want)
    assert checked, f"none of {keys} was logged by the run"


def one_warning(proc, target: str = "mlflow") -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"[finetune] warning: {target} tracking is off for this run: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- config side


@pytest.mark.parametrize(
    "override,line",
    [
        (
            "report_to=mlfow",
            "error: report_to='mlfow': one of mlflow, none, tensorboard, wandb (or a list such as "
            "[tensorboard,mlflow]) (did you mean 'mlflow'?)",
        ),
        ("report_to=[none,mlflow]", "error: report_to=['none', 'mlflow']: none cannot be combined with other targets"),
        ("report_to=[mlflow,mlflow]", "error: report_to=['mlflow', 'mlflow']: lists a target twice"),
        (
            "tracking.mlflow.uri=mlruns",
            "error: tracking.mlflow.uri='mlruns': an MLflow tracking URI: http(s)://HOST:PORT "
            "(a server), sqlite:///PATH (a local store) or databricks (MLflow 3 retired the "
            "file store; use sqlite:///<path>/mlflow.db)",
        ),
        (
            "tracking.wandb.mode=cloud",
            "error: tracking.wandb.mode='cloud': one of auto, offline, online (auto: online when "
            "an API key is set and W&B answers, else offline)",
        ),
        (
            "tracking.mlflow.experment=x",
            "error: tracking.mlflow.experment: unknown key (did you mean 'tracking.mlflow.experiment'?)",
        ),
    ],
)
def test_refusals(override, line, tmp_path):
    t = time.monotonic()
    proc, run = run_train(
        "report_to=mlflow" if override.startswith("tracking.") else "backend=dummy", override, outputs=tmp_path
    )
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line], proc.stderr
    assert run is None and not (tmp_path / "run").exists() and time.monotonic() - t < 30


def test_dry_run_says_where_it_logs(tmp_path):
    proc, _ = run_train(
        "report_to=[tensorboard,mlflow,wandb]",
        "tracking.mlflow.uri=sqlite:///rel/m.db",
        "dry_run=true",
        outputs=tmp_path,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"mlflow: experiment 'run' at sqlite:///{tmp_path}/rel/m.db" in proc.stdout  # typed paths: from cwd
    assert "wandb: project 'run', mode auto" in proc.stdout and "dry run: nothing was written" in proc.stdout
    proc, _ = run_train("dry_run=true", outputs=tmp_path)
    assert "mlflow:" not in proc.stdout and "wandb:" not in proc.stdout  # tensorboard (default): as before


def test_default_store_is_under_outputs():
    from finetune import tracking

    env = dict(os.environ)
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        assert tracking.mlflow_uri(None) == f"sqlite:///{REPO / 'outputs' / 'mlflow' / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000/"
        assert tracking.mlflow_uri(None) == "http://127.0.0.1:5000"
        assert tracking.mlflow_uri("http://u:pw-SECRET9@host:80") == "http://u:pw-SECRET9@host:80"
        from finetune.secrets import redact

        assert "pw-SECRET9" not in redact("http://u:pw-SECRET9@host:80")  # a password in the URI is a secret
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_tensorboard_reaches_the_workers_mlflow_does_not(tmp_path):
    """The trainers keep reporting to TensorBoard only; MLflow / W&B are the driver's."""
    from finetune.tracking import wants

    assert wants(["tensorboard", "mlflow"], "tensorboard") and not wants("mlflow", "tensorboard")
    proc, _ = run_train("backend=flagembedding", "report_to=[tensorboard,mlflow]", "dry_run=true", outputs=tmp_path)
    assert '"--report_to", "tensorboard"' in proc.stdout, proc.stdout[-2000:]
    proc, _ = run_train("backend=flagembedding", "report_to=mlflow", "dry_run=true", outputs=tmp_path)
    assert '"--report_to", "none"' in proc.stdout
    proc, _ = run_train("backend=llamafactory", "report_to=mlflow", "dry_run=true", outputs=tmp_path)
    assert "report_to: none" in proc.stdout and "MLflow / W&B runs are logged by the driver" in proc.stdout


def test_params_and_tags_hold_no_secret():
    from finetune import secrets, tracking

    config = {
        "name": "run",
        "lora_r": 8,
        "report_to": "mlflow",
        "tracking": {"mlflow": {"uri": "x"}},
        "backend": {
            "name": "llamafactory",
            "methods": ["lora"],
            "extra": {"hf_hub_token": SECRET},
            "template": "default",
            "stage": "sft",
        },
        "model": {"name": "tiny_llama", "path": "/m", "family": "llama", "kind": "causal_lm", "builder": "x"},
        "method": {"name": "lora", "lora_r": 8},
        "hardware": {"name": "cpu", "precision": "fp32"},
        "data": {"name": "tiny_alpaca", "path": "/d", "format": "alpaca"},
        "launcher": {"name": "local", "nproc_per_node": 1, "nnodes": 1, "partition": "x"},
    }
    secrets.collect(config)
    params = tracking.params(config, ["lora_r=8", f"+backend.extra.hf_hub_token={SECRET}"], {"experiment": "x"})
    assert SECRET not in json.dumps(params)
    assert params["overrides"] == "lora_r=8 +backend.extra.hf_hub_token=<redacted>"
    assert params["backend"] == "llamafactory" and params["backend.stage"] == "sft" and params["lora_r"] == "8"
    assert params["experiment"] == "x" and "tracking" not in params and "launcher.partition" not in params
    assert "backend.extra" not in params and "backend.methods" not in params
    manifest = {"config": config, "git": {"commit": "abc", "dirty": True}}
    tags = tracking.tags(manifest, Path("/runs/a"), {"sweep_dir": "/s", "num": "1", "parent_run_id": "p"})
    assert tags["mlflow.parentRunId"] == "p" and tags["git.dirty"] == "true" and tags["finetune.run_dir"] == "/runs/a"
    assert SECRET not in json.dumps(tags)


# ------------------------------------------------------------------------------------------- never fails a run


@pytest.mark.slow
def test_closed_port_completes_with_one_warning_line(tmp_path):
    from finetune.osutil import free_port

    port = free_port()  # nothing listens there
    proc, run = run_train(
        "backend=dummy",
        "report_to=[tensorboard,mlflow]",
        f"tracking.mlflow.uri=http://127.0.0.1:{port}",
        outputs=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    line = one_warning(proc)
    assert f"127.0.0.1:{port}" in line and "[finetune] completed:" in proc.stdout
    assert read_json(run / "manifest.json")["status"] == "completed" and (run / "metrics.json").exists()
    # the client gives up in seconds, not after its default ~4 minutes of retries (the settings, not a timing)
    from finetune import tracking

    assert tracking.MLFLOW_HTTP_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert int(tracking.MLFLOW_HTTP_ENV["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 5


@pytest.mark.slow
def test_closed_port_sweep_completes(tmp_path):
    from finetune.osutil import free_port

    port = free_port()
    proc, _ = run_train(
        "backend=dummy",
        "lora_r=4,8",
        "report_to=mlflow",
        f"tracking.mlflow.uri=http://127.0.0.1:{port}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        outputs=tmp_path,
        multirun=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("[finetune] warning: mlflow tracking is off") for ln in lines), lines
    assert "summary: " in proc.stdout and (tmp_path / "sweep" / "summary.csv").exists()  # parent + 2 jobs


@pytest.mark.slow
def test_resume_continues_the_mlflow_run(tmp_path):
    """A run cut short (here: timeout_min) and resumed logs into the same MLflow run, each step once. The local
    SQLite store (no server) is the same client path as the default outputs/mlflow store."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    args = [
        "backend=dummy",
        "backend.steps=8",
        "backend.sleep_s=3",
        "tracking.flush_s=0.5",
        "report_to=mlflow",
        f"tracking.mlflow.uri={uri}",
    ]
    proc, run = run_train(*args, "timeout_min=0.25", outputs=tmp_path)  # 15 s of 24: cut after some steps
    assert proc.returncode == 1 and "timed out" in proc.stderr, proc.stderr
    state = read_json(run / "tracking.json")
    run_id = state["mlflow"]["run_id"]
    _, runs = runs_of(uri, "run")
    assert [r.info.status for r in runs] == ["FAILED"] and 0 < state["last_steps"]["loss"] < 8
    proc, again = run_train(f"output_dir={run}", "resume=true", "timeout_min=0", outputs=None)
    assert proc.returncode == 0 and again == run, proc.stderr
    _, runs = runs_of(uri, "run")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    steps = [m.step for m in client(uri).get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 9))  # the dummy logs steps 1.. again on resume: each once here


# ------------------------------------------------------------------------------------------- W&B offline


def inspect(target: Path, summary: bool):
    """`wandb leet inspect` reads an offline run's transaction log: no network, no account."""
    argv = [WANDB, "leet", "inspect", "--json", *(["--summary"] if summary else []), str(target)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=user_env(WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if summary else [json.loads(line) for line in proc.stdout.splitlines() if line]


def offline_run(parent: Path) -> Path:
    found = sorted((Path(parent) / "wandb").glob("offline-run-*"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_wandb_offline_run_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc, run = run_train(
        "backend=dummy", "backend.steps=5", "report_to=wandb", "name=wb", outputs=tmp_path, env={"HOME": str(home)}
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    folder = offline_run(run)
    assert "[finetune] wandb: offline run " in proc.stdout and f"wandb sync {folder}" in proc.stdout
    s = inspect(folder, summary=True)
    assert (s["name"], s["project"], s["state"], s["exit_code"]) == (run.name, "wb", "finished", 0)
    assert s["config"]["backend"] == "dummy" and s["config"]["run_dir"] == str(run) and s["config"]["lora_r"] == "8"
    assert s["summary"]["train_loss"] == pytest.approx(0.4) and s["summary"]["finetune_status"] == "completed"
    records = inspect(folder / f"run-{s['run_id']}.wandb", summary=False)
    run_rec = next(r["run"] for r in records if r["type"] == "run")
    assert run_rec["job_type"] == "dummy" and "run_group" not in run_rec
    assert sorted(run_rec["tags"]) == ["dummy", "lora", "tiny_llama"]
    logged = [
        (r["history"]["step"]["num"], r["history"]["item"]["loss"])
        for r in records
        if r["type"] == "history" and "loss" in r["history"]["item"]
    ]
    assert logged == [(int(h["step"]), pytest.approx(h["loss"])) for h in history(run)]
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {"manifest.json", "metrics.json", "config.yaml", "history.jsonl"} <= saved
    assert [p for p in home.rglob("*") if "wandb" in p.name] == []  # not in ~/.cache, ~/.config, ~/.local


@pytest.mark.slow
def test_wandb_sweep_is_a_group(tmp_path):
    folder = tmp_path / "sweep"
    proc, _ = run_train(
        "backend=dummy", "lora_r=4,8", "report_to=wandb", f"hydra.sweep.dir={folder}", outputs=tmp_path, multirun=True
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    group = f"sweep-{folder.parent.name}-{folder.name}"
    for job, r in (("0", "4"), ("1", "8")):
        rec = next(x["run"] for x in inspect(offline_run(folder / job), False) if x["type"] == "run")
        assert (rec["run_group"], rec["display_name"], rec["job_type"]) == (group, f"job-{job} lora_r={r}", "dummy")
    records = inspect(offline_run(folder), False)
    rec = next(x["run"] for x in records if x["type"] == "run")
    assert (rec["run_group"], rec["job_type"]) == (group, "sweep")
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {"summary.csv", "summary.md", "loss_curves.png"} <= saved


# ------------------------------------------------------------------------------------------- a real server


@pytest.mark.slow
def test_tiny_run_logged_to_the_server(mlflow_server, tmp_path, tiny_model):
    tiny_model("tiny_llama")
    url = mlflow_server["url"]
    proc, run = run_train(
        *TINY,
        "report_to=[tensorboard,mlflow]",
        f"tracking.mlflow.uri={url}",
        "tracking.mlflow.experiment=tiny",
        outputs=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr
    _, runs = runs_of(url, "tiny")
    assert len(runs) == 1
    r = runs[0]
    manifest = read_json(run / "manifest.json")
    assert (r.info.status, r.info.run_name) == ("FINISHED", run.name)
    assert manifest["tracking"]["mlflow"]["run_id"] == r.info.run_id and f"run {r.info.run_id}" in proc.stdout
    tags = r.data.tags
    assert SCHEME_TAGS <= set(tags)
    assert (tags["finetune.run_dir"], tags["finetune.backend"], tags["git.commit"]) == (
        str(run),
        "alpacalora",
        manifest["git"]["commit"],
    )
    p = r.data.params
    assert SCHEME_PARAMS <= set(p)
    assert (p["lora_r"], p["learning_rate"], p["max_steps"], p["model"], p["method"]) == (
        "8",
        "0.003",
        "6",
        "tiny_llama",
        "lora",
    )
    assert "max_steps=6" in p["overrides"] and len(p) < 150
    assert_history_logged(
        url, r.info.run_id, run, ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_rss_mb")
    )
    loss = [h["loss"] for h in history(run) if "loss" in h]
    assert len(loss) == 6 and loss[-1] < loss[0]
    metrics = r.data.metrics
    assert metrics["train_loss"] == pytest.approx(read_json(run / "metrics.json")["train_loss"])
    assert metrics["final_eval_loss"] == pytest.approx(read_json(run / "metrics.json")["eval_loss"])
    assert ARTIFACTS <= {a.path for a in client(url).list_artifacts(r.info.run_id)}
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))  # TensorBoard as before


@pytest.fixture(scope="module")
def alpaca_sweep(mlflow_server, tmp_path_factory, tiny_model):
    """The issue's `python train.py -m lora_r=4,8 report_to=mlflow` against a running server, on the tiny model."""
    tiny_model("tiny_llama")
    folder = tmp_path_factory.mktemp("sweep") / "sweep"
    proc, _ = run_train(
        "lora_r=4,8",
        *TINY,
        "report_to=mlflow",
        f"tracking.mlflow.uri={mlflow_server['url']}",
        "tracking.mlflow.experiment=sweep",
        f"hydra.sweep.dir={folder}",
        outputs=folder.parent,
        multirun=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp_id, runs = runs_of(mlflow_server["url"], "sweep")
    return folder, exp_id, runs


@pytest.mark.slow
def test_sweep_is_a_parent_run_with_a_child_per_job(alpaca_sweep, mlflow_server):
    folder, _, runs = alpaca_sweep
    url = mlflow_server["url"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["finetune.sweep_dir"] == str(folder)
    assert parent.data.params["swept"] == "lora_r"
    assert (parent.data.metrics["n_jobs"], parent.data.metrics["n_failed"]) == (2, 0)
    assert {"summary.csv", "summary.md", "summary.json", "loss_curves.png", "metric_vs_lora_r.png"} <= {
        a.path for a in client(url).list_artifacts(parent.info.run_id)
    }
    children = client(url).search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    assert [c.info.run_name for c in children] == ["job-0 lora_r=4", "job-1 lora_r=8"]
    for job, child in enumerate(children):
        assert child.info.status == "FINISHED" and child.data.params["lora_r"] == ("4", "8")[job]
        assert child.data.tags["finetune.run_dir"] == str(folder / str(job))
        assert child.data.tags["finetune.job"] == str(job)
        assert_history_logged(url, child.info.run_id, folder / str(job))
        assert ARTIFACTS <= {a.path for a in client(url).list_artifacts(child.info.run_id)}
    best = read_json(folder / "summary.json")
    assert parent.data.tags["finetune.best_job"] == str(best["best_job"])


@pytest.mark.slow
def test_failed_jobs_are_failed_children(mlflow_server, tmp_path):
    """A refused job config (steps=0) and a failing step (fail=true) are failed child runs with their errors."""
    url = mlflow_server["url"]
    proc, _ = run_train(
        "backend=dummy",
        "backend.steps=0,2",
        "backend.fail=false,true",
        "report_to=mlflow",
        f"tracking.mlflow.uri={url}",
        "tracking.mlflow.experiment=failing",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        outputs=tmp_path,
        multirun=True,
    )
    assert proc.returncode != 0
    _, runs = runs_of(url, "failing")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FAILED" and parent.data.metrics["n_failed"] == 3
    assert {n: c.info.status for n, c in children.items()} == {
        "job-0 backend.steps=0 backend.fail=False": "FAILED",
        "job-1 backend.steps=0 backend.fail=True": "FAILED",
        "job-2 backend.steps=2 backend.fail=False": "FINISHED",
        "job-3 backend.steps=2 backend.fail=True": "FAILED",
    }
    assert (
        children["job-0 backend.steps=0 backend.fail=False"].data.tags["finetune.error"]
        == "ConfigError: backend.steps=0: must be > 0"
    )
    failed = children["job-3 backend.steps=2 backend.fail=True"]
    assert failed.data.tags["finetune.error"].startswith("step 'dummy_train' exited with code 3")
    assert "logs" in {a.path for a in client(url).list_artifacts(failed.info.run_id)}  # the failed step's log


@pytest.mark.slow
@pytest.mark.optuna
def test_optuna_search_is_a_parent_run(tmp_path):
    """+hparams_search (Optuna) as any sweep: a parent run, a child per trial named by the values Optuna chose."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install hydra-optuna-sweeper")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc, _ = run_train(
        "+hparams_search=lora_optuna",
        "hydra.sweeper.n_trials=2",
        "backend=dummy",
        "report_to=mlflow",
        f"tracking.mlflow.uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'search'}",
        outputs=tmp_path,
    )
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    _, runs = runs_of(uri, "run")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (
        parent.data.params["swept"] == "lora_r,learning_rate,lora_dropout"
        and parent.data.params["sweeper"] == "OptunaSweeper"
        and parent.info.status == "FINISHED"
    )
    assert sorted(r.info.run_name.split()[0] for r in children) == ["job-0", "job-1"]
    for r in children:
        assert f"lora_r={r.data.params['lora_r']} " in r.info.run_name and "learning_rate=" in r.info.run_name


BACKENDS = {
    "dummy": ["backend=dummy", "backend.steps=4"],
    "alpacalora": TINY,
    "llamafactory": [
        "experiment=llamafactory_lora_sft",
        "max_steps=4",
        "eval_steps=2",
        "merge=false",
        f"+backend.extra.hf_hub_token={SECRET}",
    ],
    "flagembedding": [
        "backend=flagembedding",
        "backend.query_max_len=32",
        "backend.passage_max_len=32",
        "backend.train_group_size=4",
        "num_epochs=1",
        "batch_size=4",
        "micro_batch_size=4",
        "logging_steps=2",
        "launcher.omp_num_threads=1",
    ],
    "collie": [
        "backend=collie",
        "model=tiny_llama",
        "max_samples=40",
        "val_set_size=8",
        "batch_size=8",
        "micro_batch_size=4",
        "num_epochs=1",
        "cutoff_len=128",
        "logging_steps=1",
        "merge=false",
    ],
}
SEEN: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=[pytest.mark.collie] if b == "collie" else []) for b in BACKENDS]
)
@pytest.mark.slow
def test_every_backend_logs_the_same_way(backend, mlflow_server, tmp_path, tiny_model):
    """Each backend's run lands in one experiment with the same name, tags, params and metric names."""
    if backend == "collie":
        from test_collie import HAS_VENV

        if not HAS_VENV and os.environ.get("CI", "").lower() != "true":
            pytest.skip("Collie's environment is missing; create it with bash scripts/setup_collie_env.sh")
    tiny_model("tiny_llama")
    url = mlflow_server["url"]
    proc, run = run_train(
        *BACKENDS[backend],
        "report_to=mlflow",
        f"tracking.mlflow.uri={url}",
        "tracking.mlflow.experiment=backends",
        outputs=tmp_path,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr[-2000:]
    _, runs = runs_of(url, "backends")
    r = next(x for x in runs if x.data.tags.get("finetune.run_dir") == str(run))
    assert (r.info.status, r.info.run_name, r.data.tags["finetune.backend"]) == ("FINISHED", run.name, backend)
    assert SCHEME_TAGS <= set(r.data.tags) and SCHEME_PARAMS <= set(r.data.params)
    assert r.data.params["backend"] == backend
    assert_history_logged(url, r.info.run_id, run, ("loss",))
    final = read_json(run / "metrics.json")  # the final numbers, under the same names for every backend
    for k in ("train_loss", "eval_loss", "tokens_per_s"):
        if isinstance(final.get(k), float):
            assert r.data.metrics.get(f"final_{k}", r.data.metrics.get(k)) == pytest.approx(final[k]), k
    assert SECRET not in json.dumps({**r.data.params, **r.data.tags})
    SEEN[backend] = r


@pytest.mark.slow
def test_backends_share_one_experiment(mlflow_server):
    if len(SEEN) < 2:
        pytest.skip("needs the runs of test_every_backend_logs_the_same_way")
    _, runs = runs_of(mlflow_server["url"], "backends")
    assert {r.data.tags["finetune.backend"] for r in runs} == set(SEEN)
    for r in runs:  # the same tag and param names everywhere (each backend adds its own backend.* params)
        assert SCHEME_TAGS <= set(r.data.tags) and SCHEME_PARAMS <= set(r.data.params) and "loss" in r.data.metrics


@pytest.mark.slow
def test_server_dying_mid_run_leaves_the_run_alone(tmp_path):
    from finetune.tracking.server import start_server, stop_server

    info = start_server(tmp_path / "store")
    run_dir = tmp_path / "run"
    stopped = {}

    def kill_when_logging():
        end = time.monotonic() + 300
        while time.monotonic() < end and not stopped:
            state = read_json(run_dir / "tracking.json") if (run_dir / "tracking.json").exists() else {}
            if (state.get("last_steps") or {}).get("loss", 0) >= 2:
                os.killpg(int(info["pid"]), signal.SIGKILL)  # dies at once (a TERM lets it finish its requests)
                stopped["at"] = state["last_steps"]["loss"]
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_logging)
    killer.start()
    try:
        t = time.monotonic()
        proc, run = run_train(
            "backend=dummy",
            "backend.steps=24",
            "backend.sleep_s=0.5",
            "tracking.flush_s=0.5",
            "report_to=mlflow",
            f"tracking.mlflow.uri={info['url']}",
            outputs=tmp_path,
        )
        seconds = time.monotonic() - t
    finally:
        stopped.setdefault("at", None)
        killer.join()
        stop_server(info)
    assert stopped["at"] is not None and proc.returncode == 0, proc.stderr
    one_warning(proc)
    assert len(history(run)) == 24 and read_json(run / "manifest.json")["status"] == "completed"
    assert seconds < 120, seconds


@pytest.mark.slow
def test_reproduce_an_mlflow_run_id(mlflow_server, tmp_path):
    url = mlflow_server["url"]
    proc, run = run_train(
        "backend=dummy",
        "backend.steps=5",
        "report_to=mlflow",
        f"tracking.mlflow.uri={url}",
        "tracking.mlflow.experiment=repro",
        outputs=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    run_id = read_json(run / "manifest.json")["tracking"]["mlflow"]["run_id"]

    def reproduce(*args):
        return subprocess.run(
            [FINETUNE, "reproduce", *args], cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=600
        )

    out = reproduce(run_id, "--tracking-uri", url, "--allow-different", "--output-dir", str(tmp_path / "again"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"MLflow run {run_id} is the run folder {run}" in out.stdout
    assert "reproduced: loss curves identical" in out.stdout
    shutil.move(str(run), str(tmp_path / "moved"))  # the folder is gone: its artifacts are enough
    out = reproduce(run_id, "--tracking-uri", url, "--allow-different", "--output-dir", str(tmp_path / "again2"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "is not here; using its artifacts" in out.stdout and "reproduced: loss curves identical" in out.stdout
    bad = reproduce("0" * 32, "--tracking-uri", url)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: run=")


@pytest.mark.slow
def test_mlflow_ui_lists_the_sweep_jobs(alpaca_sweep, mlflow_server, tmp_path):
    """The UI in a real browser: headless Chromium renders the experiment's runs table; expanded, it lists the
    sweep's parent run and both jobs."""
    from browser import chromium, runs_page

    if not chromium():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing (.ci/run installs it)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    folder, exp_id, runs = alpaca_sweep
    shot = tmp_path / "ui.png"
    text = runs_page(f"{mlflow_server['url']}/#/experiments/{exp_id}/runs", shot)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    for name in ("job-0 lora_r=4", "job-1 lora_r=8", parent.info.run_name[:20]):
        assert name in text, text[:3000]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
