"""The llamafactory backend: real `llamafactory-cli` runs on the tiny Llama on CPU.

Tiers:
  - mapping (fast, in-process compose + plan): the LLaMA-Factory yaml and dataset_info.json for each method,
    stage and data layout;
  - refusals (fast, subprocess): bad input refused with exit 2 and one line, before any LF import;
  - slow: real training runs (each ~7 s of LLaMA-Factory import + a few seconds of training on an idle machine):
    sft LoRA + export merge (shared by several tests), every method, dpo, a failing run, and the cross-backend
    table (alpacalora vs llamafactory, same experiment).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import PY, REPO, read_json, run_train

from finetune.interfaces import PlanContext

# a tiny, fast recipe: 4 rows a step, no accumulation, short sequences, a log line every step
FAST = (
    "backend=llamafactory",
    "model=tiny_llama",
    "max_steps=8",
    "batch_size=4",
    "micro_batch_size=4",
    "cutoff_len=64",
    "logging_steps=1",
    "save_steps=0",
    "warmup_ratio=0",
    "val_set_size=0",
    "merge=false",
    "learning_rate=5e-3",
)


# ------------------------------------------------------------------------------------------------ helpers


def compose_plan(tmp_path: Path, *overrides: str, backend: str = "llamafactory"):
    """Compose + validate + plan in-process (what the dry run does). Returns (cfg, plan, train yaml dict)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from finetune.cli import setup
    from finetune.config.validate import world_size
    from finetune.run import prepare

    setup()
    GlobalHydra.instance().clear()
    overrides = ["backend=llamafactory", *overrides]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    facts, backend_, _ = prepare(cfg, overrides)
    run_dir = tmp_path / "run"
    ctx = PlanContext(data=facts["data"], world_size=world_size(cfg), run_dir=str(run_dir))
    plan = backend_.plan(cfg, run_dir, ctx)
    if backend != "llamafactory":
        return cfg, plan, None
    train = OmegaConf.to_container(OmegaConf.create(plan.files["llamafactory/train.yaml"]))
    return cfg, plan, train


def losses(run: Path):
    rows = (json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


def assert_falls(run: Path, what: str):
    ls = losses(run)
    assert len(ls) >= 4, f"{what}: only {len(ls)} losses logged"
    first, last = sum(ls[:2]) / 2, sum(ls[-2:]) / 2
    assert last < first, f"{what}: loss did not fall: {ls}"
    return ls


def train_ok(proc, run, what):
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert run is not None and (run / "metrics.json").exists(), what
    return read_json(run / "metrics.json")


def train_log(run: Path) -> str:
    return (run / "logs" / "train.log").read_text(errors="replace")


# ------------------------------------------------------------------------------------------------ mapping


def test_lora_yaml_and_cpu_traps(tmp_path):
    cfg, plan, t = compose_plan(
        tmp_path,
        "lora_r=4",
        "lora_alpha=8",
        "lora_target_modules=[q_proj,k_proj]",
        "modules_to_save=[embed_tokens,lm_head]",
        "max_steps=3",
        "learning_rate=1e-3",
        "lr_scheduler_type=linear",
        "warmup_ratio=0.05",
        "+backend.extra.neftune_noise_alpha=5",
    )
    assert t["stage"] == "sft" and t["do_train"] is True and t["finetuning_type"] == "lora"
    assert (t["lora_rank"], t["lora_alpha"], t["lora_target"]) == (4, 8, "q_proj,k_proj")
    assert t["additional_target"] == "embed_tokens,lm_head"
    assert (t["max_steps"], t["learning_rate"], t["lr_scheduler_type"], t["warmup_ratio"]) == (3, 1e-3, "linear", 0.05)
    assert t["neftune_noise_alpha"] == 5  # backend.extra passes through
    # the traps, each handled on purpose
    assert t["use_cpu"] is True and t["template"] == "default" and t["optim"] == "adamw_torch"
    assert t["overwrite_output_dir"] is True and t["report_to"] == "none"
    assert plan.steps[0].env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.steps[0].argv[-2:] == ["train", str(tmp_path / "run" / "llamafactory" / "train.yaml")]
    assert plan.steps[0].argv[-4:-2] == ["-m", "finetune.recipes.llamafactory_cli"]  # run_exp + our callbacks
    # batch arithmetic: global 8 = micro 1 x accumulation 8 (backend defaults)
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (1, 8)
    assert t["val_size"] == 0.1 and t["eval_strategy"] == "steps"
    assert t["dataset_dir"] == str(tmp_path / "run" / "llamafactory") and t["dataset"] == "train"
    assert t["output_dir"] == str(tmp_path / "run" / "checkpoints")  # the result moves to lazyllm_lora
    # every key we write is one llamafactory-cli accepts
    from finetune.backends.llamafactory_keys import KEYS

    assert set(t) <= set(KEYS), set(t) - set(KEYS)
    from omegaconf import OmegaConf

    e = OmegaConf.to_container(OmegaConf.create(plan.files["llamafactory/export.yaml"]))
    assert e["adapter_name_or_path"] == str(tmp_path / "run" / "lazyllm_lora") and e["export_dir"] == str(
        tmp_path / "run" / "lazyllm_merge"
    )
    assert [s.name for s in plan.steps] == ["train", "merge"]


@pytest.mark.parametrize(
    "method,expect",
    [
        ("full", {"finetuning_type": "full"}),
        (
            "freeze",
            {
                "finetuning_type": "freeze",
                "freeze_trainable_layers": 1,
                "freeze_trainable_modules": "mlp",
                "freeze_extra_modules": "embed_tokens",
            },
        ),
        ("loraplus", {"finetuning_type": "lora", "loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-6}),
        ("rslora", {"use_rslora": True}),
        ("dora", {"use_dora": True}),
        ("pissa", {"pissa_init": True, "pissa_iter": 16, "pissa_convert": True}),
        (
            "galore",
            {
                "finetuning_type": "full",
                "use_galore": True,
                "galore_target": "all",
                "galore_rank": 16,
                "galore_update_interval": 200,
                "galore_scale": 0.25,
                "galore_proj_type": "std",
                "galore_layerwise": False,
                "optim": "adamw_torch",
            },
        ),
        (
            "badam",
            {
                "finetuning_type": "full",
                "use_badam": True,
                "badam_mode": "layer",
                "badam_switch_mode": "ascending",
                "badam_switch_interval": 50,
                "badam_update_ratio": 0.05,
                "badam_mask_mode": "adjacent",
                "optim": "adamw_torch",
            },
        ),
    ],
)
def test_method_keys(tmp_path, method, expect):
    extra = (
        [
            "method.freeze_trainable_layers=1",
            "method.freeze_trainable_modules=mlp",
            "method.freeze_extra_modules=embed_tokens",
        ]
        if method == "freeze"
        else []
    )
    _, plan, t = compose_plan(tmp_path, f"method={method}", *extra)
    for k, v in expect.items():
        assert t.get(k) == v, (method, k, t.get(k))
    if method not in ("loraplus", "rslora", "dora", "pissa"):
        assert "lora_rank" not in t
    if method == "pissa":
        assert "pissa_converted" in plan.files["llamafactory/export.yaml"]


@pytest.mark.parametrize(
    "data,stage,entry",
    [
        (
            "tiny_sharegpt",
            "sft",
            {
                "formatting": "sharegpt",
                "columns": {"messages": "conversations"},
                "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
            },
        ),
        (
            "tiny_messages",
            "sft",
            {
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            },
        ),
        (
            "tiny_preference",
            "dpo",
            {
                "ranking": True,
                "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
            },
        ),
        ("tiny_preference", "rm", {"ranking": True}),
        (
            "tiny_kto",
            "kto",
            {"columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}},
        ),
        ("tiny_text", "pt", {"columns": {"prompt": "text"}}),
        ("tiny_alpaca", "sft", {"columns": {"prompt": "instruction", "query": "input", "response": "output"}}),
    ],
)
def test_dataset_info_from_the_file(tmp_path, data, stage, entry):
    _, plan, t = compose_plan(tmp_path, f"data={data}", f"backend.stage={stage}")
    info = json.loads(plan.files["llamafactory/dataset_info.json"])["train"]
    assert Path(info["file_name"]).is_file()
    for k, v in entry.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                assert info[k][kk] == vv, (data, k, kk, info[k])
        else:
            assert info[k] == v, (data, k, info)
    assert t["stage"] == stage
    if stage == "dpo":
        assert t["pref_beta"] == 0.1 and t["pref_loss"] == "sigmoid"


def test_eval_file_replaces_val_size(tmp_path):
    alpaca = str(REPO / "data" / "samples" / "tiny_alpaca.json")
    _, plan, t = compose_plan(tmp_path, f"data.eval_path={alpaca}", "eval_steps=5")
    assert t["eval_dataset"] == "eval" and "val_size" not in t
    assert (t["eval_strategy"], t["eval_steps"]) == ("steps", 5)
    assert "eval" in json.loads(plan.files["llamafactory/dataset_info.json"])


def test_resume_bf16_and_deepspeed(tmp_path):
    _, plan, t = compose_plan(tmp_path, "hardware.precision=bf16", "resume=true", f"output_dir={tmp_path / 'old'}")
    assert t["bf16"] is True and t["use_cpu"] is True and t["overwrite_output_dir"] is False
    _, plan, t = compose_plan(tmp_path, "hardware.deepspeed_stage=2")
    ds = json.loads(plan.files["llamafactory/ds_config.json"])
    assert t["deepspeed"].endswith("ds_config.json") and ds["zero_optimization"]["stage"] == 2
    assert "use_cpu" not in t and plan.steps[0].env["FORCE_TORCHRUN"] == "1"


def test_dry_run_shows_yaml_and_writes_nothing(tmp_path):
    proc, run = run_train("backend=llamafactory", "dry_run=true", outputs=tmp_path / "out", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in (
        "--- llamafactory/train.yaml",
        "--- llamafactory/dataset_info.json",
        "--- llamafactory/export.yaml",
        "-m finetune.recipes.llamafactory_cli train",
        "-m llamafactory.cli export",
        "use_cpu: true",
    ):
        assert text in proc.stdout, text
    assert run is None and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ refusals


def _bad_sharegpt(tmp: Path) -> str:
    rows = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "gpt", "value": "b"}, {"from": "human", "value": "a"}]},
    ]
    p = tmp / "bad_order.json"
    p.write_text(json.dumps(rows))
    return str(p)


REFUSALS = [
    (
        ["+backend.extra.lora_rnk=4"],
        "backend.extra.lora_rnk=4: LLaMA-Factory 0.9.5 does not accept this key "
        "(llamafactory-cli would refuse it) (did you mean 'lora_rank'?)",
    ),
    (["+backend.extra.output_dir=/tmp/x"], "backend.extra.output_dir='/tmp/x': is written from target_path"),
    (["+backend.extra.infer_dtype=float64"], "backend.extra.infer_dtype='float64': one of auto, bfloat16"),
    (["+backend.extra.use_unsloth=yes"], "backend.extra.use_unsloth='yes': must be true or false"),
    (["+backend.extra.pure_bf16=true"], "backend.extra.pure_bf16=True: needs a bf16 GPU"),
    (["backend.template=defualt"], "(did you mean 'default'?)"),
    (["backend.template=null"], "use backend.template=default"),
    (["backend.stage=ppo"], "backend.stage='ppo': one of dpo, kto, pt, rm, sft"),
    (
        ["backend.stage=dpo"],
        "data.format='alpaca': stage dpo trains on preference data (alpaca data trains with backend.stage=pt "
        "or backend.stage=sft)",
    ),
    (["method=galore", "optim=sgd"], "optim='sgd': LLaMA-Factory's GaLore takes adamw_torch"),
    (["method=badam", "method.badam_mode=ratio", "optim=adamw_torch_fused"], "use optim=adamw_torch"),
    (["method=pissa", "method.pissa_convert=false"], "merging a PiSSA adapter needs pissa_convert=true"),
    (["method=pissa", "backend.stage=kto", "data=tiny_kto"], "cannot use PiSSA for stage kto"),
    (["val_set_size=1"], "val_set_size=1.0: LLaMA-Factory reads 1 as the whole set"),
    (["backend.pref_loss=dpo"], "backend.pref_loss='dpo': one of hinge, ipo"),
    (["BAD_SHAREGPT", "data.format=sharegpt"], "row 2 turn 0 has role 'gpt' where user"),
]


@pytest.mark.parametrize("overrides,expected", REFUSALS, ids=[" ".join(c[0]) for c in REFUSALS])
def test_refused(tmp_path, overrides, expected):
    overrides = [f"data.path={_bad_sharegpt(tmp_path)}" if o == "BAD_SHAREGPT" else o for o in overrides]
    out = tmp_path / "outputs"
    proc, _ = run_train("backend=llamafactory", *overrides, outputs=out, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{overrides}: exit {proc.returncode}\n{err}\n{proc.stdout[-800:]}"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, f"{expected!r} not in {err!r}"
    assert not out.exists() or not any(out.rglob("*"))


def test_target_path_in_use_is_refused(tmp_path):
    used = tmp_path / "adapter"
    used.mkdir()
    (used / "trainer_state.json").write_text("{}")
    proc, _ = run_train("backend=llamafactory", f"target_path={used}", outputs=tmp_path / "o", timeout=120)
    assert proc.returncode == 2 and "exists and is not empty; a run never deletes or writes" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_key_list_matches_installed_llamafactory():
    """llamafactory_keys.py is generated from the installed LLaMA-Factory; regenerate it after an upgrade."""
    code = (
        "from finetune.backends import llamafactory_keys as k; i = k._introspect(); "
        "import json; print(json.dumps([i['version'], sorted(i['keys']), sorted(i['templates']), "
        "{n: list(v[1]) if v[1] else None for n, v in i['keys'].items()}]))"
    )
    out = subprocess.run([PY, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, keys, templates, choices = json.loads(out.stdout.strip().splitlines()[-1])
    from finetune.backends import llamafactory_keys as k

    assert version == k.VERSION
    assert keys == sorted(k.KEYS), "run: python -m finetune.backends.llamafactory_keys --write"
    assert templates == sorted(k.TEMPLATES)
    assert choices == {n: list(v[1]) if v[1] else None for n, v in k.KEYS.items()}


# ------------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    """sft + LoRA + held-out eval + export merge: one run shared by the tests below."""
    tiny_model("tiny_llama")
    out = tmp_path_factory.mktemp("lf_lora")
    proc, run = run_train(*FAST, "merge=true", "val_set_size=8", "eval_steps=4", "max_steps=10", outputs=out)
    return proc, run


@pytest.mark.slow
def test_lora_sft_trains_and_reports(lora_run):
    proc, run = lora_run
    m = train_ok(proc, run, "lora sft")
    ls = assert_falls(run, "lora sft")
    for k in (
        "train_loss",
        "first_train_loss",
        "eval_loss",
        "total_params",
        "trainable_params",
        "tokens_per_s",
        "peak_rss_mb",
        "train_runtime_s",
    ):
        assert isinstance(m.get(k), (int, float)), (k, m.get(k))
    assert m["train_loss"] == ls[-1] and m["first_train_loss"] == ls[0]
    # LoRA r=8 on q_proj (64x64) and v_proj (64->32) in 2 layers: 2 * (8*64 + 64*8 + 8*64 + 32*8)
    assert m["trainable_params"] == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    assert m["trainable_params"] < m["total_params"]
    # read back: history from trainer_state (grad_norm, lr, eval), our PNG and TensorBoard events
    hist = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines()]
    assert any("grad_norm" in r and "learning_rate" in r for r in hist)
    assert [r["step"] for r in hist if "eval_loss" in r][:2] == [4, 8]
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    lf = run / "lazyllm_lora"
    assert (lf / "adapter_config.json").exists() and (lf / "trainer_log.jsonl").exists()
    assert (run / "llamafactory" / "train.yaml").exists() and (run / "llamafactory" / "dataset_info.json").exists()
    man = read_json(run / "manifest.json")
    assert man["status"] == "completed" and [s["name"] for s in man["steps"]][-2:] == ["train", "merge"]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_lora_export_merge_matches_adapter(lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, run = lora_run
    train_ok(proc, run, "lora sft")
    merged_dir = run / "lazyllm_merge"
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    cfg = read_json(run / "resolved_config.json")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok("Human: Copy the words.\niron salt\nAssistant:", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["path"], dtype=torch.float32)
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, run / "lazyllm_lora").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    a, b = _logits(adapted, ids), _logits(merged, ids)
    assert (a - base_logits).abs().max() > 1e-3, "the adapter changed nothing"
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


METHOD_RUNS = {
    "freeze": (["method=freeze", "method.freeze_trainable_layers=1"], "Set trainable layers: .1."),
    "full": (["method=full", "learning_rate=1e-3"], "Fine-tuning method: Full"),
    "loraplus": (["method=loraplus"], "Using LoRA+ optimizer with loraplus lr ratio 16.00"),
    "rslora": (["method=rslora"], "Fine-tuning method: LoRA"),
    "dora": (["method=dora"], "Fine-tuning method: DoRA"),
    "pissa": (["method=pissa", "method.pissa_iter=-1", "merge=true"], "Fine-tuning method: LoRA"),
    "galore": (["method=galore", "learning_rate=1e-2", "method.galore_update_interval=4"], "Using GaLore optimizer"),
    "badam_layer": (
        ["method=badam", "learning_rate=1e-2", "method.badam_switch_interval=2"],
        "Using BAdam optimizer with layer-wise update",
    ),
    "badam_ratio": (
        ["method=badam", "learning_rate=1e-2", "method.badam_mode=ratio", "method.badam_update_ratio=0.5"],
        "Using BAdam optimizer with ratio-based update",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_method_trains(tmp_path, tiny_model, name):
    tiny_model("tiny_llama")
    overrides, log_line = METHOD_RUNS[name]
    proc, run = run_train(*FAST, *overrides, outputs=tmp_path / "out")
    m = train_ok(proc, run, name)
    assert_falls(run, name)
    assert log_line in train_log(run), f"{name}: {log_line!r} not in the LLaMA-Factory log"
    lf = run / "lazyllm_lora"
    if name in ("rslora", "dora", "pissa", "loraplus"):
        ac = read_json(lf / "adapter_config.json")
        assert ac["use_rslora"] is (name == "rslora") and ac["use_dora"] is (name == "dora")
        lora_params = 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
        assert m["trainable_params"] == lora_params + (2 * (64 + 32) if name == "dora" else 0)
    else:
        assert (lf / "model.safetensors").exists() and not (lf / "adapter_config.json").exists()
    if name == "freeze":  # the last of 2 decoder layers: 4*64*64 attn-ish + mlp + norms
        assert 0 < m["trainable_params"] < m["total_params"] / 2
    if name in ("full", "galore", "badam_layer", "badam_ratio"):
        assert m["trainable_params"] == m["total_params"]
    if name == "pissa":  # the merge used pissa_converted: a plain LoRA of rank 2r on the original model
        conv = read_json(lf / "pissa_converted" / "adapter_config.json")
        assert conv["r"] == 16 and conv["init_lora_weights"] is True
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
        base = AutoModelForCausalLM.from_pretrained(read_json(run / "resolved_config.json")["model"]["path"])
        a = _logits(PeftModel.from_pretrained(base, lf / "pissa_converted").eval(), ids)
        b = _logits(AutoModelForCausalLM.from_pretrained(run / "lazyllm_merge").eval(), ids)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.slow
def test_dpo_trains(tmp_path, tiny_model):
    tiny_model("tiny_llama")
    # 8 pairs seen 5 times: per-batch DPO losses on fresh pairs are too noisy on a random tiny model to show a trend
    proc, run = run_train(
        *FAST,
        "data=tiny_preference",
        "backend.stage=dpo",
        "max_steps=10",
        "max_samples=8",
        "learning_rate=1e-2",
        outputs=tmp_path / "o",
    )
    m = train_ok(proc, run, "dpo")
    ls = assert_falls(run, "dpo")
    assert abs(ls[0] - 0.6931) < 0.05, ls[0]  # sigmoid DPO starts at ln 2 (policy == reference)
    assert "rewards_accuracies" in m
    assert "stage: dpo" in (run / "llamafactory" / "train.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stage,data", [("pt", "tiny_text"), ("rm", "tiny_preference"), ("kto", "tiny_kto")])
def test_other_stages_train(tmp_path, tiny_model, stage, data):
    tiny_model("tiny_llama")
    proc, run = run_train(*FAST, f"data={data}", f"backend.stage={stage}", "max_steps=6", outputs=tmp_path / "o")
    train_ok(proc, run, stage)
    assert_falls(run, stage)
    assert f"stage: {stage}" in (run / "llamafactory" / "train.yaml").read_text()


@pytest.mark.slow
def test_failing_step_fails_the_run_with_the_log_tail(tmp_path, tiny_model):
    tiny_model("tiny_llama")
    proc, run = run_train(*FAST, "method=freeze", "method.freeze_trainable_modules=nope", outputs=tmp_path / "o")
    assert proc.returncode == 1, proc.returncode
    assert "step 'train' exited with code" in proc.stderr and "Module nope is not found" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert read_json(run / "result.json")["status"] == "failed"
    assert read_json(run / "manifest.json")["status"] == "failed"


@pytest.mark.slow
def test_two_processes_on_gloo(tmp_path, tiny_model):
    """launcher.nproc_per_node=2: LLaMA-Factory relaunches itself under torchrun (FORCE_TORCHRUN, the torchrun
    of this environment even when it is not activated) and trains data-parallel on gloo; one output folder."""
    tiny_model("tiny_llama")
    proc, run = run_train(*FAST, "launcher.nproc_per_node=2", "batch_size=8", outputs=tmp_path / "o")
    train_ok(proc, run, "2 processes")
    assert_falls(run, "2 processes")
    log = train_log(run)
    assert "Initializing 2 distributed tasks" in log
    assert "Process rank: 0, world size: 2" in log and "Process rank: 1, world size: 2" in log
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in log


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu(tmp_path, tiny_model):
    """hardware.deepspeed_stage=2: LLaMA-Factory runs HF Trainer under DeepSpeed's CPU accelerator (use_cpu is
    left false, as DeepSpeed needs); the Trainer's saved arguments carry our ZeRO-2 config; the loss falls."""
    import torch

    tiny_model("tiny_llama")
    proc, run = run_train(*FAST, "hardware.deepspeed_stage=2", outputs=tmp_path / "o")
    train_ok(proc, run, "deepspeed zero-2")
    assert_falls(run, "deepspeed zero-2")
    args = torch.load(run / "lazyllm_lora" / "training_args.bin", weights_only=False)
    assert args.deepspeed == str(run / "llamafactory" / "ds_config.json") and not args.use_cpu
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_a_short_run_that_logged_no_step_loss_still_completes(tmp_path):
    """max_steps below logging_steps (as typed: backend=llamafactory max_steps=4, logging every 10 steps): the run
    trained, so it completes with what LLaMA-Factory did log (its mean train loss, the eval loss) and says what is
    absent, instead of failing for a missing optional metric."""
    proc, run = run_train(
        "backend=llamafactory", "max_steps=4", "max_samples=64", "cutoff_len=128", "merge=false", outputs=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[finetune] note: no per-step training loss was logged (logging_steps=10, 4 steps run)" in proc.stdout
    m = read_json(run / "metrics.json")
    assert isinstance(m["train_loss"], float) and isinstance(m["eval_loss"], float)
    assert "first_train_loss" not in m and m["absent"]
    assert read_json(run / "manifest.json")["status"] == "completed"


@pytest.mark.slow
def test_qlora_through_llamafactory_on_cpu(tmp_path):
    """LLaMA-Factory's QLoRA (quantization_bit 4, bitsandbytes) trains on this CPU; its export merges the adapter into
    the full-precision base (export.yaml carries no quantisation: LF refuses to merge into a quantised model)."""
    proc, run = run_train(*FAST, "method=qlora", "merge=true", outputs=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = (run / "llamafactory" / "train.yaml").read_text()
    assert "quantization_bit: 4" in train and "quantization_method: bnb" in train
    assert "quantization" not in (run / "llamafactory" / "export.yaml").read_text()
    assert "Quantizing model to 4 bit with bitsandbytes" in (run / "logs" / "train.log").read_text()
    m = read_json(run / "metrics.json")
    assert m["train_loss"] < m["first_train_loss"] and (run / "lazyllm_merge" / "config.json").exists()
