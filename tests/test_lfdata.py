"""Users' own LLaMA-Factory datasets (data=llamafactory), mixtures and preference evaluation: config, validation and
plan tiers (fast, in-process: conftest.refusal and the plan), plus the real runs that prove each LLaMA-Factory demo
file trains for its stage (slow: one sweep, one driver, so LLaMA-Factory is imported once).

- every entry of LLaMA-Factory 0.9.5's data/dataset_info.json (shipped in data/llamafactory) validates for the stage
  it is meant for, or is refused in one line saying why (a hub dataset, a multimodal one);
- rows LLaMA-Factory would drop or fail on are refused with the dataset, the file, the row number and what is wrong;
- backend=llamafactory reads the user's folder unchanged; a mixture's sampled rows are written by the train step
  and counted exactly as validation counted them; alpacalora trains the converted rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import REPO, read_json, refusal, run_train

LF_DIR = REPO / "data" / "llamafactory"
INFO = json.loads((LF_DIR / "dataset_info.json").read_text())
# what each entry whose file ships with LLaMA-Factory 0.9.5 is for (None: refused, with the reason's words)
SHIPPED = {
    "identity": ("alpaca", "sft"),
    "alpaca_en_demo": ("alpaca", "sft"),
    "alpaca_zh_demo": ("alpaca", "sft"),
    "glaive_toolcall_en_demo": ("sharegpt", "sft"),
    "glaive_toolcall_zh_demo": ("sharegpt", "sft"),
    "dpo_en_demo": ("preference", "dpo"),
    "dpo_zh_demo": ("preference", "dpo"),
    "kto_en_demo": ("kto", "kto"),
    "wiki_demo": ("text", "pt"),
    "c4_demo": ("text", "pt"),
    "mllm_demo": (None, "is a multimodal dataset (columns.images='images')"),
    "mllm_audio_demo": (None, "is a multimodal dataset (columns.audios='audios')"),
    "mllm_video_demo": (None, "is a multimodal dataset (columns.videos='videos')"),
    "mllm_video_audio_demo": (None, "is a multimodal dataset (columns.videos='videos')"),
}


def test_the_registry_is_llamafactorys_own():
    """104 entries; the files named by the entries that are not hub datasets are exactly the shipped ones."""
    assert len(INFO) == 104
    with_file = {n for n, e in INFO.items() if "file_name" in e}
    assert with_file == set(SHIPPED)
    for name in SHIPPED:
        assert (LF_DIR / INFO[name]["file_name"]).is_file(), name
    assert "Apache License" in (LF_DIR / "LICENSE").read_text()


def test_every_hub_entry_is_refused_in_one_line():
    from finetune.errors import ConfigError
    from finetune.lfdata import load_entry

    hub = [n for n in INFO if n not in SHIPPED]
    assert len(hub) == 90
    for name in hub:
        with pytest.raises(ConfigError) as e:
            load_entry(INFO, name, LF_DIR)
        msg = str(e.value)
        assert msg.startswith(f"data.dataset={name!r}: is a ") and "nothing is downloaded here" in msg, msg
        assert "\n" not in msg


@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_shipped_entry_validates_for_its_stage(name, tmp_path):
    fmt, stage = SHIPPED[name]
    typed = ["backend=llamafactory", "data=llamafactory", f"data.dataset={name}", "val_set_size=0"]
    code, message = refusal(*typed, f"backend.stage={stage if fmt else 'sft'}", outputs=tmp_path)
    if fmt is None:
        assert code == 2 and stage in message and "not supported" in message, message
        return
    assert (code, message) == (0, ""), message
    if stage != "sft":  # the right stage is named when another is asked for
        code, message = refusal(*typed, outputs=tmp_path)
        assert code == 2 and f"backend.stage={stage}" in message, message


@pytest.mark.parametrize("name", [n for n, (f, s) in SHIPPED.items() if f])
def test_alpacalora_trains_the_sft_entries_and_refuses_the_others(name, tmp_path):
    fmt, stage = SHIPPED[name]
    code, message = refusal("data=llamafactory", f"data.dataset={name}", "val_set_size=0", outputs=tmp_path)
    if stage == "sft":
        assert (code, message) == (0, ""), message
    else:
        assert code == 2 and f"holds {fmt} rows; this backend/stage takes alpaca, sharegpt" in message, message
        assert f"backend=llamafactory backend.stage={'dpo' if fmt == 'preference' else stage}" in message


def test_converted_rows_are_llamafactorys():
    """What alpacalora trains: LLaMA-Factory's converter's output in our formats (roles mapped, the system turn
    kept, function calls and observations in their places, tools kept for the system prompt)."""
    from finetune.lfdata import entry_rows, load_entry

    glaive = entry_rows(load_entry(INFO, "glaive_toolcall_en_demo", LF_DIR))
    raw = json.loads((LF_DIR / "glaive_toolcall_en_demo.json").read_text())
    assert len(glaive) == len(raw) == 300
    row = next(r for r, src in zip(glaive, raw) if any(t["from"] == "function_call" for t in src["conversations"]))
    assert {t["role"] for t in row["messages"]} >= {"user", "assistant", "function_call", "observation"}
    assert row["tools"].startswith("[") and "function" not in row.get("system", "")
    dpo = entry_rows(load_entry(INFO, "dpo_en_demo", LF_DIR))
    with_system = next(r for r in dpo if r["messages"][0]["role"] == "system")
    assert with_system["chosen"]["role"] == "assistant" and with_system["messages"][-1]["role"] == "user"
    kto = entry_rows(load_entry(INFO, "kto_en_demo", LF_DIR))
    assert sum(r["kto_tag"] for r in kto) == 150 and kto[0]["messages"][-1]["role"] == "assistant"
    wiki = entry_rows(load_entry(INFO, "wiki_demo", LF_DIR))
    assert len(wiki) == 30 and all(r["text"] for r in wiki)


# ------------------------------------------------------------------------------------------ refusals


def _folder(tmp: Path, entries: dict, files: dict) -> Path:
    """A LLaMA-Factory dataset folder: dataset_info.json and the files (name -> rows list or text)."""
    d = tmp / "lfdir"
    d.mkdir(exist_ok=True)
    (d / "dataset_info.json").write_text(json.dumps(entries))
    for name, rows in files.items():
        (d / name).write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return d


def _alpaca(n=4, **extra):
    return [{"instruction": f"say {i}", "input": "", "output": str(i), **extra} for i in range(n)]


def _conv(*roles, key="conversations", rt="from", ct="value"):
    return {key: [{rt: r, ct: f"turn {i}"} for i, r in enumerate(roles)]}


BAD_FOLDERS = [
    # (entries, files, overrides beyond data=llamafactory data.dataset_dir=..., expected words)
    (
        {"a": {"file_name": "a.json"}},
        {"a.json": _alpaca()[:2] + [{"instruction": "x", "input": "", "output": None}]},
        ["data.dataset=a"],
        "data.dataset='a': row 3 of ",
    ),
    (
        {"a": {"file_name": "a.json"}},
        {"a.json": _alpaca()[:2] + [{"instruction": "x", "input": "", "output": None}]},
        ["data.dataset=a"],
        "column 'output' (columns.response) must be a string, not null (LLaMA-Factory would drop",
    ),
    (
        {"a": {"file_name": "a.json", "columns": {"prompt": "q", "response": "a", "system": "sys"}}},
        {"a.json": [{"q": "x", "a": "y"}]},
        ["data.dataset=a"],
        "column 'sys' (columns.system) is in no row of the file: LLaMA-Factory would stop with KeyError: 'sys'",
    ),
    (
        {"a": {"file_name": "a.json", "colums": {}}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "field 'colums' of its entry is not one LLaMA-Factory 0.9.5 reads (it would be ignored)",
    ),
    (
        {"a": {"file_name": "a.json", "columns": {"promt": "instruction"}}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "columns.promt is not a field LLaMA-Factory 0.9.5 reads",
    ),
    (
        {"a": {"file_name": "a.json", "formatting": "sharegpt"}},
        {"a.json": [_conv("human", "gpt"), _conv("gpt", "human")]},
        ["data.dataset=a"],
        "row 2 of ",
    ),
    (
        {"a": {"file_name": "a.json", "formatting": "sharegpt"}},
        {"a.json": [_conv("human", "gpt"), _conv("gpt", "human")]},
        ["data.dataset=a"],
        "turn 0 has role 'gpt' where a user (tags.user_tag / observation_tag) turn must come ('human', 'observation')",
    ),
    (
        {"a": {"file_name": "a.json", "formatting": "sharegpt"}},
        {"a.json": [_conv("human", "gpt", "human")]},
        ["data.dataset=a"],
        "has 3 non-system turns; turns come in pairs (LLaMA-Factory would drop the row",
    ),
    (
        {
            "a": {
                "file_name": "a.json",
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {"messages": "conversations", "chosen": "c", "rejected": "r"},
            }
        },
        {"a.json": [{**_conv("human", "gpt"), "c": {"from": "gpt", "value": "x"}, "r": {"from": "gpt", "value": "y"}}]},
        ["backend=llamafactory", "backend.stage=dpo", "data.dataset=a"],
        "a preference row's turns end with the user",
    ),
    (
        {
            "a": {
                "file_name": "a.json",
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {"messages": "conversations", "chosen": "c", "rejected": "r"},
            }
        },
        {"a.json": [{**_conv("human"), "c": "x", "r": {"from": "gpt", "value": "y"}}]},
        ["backend=llamafactory", "backend.stage=dpo", "data.dataset=a"],
        "column 'c' (columns.chosen) must be a turn",
    ),
    (
        {
            "a": {
                "file_name": "a.json",
                "formatting": "sharegpt",
                "columns": {"messages": "m", "kto_tag": "label"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            }
        },
        {"a.json": [{**_conv("user", "assistant", key="m", rt="role", ct="content"), "label": "yes"}]},
        ["backend=llamafactory", "backend.stage=kto", "data.dataset=a"],
        "column 'label' (columns.kto_tag) must be true or false, not 'yes'",
    ),
    (
        {"a": {"file_name": "a.json", "formatting": "openai"}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "formatting 'openai': one of alpaca, sharegpt (openai: LLaMA-Factory's undocumented converter",
    ),
    (
        {"a": {"file_name": "a.parquet"}},
        {"a.parquet": "PAR1"},
        ["data.dataset=a"],
        "a.parquet is a parquet file: its rows cannot be checked before the run; convert it to JSON lines",
    ),
    ({"a": {"file_name": "nope.json"}}, {}, ["data.dataset=a"], "file_name 'nope.json': no such file or folder"),
    (
        {"a": {"file_name": "a.json", "split": "test"}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "split 'test': a local file holds one split, train",
    ),
    (
        {"a": {"file_name": "a.json", "num_samples": 0}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "num_samples must be an integer > 0, not 0",
    ),
    (
        {"a": {"file_name": "a.json", "ranking": True}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "ranking needs columns.chosen and columns.rejected",
    ),
    (
        {"a": {"file_name": "a.json", "script_url": "x"}},
        {"a.json": _alpaca()},
        ["data.dataset=a"],
        "is a dataset loading script (script_url='x'): nothing is downloaded here",
    ),
    (
        {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json", "formatting": "sharegpt"}},
        {"a.json": _alpaca(), "b.json": [_conv("human", "gpt", "human")]},
        ["data.dataset=[a,b]"],
        "row 1 of ",
    ),
    (
        {
            "a": {"file_name": "a.json"},
            "b": {
                "file_name": "b.json",
                "ranking": True,
                "columns": {"prompt": "instruction", "chosen": "c", "rejected": "r"},
            },
        },
        {"a.json": _alpaca(), "b.json": [{"instruction": "x", "c": "1", "r": "2"}]},
        ["backend=llamafactory", "data.dataset=[a,b]"],
        "a holds alpaca rows and b preference rows: one run trains one kind of data",
    ),
]


@pytest.mark.parametrize("entries,files,overrides,expected", BAD_FOLDERS, ids=[c[3][:50] for c in BAD_FOLDERS])
def test_bad_folder_refused(tmp_path, entries, files, overrides, expected):
    d = _folder(tmp_path, entries, files)
    code, message = refusal(
        "data=llamafactory", f"data.dataset_dir={d}", "val_set_size=0", *overrides, outputs=tmp_path / "outputs"
    )
    assert code == 2 and expected in message, (code, message)
    assert "\n" not in message and not (tmp_path / "outputs").exists()


def test_bad_registry_file_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    code, message = refusal(
        "data=llamafactory", f"data.dataset_dir={tmp_path / 'empty'}", "data.dataset=a", outputs=tmp_path / "o"
    )
    assert code == 2 and "has no dataset_info.json (LLaMA-Factory's list of the folder's datasets)" in message
    (tmp_path / "empty" / "dataset_info.json").write_text("{oops")
    code, message = refusal(
        "data=llamafactory", f"data.dataset_dir={tmp_path / 'empty'}", "data.dataset=a", outputs=tmp_path / "o"
    )
    assert code == 2 and "dataset_info.json': not valid JSON (line 1" in message, message


CASES = [
    (["data=llamafactory"], "data.dataset: required value is missing (datasets of "),
    (["data=llamafactory", "data.dataset=identty"], "(did you mean 'identity'?)"),
    (
        ["data=llamafactory", "data.dataset=alpaca_en"],
        "data.dataset='alpaca_en': is a Hugging Face hub dataset (hf_hub_url='llamafactory/alpaca_en'): nothing is "
        "downloaded here",
    ),
    (["data=llamafactory", "data.dataset=[identity,identity]"], "names 'identity' twice"),
    (["data=llamafactory", "data.dataset=identity", "data.path=x.json"], "give data.path (a file) or data.dataset"),
    (["data=llamafactory", "data.dataset=identity", "data.format=sharegpt"], "reads each dataset's format"),
    (
        ["backend=llamafactory", "data=llamafactory", "data.dataset=dpo_en_demo"],
        "data.format='preference': stage sft trains on alpaca, sharegpt data (preference data trains with "
        "backend.stage=rm or backend.stage=dpo)",
    ),
    (["backend=flagembedding", "data=llamafactory", "data.dataset=identity"], "this backend/stage takes embedding"),
    # mixtures
    (
        ["data=llamafactory", "data.dataset=[identity,alpaca_en_demo]", "data.mix={identity: 1, nope: 2}"],
        "'nope' is not a training dataset (data.dataset: identity, alpaca_en_demo)",
    ),
    (
        ["data=llamafactory", "data.dataset=[identity,alpaca_en_demo]", "data.mix={identity: 1}"],
        "gives no weight for 'alpaca_en_demo'; weigh every dataset of data.dataset",
    ),
    (
        ["data=llamafactory", "data.dataset=[identity,alpaca_en_demo]", "data.mix={identity: 0, alpaca_en_demo: 1}"],
        "data.mix.identity=0: must be a number > 0",
    ),
    (
        ["data=llamafactory", "data.dataset=[identity,alpaca_en_demo]", "data.mix_rows=100"],
        "data.mix_rows=100: sizes a mixture: set data.mix=",
    ),
    (["data.mix={a: 1}"], "mixes or holds out datasets of a dataset_info.json: data=llamafactory data.dataset=a,b"),
    (["data.eval_dataset=a"], "data.eval_dataset='a': mixes or holds out datasets"),
    (
        ["data=llamafactory", "data.dataset=identity", "data.eval_dataset=identity"],
        "holds out the only dataset of data.dataset: nothing to train on",
    ),
    (
        ["data=llamafactory", "data.dataset=identity", "data.eval_dataset=dpo_en_demo"],
        "data.eval_dataset='dpo_en_demo': holds preference rows; the training datasets alpaca rows",
    ),
    (
        ["data=llamafactory", "data.dataset=[identity,alpaca_en_demo]", "data.mix_strategy=interleave_under"],
        "data.mix_strategy='interleave_under': is LLaMA-Factory's own mixing (backend=llamafactory); on backend "
        "alpacalora mix with data.mix=",
    ),
    (
        [
            "backend=llamafactory",
            "data=llamafactory",
            "data.dataset=[identity,alpaca_en_demo]",
            "data.mix_strategy=interleave_once",
        ],
        "which datasets 4.0.0 (the version LLaMA-Factory 0.9.5 pins) lacks",
    ),
    (
        [
            "backend=llamafactory",
            "data=llamafactory",
            "data.dataset=[identity,alpaca_en_demo]",
            "data.mix_strategy=interleave_under",
            "data.interleave_probs=[0.5]",
        ],
        "one probability > 0 per training dataset (identity, alpaca_en_demo)",
    ),
    (
        [
            "backend=llamafactory",
            "data=llamafactory",
            "data.dataset=[identity,alpaca_en_demo]",
            "data.mix_strategy=interleave_over",
            "data.interleave_probs=[0.5,0.6]",
        ],
        "must sum to 1 (they sum to 1.1)",
    ),
    (
        [
            "backend=llamafactory",
            "data=llamafactory",
            "data.dataset=[identity,alpaca_en_demo]",
            "data.interleave_probs=[0.5,0.5]",
        ],
        "needs data.mix_strategy=interleave_under or interleave_over",
    ),
    (
        [
            "backend=llamafactory",
            "data=llamafactory",
            "data.dataset=[identity,alpaca_en_demo]",
            "data.mix_strategy=interleave_under",
            "data.mix={identity: 1, alpaca_en_demo: 1}",
        ],
        "choose one way to mix: data.mix, or data.mix_strategy=interleave_under",
    ),
    (
        ["backend=llamafactory", "+backend.extra.mix_strategy=interleave_under"],
        "backend.extra.mix_strategy='interleave_under': is written from data.mix_strategy",
    ),
    # preference evaluation
    (
        ["experiment=smollm2_dpo", "data=tiny_alpaca", "backend.stage=sft", "generate_eval=false"],
        "preference_eval=True: scores held-out preference pairs; the run's data holds alpaca rows",
    ),
    (
        ["experiment=smollm2_dpo", "backend.stage=rm", "generate_eval=false"],
        "preference_eval=True: scores a language model's answers; stage rm trains a reward model",
    ),
    (
        ["experiment=smollm2_dpo", "data.eval_path=null", "generate_eval=false"],
        "preference_eval=True: needs held-out pairs: val_set_size > 0, data.eval_path or data.eval_dataset",
    ),
    (
        ["metric=eval_preference_accuracy"],
        "metric='eval_preference_accuracy': is computed by the preference evaluation: set preference_eval=true",
    ),
    (["experiment=smollm2_dpo", "preference_eval_rows=-1"], "preference_eval_rows=-1: must be >= 0"),
    # starting from an adapter
    (
        ["backend=llamafactory", "adapter=/nonexistent/run"],
        "adapter='/nonexistent/run': no such folder (a run folder, or a folder with adapter_config.json)",
    ),
    (["backend=llamafactory", "adapter=data"], "holds no adapter_config.json (not a PEFT adapter)"),
]


@pytest.mark.parametrize("overrides,expected", CASES, ids=[" ".join(c[0])[:80] for c in CASES])
def test_refused(overrides, expected, tmp_path):
    code, message = refusal(*overrides, outputs=tmp_path / "outputs")
    assert code == 2 and expected in message, (code, message)
    assert "\n" not in message and not (tmp_path / "outputs").exists()


def _adapter(tmp: Path, base: str, peft_type="LORA") -> Path:
    a = tmp / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "base_model_name_or_path": base}))
    (a / "adapter_model.safetensors").write_bytes(b"")
    return a


def test_adapter_refusals(tmp_path, tiny_model):
    tiny = str(tiny_model("tiny_llama"))
    other = _adapter(tmp_path, "/models/elsewhere")
    code, message = refusal("backend=llamafactory", f"adapter={other}", outputs=tmp_path / "o")
    assert code == 2 and "was trained on /models/elsewhere, not on model.path" in message, message
    ok = tmp_path / "ok"
    ok.mkdir()
    good = _adapter(ok, tiny)
    code, message = refusal(f"adapter={good}", outputs=tmp_path / "o")  # alpacalora
    assert code == 2 and "is not used by backend alpacalora; starting from a trained adapter runs" in message, message
    code, message = refusal("backend=llamafactory", "method=full", f"adapter={good}", outputs=tmp_path / "o")
    assert code == 2 and "a new adapter trains on top: use a LoRA method, not method=full" in message, message
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"status": "failed", "outputs": {"adapter": str(good)}}))
    code, message = refusal("backend=llamafactory", f"adapter={run}", outputs=tmp_path / "o")
    assert code == 2 and "that run did not complete (status 'failed')" in message, message
    (run / "manifest.json").write_text(json.dumps({"status": "completed", "outputs": {"adapter": str(good)}}))
    assert refusal("backend=llamafactory", f"adapter={run}", outputs=tmp_path / "o") == (0, "")


# ------------------------------------------------------------------------------------------ plain files


def test_plain_files_in_llamafactorys_preference_and_kto_layouts(tmp_path):
    """data.path= a file of LLaMA-Factory's sharegpt preference rows (conversations + chosen/rejected) or KTO rows
    (messages + a boolean label) is recognised, its dataset_info entry written in that layout; its bad rows are
    refused with the row number."""
    from test_llamafactory import compose_plan

    dpo = json.loads((LF_DIR / "dpo_en_demo.json").read_text())[:6]
    kto = json.loads((LF_DIR / "kto_en_demo.json").read_text())[:6]
    (tmp_path / "dpo.json").write_text(json.dumps(dpo))
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    cfg, plan, t = compose_plan(
        tmp_path, f"data.path={tmp_path / 'dpo.json'}", "data.format=auto", "backend.stage=dpo", "val_set_size=0"
    )
    entry = json.loads(plan.files["llamafactory/dataset_info.json"])["train"]
    assert cfg.data.format == "preference" and entry["ranking"] is True and entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    cfg, plan, t = compose_plan(
        tmp_path, f"data.path={tmp_path / 'kto.jsonl'}", "data.format=auto", "backend.stage=kto", "val_set_size=0"
    )
    entry = json.loads(plan.files["llamafactory/dataset_info.json"])["train"]
    assert cfg.data.format == "kto" and entry["columns"] == {"messages": "messages", "kto_tag": "label"}
    assert entry["tags"]["role_tag"] == "role" and entry["tags"]["assistant_tag"] == "assistant"
    bad = dpo[:2] + [{**dpo[2], "chosen": "just text"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, message = refusal(
        "backend=llamafactory",
        "backend.stage=dpo",
        f"data.path={tmp_path / 'bad.json'}",
        "data.format=auto",
        outputs=tmp_path / "o",
    )
    assert code == 2 and "row 3 field 'chosen' must be an assistant turn" in message, message
    bad = kto[:1] + [{**kto[1], "label": "true"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, message = refusal(
        "backend=llamafactory",
        "backend.stage=kto",
        f"data.path={tmp_path / 'bad.json'}",
        "data.format=auto",
        outputs=tmp_path / "o",
    )
    assert code == 2 and "row 2" in message and "kto" in message, message


# ------------------------------------------------------------------------------------------ mixtures


def test_composition_arithmetic_and_sampling():
    from finetune.sources import composition, draw

    sizes = {"a": 91, "b": 999}
    assert composition(sizes, None, None) == sizes
    assert composition(sizes, {"a": 1.0, "b": 1.0}, None) == {"a": 91, "b": 91}  # no row repeated
    assert composition(sizes, {"a": 3.0, "b": 1.0}, None) == {"a": 91, "b": 30}
    assert composition(sizes, {"a": 1.0, "b": 2.0}, 301) == {"a": 100, "b": 201}  # largest remainder
    assert (
        sum(
            composition(
                sizes,
                {
                    "a": 1.0,
                    "b": 1.0,
                },
                7,
            ).values()
        )
        == 7
    )
    rng = random.Random("1/a/mix")
    picked = draw(91, 100, rng)
    assert sorted(set(picked)) == list(range(91)) and len(picked) == 100  # every row once, then repeats
    assert draw(91, 10, random.Random("x")) == draw(91, 10, random.Random("x"))  # seeded


def test_mixture_plan_and_sampled_rows(tmp_path):
    """data.mix on backend=llamafactory: the composition is decided at validation (the manifest's data), the train
    step writes exactly those rows, dataset_info.json gives them the entries' columns and tags, max_samples is not
    applied twice; the held-out dataset is LLaMA-Factory's eval_dataset."""
    from omegaconf import OmegaConf
    from test_llamafactory import compose_plan

    from finetune.sources import source_rows, write_sampled

    cfg, plan, t = compose_plan(
        tmp_path,
        "data=llamafactory",
        "data.dataset=[identity,glaive_toolcall_en_demo,alpaca_en_demo]",
        "data.mix={identity: 1, glaive_toolcall_en_demo: 2}",
        "data.mix_rows=90",
        "data.eval_dataset=alpaca_en_demo",
        "max_samples=200",
    )
    info = json.loads(plan.files["llamafactory/dataset_info.json"])
    folder = tmp_path / "run" / "llamafactory" / "data"
    assert t["dataset_dir"] == str(tmp_path / "run" / "llamafactory")
    assert t["dataset"] == "identity,glaive_toolcall_en_demo" and t["eval_dataset"] == "alpaca_en_demo"
    assert "max_samples" not in t and "val_size" not in t
    assert info["glaive_toolcall_en_demo"] == {
        **INFO["glaive_toolcall_en_demo"],
        "file_name": str(folder / "glaive_toolcall_en_demo.jsonl"),
    }
    argv = plan.steps[0].argv
    assert argv[argv.index("--write-data") + 1] == str(folder)
    plain = OmegaConf.to_container(cfg, resolve=True)
    files = write_sampled(plain, folder)
    counts = {n: len(Path(f).read_text().splitlines()) for n, f in files.items()}
    assert counts == {"identity": 30, "glaive_toolcall_en_demo": 60, "alpaca_en_demo": 200}
    per, held = source_rows(plain)
    assert {n: len(r) for n, r in per.items()} == {"identity": 30, "glaive_toolcall_en_demo": 60}
    first = json.loads(Path(files["identity"]).read_text().splitlines()[0])
    assert per["identity"][0]["output"] == first["output"]  # the same rows, in the same order
    # no mixture, no num_samples: LLaMA-Factory reads the user's folder unchanged
    cfg, plan, t = compose_plan(tmp_path, "data=llamafactory", "data.dataset=[identity,alpaca_en_demo]")
    assert t["dataset_dir"] == str(LF_DIR) and t["dataset"] == "identity,alpaca_en_demo"
    assert "llamafactory/dataset_info.json" not in plan.files and "--write-data" not in plan.steps[0].argv
    assert t["max_samples"] == 1000 and t["val_size"] == 0.1
    # LLaMA-Factory's own interleaving, passed through; the train step counts the rows it draws
    cfg, plan, t = compose_plan(
        tmp_path,
        "data=llamafactory",
        "data.dataset=[identity,alpaca_en_demo]",
        "data.mix_strategy=interleave_under",
        "data.interleave_probs=[0.25,0.75]",
    )
    assert (t["mix_strategy"], t["interleave_probs"]) == ("interleave_under", "0.25,0.75")
    spec = json.loads(plan.steps[0].argv[plan.steps[0].argv.index("--interleave") + 1])
    assert spec == {
        "sizes": {"identity": 91, "alpaca_en_demo": 999},
        "probabilities": [0.25, 0.75],
        "seed": 42,
        "strategy": "interleave_under",
    }


def test_interleaved_counts_match_llamafactorys_merge():
    """The train step's count of LLaMA-Factory's interleaving is datasets' own interleave_datasets on datasets of
    the same sizes: run here on real rows, the rows of each source are what the stand-ins count."""
    from datasets import Dataset, interleave_datasets

    from finetune.recipes.llamafactory import interleaved

    a = Dataset.from_dict({"x": [f"a{i}" for i in range(40)]})
    b = Dataset.from_dict({"x": [f"b{i}" for i in range(100)]})
    spec = {"sizes": {"a": 40, "b": 100}, "probabilities": [0.3, 0.7], "seed": 7, "strategy": "interleave_under"}
    real = interleave_datasets([a, b], probabilities=[0.3, 0.7], seed=7, stopping_strategy="first_exhausted")
    assert interleaved(spec) == {"a": sum(x[0] == "a" for x in real["x"]), "b": sum(x[0] == "b" for x in real["x"])}


def test_adapter_start_plan(tmp_path, tiny_model):
    """adapter=<run>: LLaMA-Factory merges it into the base and trains a new adapter on top; the export merges both;
    the evaluations before training load the base with it."""
    from omegaconf import OmegaConf
    from test_llamafactory import compose_plan

    tiny = str(tiny_model("tiny_llama"))
    good = _adapter(tmp_path, tiny)
    run = tmp_path / "sft"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"status": "completed", "outputs": {"adapter": str(good)}}))
    cfg, plan, t = compose_plan(
        tmp_path,
        "data=tiny_preference",
        "backend.stage=dpo",
        f"adapter={run}",
        "preference_eval=true",
        "val_set_size=16",
    )
    out = str(tmp_path / "run" / "lazyllm_lora")
    assert t["adapter_name_or_path"] == str(good) and t["create_new_adapter"] is True
    e = OmegaConf.to_container(OmegaConf.create(plan.files["llamafactory/export.yaml"]))
    assert e["adapter_name_or_path"] == f"{good},{out}"
    before = next(s for s in plan.steps if s.name == "preference_eval_before")
    assert before.argv[-2:] == ["--adapter", str(good)]
    cfg, plan, t = compose_plan(
        tmp_path,
        "data=tiny_preference",
        "backend.stage=dpo",
        f"adapter={run}",
        "method.create_new_adapter=false",
        "merge=false",
        "preference_eval=true",
        "val_set_size=16",
    )
    assert t["create_new_adapter"] is False
    after = next(s for s in plan.steps if s.name == "preference_eval_after")
    assert after.argv[-2:] == ["--adapter", out]


# ------------------------------------------------------------------------------------------ real runs


DEMO_JOBS = {  # every LLaMA-Factory demo file with the stage it is meant for, one job of one sweep each:
    # job name: (dataset, stage, pref_loss)
    "identity": ("identity", "sft", None),
    "glaive_toolcall_en_demo": ("glaive_toolcall_en_demo", "sft", None),
    "alpaca_en_demo": ("alpaca_en_demo", "sft", None),
    "alpaca_zh_demo": ("alpaca_zh_demo", "sft", None),
    "glaive_toolcall_zh_demo": ("glaive_toolcall_zh_demo", "sft", None),
    "wiki_demo": ("wiki_demo", "pt", None),
    "c4_demo": ("c4_demo", "pt", None),
    "dpo_en_demo_rm": ("dpo_en_demo", "rm", None),
    "dpo_zh_demo": ("dpo_zh_demo", "dpo", None),
    "dpo_en_demo_orpo": ("dpo_en_demo", "dpo", "orpo"),
    "dpo_en_demo_simpo": ("dpo_en_demo", "dpo", "simpo"),
    "kto_en_demo": ("kto_en_demo", "kto", None),
}


@pytest.mark.slow
def test_each_demo_file_trains_for_its_stage(tmp_path, tiny_model):
    """One sweep, one driver: LLaMA-Factory is imported once by the preloaded process and every job forks from it.
    A job per demo file and stage (a test-only config group on hydra.searchpath sets data.dataset, backend.stage and
    for ORPO / SimPO backend.pref_loss); every job completes and its train.yaml names the user's folder unchanged."""
    tiny_model("tiny_llama")
    group = tmp_path / "conf" / "lfdemo"
    group.mkdir(parents=True)
    for job, (name, stage, loss) in DEMO_JOBS.items():
        pref = f"  pref_loss: {loss}\n" if loss else ""
        (group / f"{job}.yaml").write_text(
            f"# @package _global_\ndata:\n  dataset: {name}\nbackend:\n  stage: {stage}\n{pref}"
        )
    proc, _ = run_train(
        "backend=llamafactory",
        "data=llamafactory",
        f"+lfdemo={','.join(DEMO_JOBS)}",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "max_steps=2",
        "batch_size=2",
        "micro_batch_size=2",
        "cutoff_len=48",
        "max_samples=8",
        "val_set_size=0",
        "merge=false",
        "logging_steps=1",
        "save_steps=0",
        "report_to=none",
        outputs=tmp_path / "sweep",
        multirun=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_json(tmp_path / "sweep" / "summary.json")
    assert summary["n_failed"] == 0
    jobs = sorted((p for p in (tmp_path / "sweep").iterdir() if (p / "manifest.json").exists()), key=lambda p: p.name)
    assert len(jobs) == len(DEMO_JOBS)
    for job in jobs:
        m = read_json(job / "manifest.json")
        name, stage = m["config"]["data"]["dataset"], m["config"]["backend"]["stage"]
        train = (job / "llamafactory" / "train.yaml").read_text()
        assert m["status"] == "completed" and f"stage: {stage}" in train, (name, m["status"])
        if stage == "dpo":
            assert f"pref_loss: {m['config']['backend']['pref_loss']}" in train
        assert f"dataset_dir: {LF_DIR}" in train and f"dataset: {name}" in train
        assert read_json(job / "metrics.json")["train_loss"] > 0, name


@pytest.mark.slow
def test_alpacalora_trains_a_mixture_with_a_held_out_dataset(tmp_path, tiny_model):
    """alpacalora on converted LLaMA-Factory data: an alpaca dataset and a sharegpt one with tools (all rows become
    conversations through the chat template), mixed 1:2 in 60 rows, a third dataset held out as the eval set; the
    composition is in the manifest and the completion line, and the loss falls."""
    tiny_model("tiny_llama")
    proc, run = run_train(
        "data=llamafactory",
        "data.dataset=[identity,glaive_toolcall_en_demo,alpaca_en_demo]",
        "data.mix={identity: 1, glaive_toolcall_en_demo: 2}",
        "data.mix_rows=60",
        "data.eval_dataset=alpaca_en_demo",
        "max_samples=100",
        "cutoff_len=96",
        "batch_size=8",
        "micro_batch_size=4",
        "max_steps=8",
        "learning_rate=3e-3",
        "logging_steps=1",
        "merge=false",
        "report_to=none",
        outputs=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: identity 20 + glaive_toolcall_en_demo 40 rows" in proc.stdout
    m = read_json(run / "manifest.json")
    assert m["data"]["composition"] == {"identity": 20, "glaive_toolcall_en_demo": 40}
    assert m["data"]["eval_dataset"] == {"name": "alpaca_en_demo", "format": "alpaca", "rows": 100}
    assert m["data"]["format"] == "sharegpt"
    log = (run / "logs" / "train.log").read_text()
    assert "data: 60 examples -> 60 train" in log and "held out (the dataset alpaca_en_demo)" in log
    losses = [r["loss"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------ preference evaluation


def test_held_out_pairs_from_preference_and_kto_rows():
    """Preference rows are pairs as they are (alpaca-style or sharegpt-style); KTO rows pair up where a prompt has a
    desirable and an undesirable answer; the generation's references are the chosen / desirable answers."""
    from finetune.recipes.prompting import preference_pairs, reference_rows

    pairs = json.loads((REPO / "data" / "samples" / "pairs_heldout.json").read_text())
    kto = json.loads((REPO / "data" / "samples" / "pairs_kto_heldout.json").read_text())
    from_pairs = preference_pairs(pairs)
    assert len(from_pairs) == 64 and from_pairs == preference_pairs(kto)
    turns, chosen, rejected = from_pairs[0]
    assert turns[0]["content"] == f"{pairs[0]['instruction']}\n{pairs[0]['input']}" and chosen != rejected
    assert len(reference_rows(kto)) == 64 and all(r["kto_tag"] for r in reference_rows(kto))
    lf = json.loads((LF_DIR / "dpo_en_demo.json").read_text())[:3]
    t, c, r = preference_pairs(lf)[0]
    assert t[-1]["role"] == "user" and c == lf[0]["chosen"]["value"] and r == lf[0]["rejected"]["value"]
    alone = [row for row in kto if row["kto_tag"]]  # no undesirable answers: nothing pairs up
    assert preference_pairs(alone) == []


def test_shipped_pairs_are_right_and_wrong_answers():
    """Chosen is the task's right answer, rejected a plausible wrong one; no held-out prompt is trained on."""
    train = json.loads((REPO / "data" / "samples" / "pairs_train.json").read_text())
    held = json.loads((REPO / "data" / "samples" / "pairs_heldout.json").read_text())
    assert (len(train), len(held)) == (256, 64)
    assert not {(p["instruction"], p["input"]) for p in train} & {(p["instruction"], p["input"]) for p in held}
    for p in train + held:
        words = p["input"].split()
        if p["instruction"] == "Add the two numbers.":
            right = str(sum(int(w) for w in words))
        else:
            order = {"Copy the words.": words, "Reverse the words.": words[::-1], "Sort the words.": sorted(words)}
            right = " ".join(order[p["instruction"]])
        assert p["chosen"] == right and p["rejected"] != right, p
        if p["instruction"] == "Add the two numbers.":
            assert abs(int(p["rejected"]) - int(right)) == 1
        else:
            assert sorted(p["rejected"].split()) == sorted(words)  # the same words, in a wrong order


@pytest.mark.slow
def test_preference_chain_on_the_tiny_model(tmp_path, tiny_model):
    """The mechanics at tiny scale: an alpacalora SFT adapter, then DPO on top of it through LLaMA-Factory with the
    preference evaluation and the evaluation by generation; the export merges both adapters."""
    tiny_model("tiny_llama")
    proc, sft = run_train(
        "max_steps=4", "max_samples=64", "val_set_size=8", "merge=false", "report_to=none", outputs=tmp_path / "sft"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc, run = run_train(
        "backend=llamafactory",
        "data=pairs",
        "backend.stage=dpo",
        f"adapter={sft}",
        "preference_eval=true",
        "generate_eval=true",
        "generate_eval_rows=8",
        "max_new_tokens=8",
        "val_set_size=0",
        "max_steps=4",
        "batch_size=4",
        "micro_batch_size=4",
        "cutoff_len=64",
        "logging_steps=1",
        "learning_rate=5e-3",
        "metric=eval_preference_accuracy",
        "report_to=[tensorboard,mlflow]",
        f"tracking.mlflow.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        outputs=tmp_path / "dpo",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = read_json(run / "metrics.json")
    for k in (
        "base_eval_preference_accuracy",
        "eval_preference_accuracy",
        "eval_preference_margin",
        "base_eval_exact_match",
        "eval_exact_match",
    ):
        assert isinstance(m[k], float), k
    assert m["preference_eval_pairs"] == 64
    assert read_json(run / "result.json")["metric"] == m["eval_preference_accuracy"]
    assert "Merged 1 adapter(s)." in (run / "logs" / "train.log").read_text()
    export = (run / "llamafactory" / "export.yaml").read_text()
    assert f"adapter_name_or_path: {sft / 'lazyllm_lora'},{run / 'lazyllm_lora'}" in export
    assert read_json(run / "eval" / "preference_before.json")["adapter"] == str(sft / "lazyllm_lora")
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    pref = [r for r in hist if "eval_preference_accuracy" in r]
    assert [r["step"] for r in pref] == [0, 4]
    assert "eval_preference_accuracy=" in proc.stdout
    # MLflow: the two points of the series, and the final numbers
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = read_json(run / "tracking.json")["mlflow"]["run_id"]
    points = sorted((p.step, p.value) for p in mlflow.get_metric_history(run_id, "eval_preference_accuracy"))
    assert points == [(0, m["base_eval_preference_accuracy"]), (4, m["eval_preference_accuracy"])]
    final = mlflow.get_run(run_id).data.metrics
    assert final["final_eval_preference_accuracy"] == m["eval_preference_accuracy"]
    assert final["eval_preference_accuracy_gain"] == pytest.approx(m["eval_preference_accuracy_gain"])


@pytest.mark.slow
def test_llamafactory_trains_exactly_the_sampled_mixture(tmp_path, tiny_model):
    """A mixture on backend=llamafactory: the train step writes the drawn rows (a .txt dataset's lines as JSON lines
    under the entry's own columns) and LLaMA-Factory trains on exactly the composition of the manifest."""
    tiny_model("tiny_llama")
    proc, run = run_train(
        "backend=llamafactory",
        "backend.stage=pt",
        "data=llamafactory",
        "data.dataset=[wiki_demo,c4_demo]",
        "data.mix={wiki_demo: 1, c4_demo: 3}",
        "data.mix_rows=40",
        "val_set_size=0",
        "max_steps=2",
        "batch_size=2",
        "micro_batch_size=2",
        "cutoff_len=48",
        "merge=false",
        "logging_steps=1",
        "report_to=none",
        outputs=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: wiki_demo 10 + c4_demo 30 rows" in proc.stdout
    folder = run / "llamafactory" / "data"
    assert [len((folder / f"{n}.jsonl").read_text().splitlines()) for n in ("wiki_demo", "c4_demo")] == [10, 30]
    log = (run / "logs" / "train.log").read_text()  # the rows LLaMA-Factory read (pt then packs them in blocks)
    assert "Generating train split: 10 examples" in log and "Generating train split: 30 examples" in log
    assert "Running tokenizer on dataset: 100%|██████████| 40/40" in log
    info = read_json(run / "llamafactory" / "dataset_info.json")
    assert info["wiki_demo"] == {"columns": {"prompt": "text"}, "file_name": str(folder / "wiki_demo.jsonl")}


def test_preference_accuracy_drives_sweeps_and_optuna_maximised():
    """metric=eval_preference_accuracy (experiment=smollm2_dpo's; typed with an Optuna search, whose file sets its
    own): maximised by the sweep summary and by the search (its direction follows the metric); summary columns."""
    from hydra import compose, initialize_config_dir

    from finetune.cli import setup
    from finetune.config.resolvers import metric_direction
    from finetune.report.summary import METRIC_COLUMNS

    assert metric_direction("eval_preference_accuracy") == "maximize" == metric_direction("eval_preference_margin")
    assert {"base_eval_preference_accuracy", "eval_preference_accuracy", "eval_preference_margin"} <= set(
        METRIC_COLUMNS
    )
    setup()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=smollm2_dpo", "+hparams_search=lr_optuna", "metric=eval_preference_accuracy"],
            return_hydra_config=True,
        )
    assert cfg.metric == "eval_preference_accuracy" and cfg.hydra.sweeper.direction == "maximize"


def test_a_bad_row_is_refused_as_typed(tmp_path):
    """The contract as a user meets it: exit code 2, exactly one line naming the dataset, file, row and what is wrong,
    no traceback, nothing written."""
    from test_validation import _check_refusal

    rows = _alpaca(3) + [{"instruction": "x", "input": "", "output": 7}]
    d = _folder(tmp_path, {"mine": {"file_name": "mine.json"}}, {"mine.json": rows})
    _check_refusal(
        ["data=llamafactory", f"data.dataset_dir={d}", "data.dataset=mine", "val_set_size=0"],
        f"error: data.dataset='mine': row 4 of {d / 'mine.json'} column 'output' (columns.response) must be a "
        "string, not int",
        tmp_path / "outputs",
    )
