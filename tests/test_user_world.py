"""What a user types, as typed: paths from another working folder, keys added with `+`, a model path with a typo,
folders a run must never touch, secrets, keys a backend would ignore, resume, and the progress line on a terminal.

Each test runs train.py as a subprocess with the user's environment (no FINETUNE_* variables).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PY, REPO, read_json, run_in_terminal, run_train, user_env

TINY = [
    "max_samples=64",
    "val_set_size=8",
    "batch_size=4",
    "micro_batch_size=4",
    "max_steps=4",
    "logging_steps=1",
    "cutoff_len=128",
]


def one_line_refusal(proc, *expected):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- keys typed with +


@pytest.mark.parametrize(
    "override,expected",
    [
        ("+unknown_key=1", "unknown_key: unknown key"),
        ("+lora_rnk=16", "lora_rnk: unknown key (did you mean 'lora_r'?)"),
        ("++lora_rnk=16", "did you mean 'lora_r'?"),
        ("+method.lora_rr=3", "method.lora_rr: unknown key (did you mean 'method.lora_r'?)"),
        (
            "+backend.extra.hf_hub_token=x",
            "backend.extra.hf_hub_token: unknown key (backend (alpacalora) has no such key",
        ),
    ],
)
def test_keys_added_with_plus_must_exist(tmp_path, override, expected):
    proc, _ = run_train(override, outputs=tmp_path)
    one_line_refusal(proc, expected)
    assert not tmp_path.exists() or not any(tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["backend=llamafactory", "+backend.extra.neftune_noise_alpha=5"],  # free-form: LLaMA-Factory's own keys
        ["launcher=slurm", "+launcher.additional_parameters.constraint=a100"],
        ["+sweep=lora_rank", "lora_r=4"],  # a group, not a key
        ["+sweep=learning_rate", "learning_rate=1e-3,3e-3"],
    ],
)
def test_plus_still_adds_what_is_allowed(tmp_path, overrides):
    multirun = any(o.startswith(("+sweep", "+hparams_search")) for o in overrides)
    proc, _ = run_train(*overrides, "dry_run=true", outputs=tmp_path, multirun=multirun)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------- model paths


def test_typo_in_model_path_is_refused_never_built(tmp_path):
    proc, _ = run_train(f"model.path={tmp_path}/nonexistent/model", outputs=tmp_path / "o")
    one_line_refusal(proc, "model.path=", "no such folder", "built on first use only into")
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.slow
def test_a_models_own_builder_builds_only_into_the_models_cache(tmp_path):
    proc, _ = run_train("model=tiny_bert", "backend=flagembedding", "dry_run=true", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f'"{REPO}/models/tiny-bert"' in proc.stdout or (REPO / "models" / "tiny-bert" / "config.json").exists()


# ------------------------------------------------------------------------------------------- another folder


def train_from(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python <repo>/train.py ARGS` typed in ``folder``, with the user's environment."""
    return subprocess.run(
        [PY, str(REPO / "train.py"), *args], cwd=folder, env=user_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_relative_paths_are_the_users_working_folder(tmp_path):
    """From another folder: output_dir, data.path and backend.deepspeed typed relative to it; the repo's own
    defaults (data samples, models cache) found wherever the command runs."""
    work = tmp_path / "work"
    work.mkdir()
    rows = json.loads((REPO / "data" / "samples" / "tiny_alpaca.json").read_text())[:40]
    (work / "mine.json").write_text(json.dumps(rows))
    (work / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    mine = ("data.path=mine.json", "val_set_size=8", "output_dir=runs/one", "backend.deepspeed=ds.json")
    proc = train_from(work, *mine, "dry_run=true")
    assert proc.returncode == 0, proc.stderr
    assert f"run folder: {work}/runs/one" in proc.stdout
    proc = train_from(work, *mine, "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    # --cfg job shows the composed config before validation; the run's config has the absolute forms
    proc = train_from(work, "backend=dummy", "data.path=mine.json", "output_dir=runs/two", "backend.steps=2")
    assert proc.returncode == 0, proc.stderr
    cfg = read_json(work / "runs" / "two" / "resolved_config.json")
    assert cfg["data"]["path"] == str(work / "mine.json") and cfg["output_dir"] == str(work / "runs" / "two")
    assert cfg["model"]["path"] == str(REPO / "models" / "tiny-llama")
    assert read_json(work / "runs" / "two" / "manifest.json")["cwd"] == str(work)
    assert not (work / "outputs").exists() and not (work / "models").exists()


@pytest.mark.slow
def test_sweep_from_another_folder_lands_in_the_repos_multiruns(tmp_path):
    """`python <repo>/train.py -m ...` from another folder: the sweep folder is the repo's outputs/multiruns (as from
    the repo root), its summary lists every job, and nothing is written where the command ran."""
    work = tmp_path / "work"
    work.mkdir()
    proc = train_from(work, "-m", "backend=dummy", "backend.steps=2", "seed=1,2")
    found = re.search(r"summary: (\S+)/summary\.md \(2 jobs, 0 not completed", proc.stdout + proc.stderr)
    assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = Path(found.group(1))
    try:
        assert folder.parent.parent == REPO / "outputs" / "multiruns", folder
        assert [read_json(folder / job / "manifest.json")["status"] for job in ("0", "1")] == ["completed"] * 2
        assert list(work.iterdir()) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------- folders not ours


@pytest.mark.parametrize(
    "backend,key",
    [
        ("alpacalora", "merge_path"),
        ("alpacalora", "target_path"),
        ("llamafactory", "merge_path"),
        ("llamafactory", "target_path"),
        ("flagembedding", "target_path"),
        ("collie", "merge_path"),
        ("dummy", "merge_path"),
    ],
)
def test_existing_non_empty_output_folder_is_refused(tmp_path, backend, key):
    mine = tmp_path / "my_models" / "x"
    mine.mkdir(parents=True)
    (mine / "precious.txt").write_text("keep me")
    proc, _ = run_train(f"backend={backend}", f"{key}={mine}", outputs=tmp_path / "o")
    one_line_refusal(proc, f"{key}=", "exists and is not empty", "never deletes or writes into")
    assert (mine / "precious.txt").read_text() == "keep me" and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_merge_never_deletes_an_existing_folder(tmp_path, tiny_model):
    """The merge step itself (not only validation) refuses a non-empty target instead of replacing it."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = subprocess.run(
        [
            PY,
            "-m",
            "finetune.recipes.merge",
            "--base",
            str(tiny_model()),
            "--adapter",
            str(tmp_path / "none"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "exists and is not empty" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- secrets


def test_secret_redaction_rules():
    from finetune.secrets import collect, is_secret_key, redact

    for key in (
        "hf_hub_token",
        "backend.extra.hf_hub_token",
        "api_key",
        "WANDB_API_KEY",
        "HF_TOKEN",
        "password",
        "mlflow_tracking_token",
        "FINETUNE_SECRETS",
    ):
        assert is_secret_key(key), key
    for key in ("pad_token", "eos_token", "max_new_tokens", "new_special_tokens", "cutoff_len", "train_tokens"):
        assert not is_secret_key(key), key
    collect({"backend": {"extra": {"hf_hub_token": "hf_ABCDEFGH123"}}})
    assert redact(["+backend.extra.hf_hub_token=hf_ABCDEFGH123", "lora_r=8"]) == [
        "+backend.extra.hf_hub_token=<redacted>",
        "lora_r=8",
    ]
    assert redact({"argv": ["--hf_hub_token", "hf_ABCDEFGH123"], "text": "token is hf_ABCDEFGH123!"}) == {
        "argv": ["--hf_hub_token", "<redacted>"],
        "text": "token is <redacted>!",
    }


def test_secret_in_dry_run_is_shown_redacted(tmp_path):
    secret = "hf_DRYRUNSECRET0042"
    proc, _ = run_train(
        "backend=llamafactory", f"+backend.extra.hf_hub_token={secret}", "dry_run=true", outputs=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr and "<redacted>" in proc.stdout


@pytest.mark.slow
def test_secret_in_the_config_never_reaches_a_file_of_the_run(tmp_path):
    """A token passed in the config reaches LLaMA-Factory (through the worker's environment and argv), never a
    file of the run folder: manifest, overrides.yaml, config.yaml, resolved_config.json, train.yaml, logs."""
    secret = "hf_CONFIGSECRET0000042"
    proc, run = run_train(
        "experiment=llamafactory_lora_sft",
        "max_steps=2",
        "merge=false",
        "val_set_size=0",
        f"+backend.extra.hf_hub_token={secret}",
        outputs=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert secret not in proc.stdout + proc.stderr
    files = [f for f in run.rglob("*") if f.is_file()]
    assert len(files) > 10
    for f in files:
        assert secret.encode() not in f.read_bytes(), f
    assert "hf_hub_token: <redacted>" in (run / "llamafactory" / "train.yaml").read_text()
    assert "+backend.extra.hf_hub_token=<redacted>" in read_json(run / "manifest.json")["overrides"]


def test_llamafactory_worker_passes_secrets_as_arguments(tmp_path, monkeypatch):
    """The worker appends backend.extra secrets as key=value after the yaml (they override the <redacted> there)."""
    from finetune.recipes import llamafactory as llamafactory_worker

    seen = {}

    class Proc:
        def __init__(self, cmd, env):
            seen["cmd"] = cmd

        def send_signal(self, s):
            pass

        def wait(self):
            return 3

    monkeypatch.setattr(llamafactory_worker.subprocess, "Popen", Proc)
    monkeypatch.setenv("FINETUNE_SECRETS", json.dumps({"backend.extra.hf_hub_token": "hf_X1234", "other.key": "v"}))
    code = llamafactory_worker.main(
        ["--run-dir", str(tmp_path), "--output-dir", str(tmp_path / "c"), "--artefact", str(tmp_path / "o")]
        + ["--", "llamafactory-cli", "train", "t.yaml"]
    )
    assert code == 3 and seen["cmd"] == ["llamafactory-cli", "train", "t.yaml", "hf_hub_token=hf_X1234"]


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_refuses_a_changed_setting_and_a_missing_run(tmp_path):
    proc, run = run_train("backend=dummy", "backend.steps=3", "lora_r=16", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = read_json(run / "manifest.json")
    m["status"] = "interrupted"
    (run / "manifest.json").write_text(json.dumps(m))
    before = {f: (run / f).read_text() for f in ("config.yaml", "overrides.yaml")}
    proc, _ = run_train(f"output_dir={run}", "resume=true", "lora_r=8", outputs=tmp_path)
    one_line_refusal(proc, "lora_r='8': cannot change on resume", "was started with lora_r=16")
    proc, _ = run_train(f"output_dir={run}", "resume=true", "learning_rate=1e-3", outputs=tmp_path)
    one_line_refusal(proc, "learning_rate='1e-3': cannot change on resume", "without learning_rate (its default)")
    proc, _ = run_train(f"output_dir={tmp_path / 'nothing'}", "resume=true", outputs=tmp_path)
    one_line_refusal(proc, "holds no run to resume")
    # as typed: only the folder and resume=true; the recorded overrides (backend=dummy, lora_r=16) are replayed
    proc, _ = run_train(f"output_dir={run}", "resume=true", "timeout_min=5", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = read_json(run / "manifest.json")
    assert m["status"] == "completed" and len(m["resumes"]) == 1 and m["config"]["lora_r"] == 16
    assert read_json(run / "resolved_config.json")["backend"]["name"] == "dummy"
    assert {f: (run / f).read_text() for f in ("config.yaml", "overrides.yaml")} == before
    proc, _ = run_train(f"output_dir={run}", "resume=true", outputs=tmp_path)
    one_line_refusal(proc, "completed; there is nothing to resume")


@pytest.mark.slow
def test_collie_refuses_resume(tmp_path):
    proc, run = run_train("backend=dummy", "backend.steps=2", outputs=tmp_path)
    m = read_json(run / "manifest.json")
    m.update(status="failed", overrides=["backend=collie"])
    (run / "manifest.json").write_text(json.dumps(m))
    (run / "overrides.yaml").write_text("- backend=collie\n")
    proc, _ = run_train(f"output_dir={run}", "resume=true", outputs=tmp_path)
    one_line_refusal(proc, "the collie backend does not resume")


# ------------------------------------------------------------------------------------------- the terminal


@pytest.mark.slow
def test_progress_line_on_a_terminal_plain_lines_in_the_log(tmp_path):
    out = tmp_path / "run"
    text = run_in_terminal(
        [PY, str(REPO / "train.py"), *TINY, "max_steps=6", "merge=false", f"output_dir={out}"], cwd=REPO
    )
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)
    bars = [ln for ln in re.split(r"[\r\n]", plain) if re.search(r"\btrain\b.*\d+/6\b", ln)]
    assert bars, plain[-3000:]
    final = bars[-1]
    assert "6/6" in final and "loss" in final and "tokens/s" in final and "elapsed" in final and "ETA" in final
    log = (out / "logs" / "train.log").read_text()
    assert "\x1b[" not in log and "step=6" in log  # the log keeps plain lines


def test_progress_reader_understands_every_backend_row():
    from finetune.launchers.progress import read_progress

    assert read_progress({"step": 3, "total_steps": 10, "loss": 1.5, "tokens_per_s": 900.0}) == {
        "step": 3,
        "total": 10,
        "loss": 1.5,
        "tokens_per_s": 900.0,
    }
    lf = {"current_steps": 4, "total_steps": 16, "loss": 2.0, "throughput": 321.5, "percentage": 25.0}
    assert read_progress(lf) == {"step": 4, "total": 16, "loss": 2.0, "tokens_per_s": 321.5}


def test_dry_run_of_an_optuna_search_is_refused_with_the_way_to_see_a_trial(tmp_path):
    proc, _ = run_train("+hparams_search=lora_optuna", "dry_run=true", outputs=tmp_path)
    one_line_refusal(
        proc, "dry_run=True: an Optuna search (+hparams_search=lora_optuna) samples each trial", "dry_run=true"
    )
