"""Bad input is refused with one line (key, value, what is allowed), exit code 2, before any output folder exists.

Table-driven: add a row to CASES (overrides, expected text in the message) or to _bad_files (a bad data file or
model folder made by a small function). The cases are checked in-process (conftest.refusal: Hydra's compose and
every check, reported as the CLI does); the contract itself (exit code 2, exactly one line on stderr, no traceback,
nothing written) is run as a user types it for one case of each kind (CONTRACT), the files and the YAML error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import refusal, run_train

CASES = [
    # unknown keys and groups (close-match suggestions)
    (["lora_rr=3"], "lora_rr: unknown key (did you mean 'lora_r'?)"),
    (["method.lora_rr=3"], "did you mean 'method.lora_r'?"),
    (
        ["backend=colie"],
        "backend='colie': one of alpacalora, auto, collie, dummy, flagembedding, llamafactory (did you mean 'collie'?)",
    ),
    (["method=qlra"], "method='qlra': one of"),
    (["hardware=gpu"], "hardware='gpu'"),
    (["+experiment=nope"], "experiment='nope'"),
    # wrong types
    (["lora_r=abc"], "lora_r='abc': must be int"),
    (["learning_rate=fast"], "learning_rate='fast': must be float"),
    (["train_on_inputs=maybe"], "train_on_inputs='maybe'"),
    # zero / negative / out of range
    (["lora_r=0"], "lora_r=0: must be an integer > 0"),
    (["lora_r=-4"], "lora_r=-4"),
    (["batch_size=0"], "batch_size=0: must be > 0"),
    (["micro_batch_size=-1"], "micro_batch_size=-1: must be > 0"),
    (["learning_rate=0"], "learning_rate=0.0: must be > 0"),
    (["lora_dropout=1.0"], "lora_dropout=1.0: must be in [0, 1)"),
    (["lora_dropout=-0.1"], "lora_dropout=-0.1: must be in [0, 1)"),
    (["warmup_ratio=1.5"], "warmup_ratio=1.5: must be in [0, 1)"),
    (["cutoff_len=0"], "cutoff_len=0: must be > 0"),
    (["lr_scheduler_type=cosin"], "lr_scheduler_type='cosin': one of"),
    # batch arithmetic
    (["batch_size=10"], "batch_size=10: must be a multiple of micro_batch_size x data-parallel size = 4 x 1 = 4"),
    (["batch_size=12", "launcher.nproc_per_node=2"], "= 4 x 2 = 8"),
    # LoRA options with non-LoRA methods
    (["method=full", "lora_r=16"], "lora_r=16: LoRA options do not apply to method=full"),
    (["method=freeze", "lora_alpha=8"], "LoRA options do not apply to method=freeze"),
    (["method=galore", "lora_dropout=0.1"], "LoRA options do not apply to method=galore"),
    (["method=badam", "lora_r=4"], "LoRA options do not apply to method=badam"),
    # method rules
    (["method=galore", "backend=collie"], "method='galore': backend collie can run"),
    (["method=galore", "method.galore_layerwise=true"], "layer-wise GaLore does not support gradient accumulation"),
    (
        ["method=badam", "method.badam_mode=ratio", "launcher.nproc_per_node=2", "batch_size=64"],
        "ratio-wise BAdam runs on one process only",
    ),
    (["method=pissa", "method.use_dora=true"], "PiSSA and DoRA cannot be combined"),
    (["method=freeze", "method.freeze_trainable_layers=0"], "freeze_trainable_layers=0"),
    # hardware
    (["hardware.precision=fp16"], "hardware.precision='fp16': fp16 needs a GPU"),
    (["hardware.deepspeed_stage=5"], "hardware.deepspeed_stage=5: one of null, 0, 1, 2, 3"),
    # paths
    (["data.path=/nonexistent/x.json"], "data.path='/nonexistent/x.json': no such file or folder"),
    (["model=llama"], "model.path: required value is missing"),
    (["model=llama", "model.path=/nonexistent"], "model.path='/nonexistent': no such folder"),
    (["allow_outside_outputs=false", "output_dir=/tmp/elsewhere"], "output_dir='/tmp/elsewhere': must be inside"),
    # model kind vs backend
    (["model=tiny_bert"], "model='tiny_bert': is a encoder model; backend alpacalora trains causal_lm models"),
    # override syntax
    (["lora_r"], "override 'lora_r': cannot be parsed"),
    (["lora_r=[1"], "override 'lora_r=[1': cannot be parsed"),
]
# one case of each kind, run as a user types it: Hydra's compose errors (unknown key, group option, type, syntax),
# our rules, paths, and the ones decided before Hydra starts (resume replays the recorded run's overrides)
CONTRACT = [
    (["lora_rr=3"], "lora_rr: unknown key (did you mean 'lora_r'?)"),
    (["backend=colie"], "(did you mean 'collie'?)"),
    (["lora_r=abc"], "lora_r='abc': must be integer"),
    (["lora_r"], "override 'lora_r': cannot be parsed"),
    (["batch_size=10"], "batch_size=10: must be a multiple of micro_batch_size"),
    (["model=llama", "model.path=/nonexistent"], "model.path='/nonexistent': no such folder"),
    (["resume=true"], "holds no run to resume (no manifest.json)"),  # run_train adds output_dir=<new folder>
]


def _bad_files(tmp: Path) -> list:
    """(overrides, expected) for data files and model folders made here."""
    cases = []
    empty = tmp / "empty.json"
    empty.write_text("")
    cases.append(([f"data.path={empty}"], "file is empty"))
    latin = tmp / "latin1.jsonl"
    latin.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    cases.append(([f"data.path={latin}"], "not UTF-8"))
    notjson = tmp / "notjson.jsonl"
    notjson.write_text("instruction: hello\noutput: world\n")
    cases.append(([f"data.path={notjson}"], "line 1 is not valid JSON"))
    brokenlist = tmp / "broken.json"
    brokenlist.write_text('[{"instruction": "a", "output": "b"},')
    cases.append(([f"data.path={brokenlist}"], "not valid JSON"))
    csv = tmp / "data.csv"
    csv.write_text("a,b\n")
    cases.append(([f"data.path={csv}"], "must be a .json or .jsonl file"))
    shape = tmp / "shape.jsonl"
    rows = [{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "a", "answer": "b"}]
    shape.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases.append(([f"data.path={shape}", "data.format=alpaca"], "row 3 missing string field 'output'"))
    emb = tmp / "emb.jsonl"
    emb.write_text(json.dumps({"query": "q", "pos": "not a list"}) + "\n")
    cases.append(([f"data.path={emb}", "data.format=auto"], "row 1 field 'pos' must be a non-empty list of strings"))
    nomodel = tmp / "model_without_config"
    nomodel.mkdir()
    cases.append((["model=llama", f"model.path={nomodel}"], "has no config.json"))
    remote = tmp / "remote_model"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "internlm2", "auto_map": {"AutoModel": "x.Y"}}))
    (remote / "tokenizer_config.json").write_text("{}")
    cases.append(
        (["model=llama", f"model.path={remote}"], "trust_remote_code=False: model remote_model needs its own code")
    )
    badtok = tmp / "bad_tokenizer"
    badtok.mkdir()
    (badtok / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (badtok / "tokenizer_config.json").write_text("{not json")
    cases.append((["model=llama", f"model.path={badtok}"], "tokenizer_config.json is not valid JSON"))
    notok = tmp / "no_tokenizer"
    notok.mkdir()
    (notok / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases.append((["model=llama", f"model.path={notok}"], "has no tokenizer files"))
    return cases


def _check_refusal(overrides, expected, outputs: Path):
    proc, _ = run_train(*overrides, outputs=outputs, timeout=60)
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{overrides}: exit {proc.returncode}\nstderr: {err}\nstdout: {proc.stdout[-500:]}"
    assert len(err.splitlines()) == 1, f"{overrides}: expected one line, got:\n{err}"
    assert err.startswith("error: "), err
    assert expected in err, f"{overrides}: {expected!r} not in {err!r}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not outputs.exists() or not any(outputs.rglob("*")), (
        f"{overrides}: output written: {list(outputs.rglob('*'))}"
    )
    # speed is measured by bench/compose.py (about 1 s on an idle 2-core machine), not asserted here


@pytest.mark.parametrize("overrides,expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_refused(overrides, expected, tmp_path):
    code, message = refusal(*overrides, outputs=tmp_path / "outputs")
    assert code == 2 and expected in message, (code, message)
    assert "\n" not in message
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("overrides,expected", CONTRACT, ids=[" ".join(c[0]) for c in CONTRACT])
def test_refused_as_typed(overrides, expected, tmp_path):
    _check_refusal(overrides, expected, tmp_path / "outputs")


def test_refused_files(tmp_path):
    for overrides, expected in _bad_files(tmp_path):
        _check_refusal(overrides, expected, tmp_path / "outputs")


def test_malformed_experiment_yaml(tmp_path):
    """A broken experiment file in a user's own config folder (hydra.searchpath) is refused with its file and line."""
    extra = tmp_path / "myconf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("# @package _global_\nlora_r: [8\nlearning_rate: 1e-4\n")
    _check_refusal(
        [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "+experiment=broken"],
        "malformed YAML",
        tmp_path / "outputs",
    )


def test_existing_run_folder_is_never_overwritten(tmp_path):
    out = tmp_path / "outputs" / "runs" / "mine"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    proc, _ = run_train("backend=dummy", f"output_dir={out}", outputs=tmp_path / "outputs")
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_paths_with_spaces_unicode_and_shell_characters_work(tmp_path):
    """Such paths are passed as argv elements, never through a shell: the dry run and a dummy run both work."""
    weird = tmp_path / "my data ü $(touch PWNED); rm -rf x"
    weird.mkdir()
    src = Path(__file__).resolve().parents[1] / "data" / "samples" / "tiny_alpaca.json"
    data = weird / "d ata;`id`.json"
    data.write_text(src.read_text())
    out = tmp_path / "outputs" / "runs" / "ö ;&|"
    proc, _ = run_train("backend=dummy", f"data.path='{data}'", f"output_dir='{out}'", outputs=tmp_path / "outputs")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").exists()
    assert not list(tmp_path.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert str(data) in manifest["data"]["files"]
