"""The alpacalora backend: plan, refusals, label masking, and tiny real runs of every method on CPU.

One LoRA run (module fixture) serves the merge, determinism, resume and DDP comparisons. Real runs are
`slow`; each trains the tiny Llama for a dozen optimizer steps.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, REPO, TINY_JOB, read_json, run_train, signal_workers, start_train, user_env

SMALL = TINY_JOB


def _train(out: Path, *overrides, expect_ok=True, env=None):
    proc, _ = run_train(*SMALL, f"output_dir={out}", *overrides, outputs=out.parent / "outputs", env=env)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run: Path):
    rows = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _llama_counts(model_dir: Path) -> dict:
    c = read_json(model_dir / "config.json")
    h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two norms
    emb = v * h
    return {"h": h, "kv": kv, "L": L, "layer": layer, "emb": emb, "total": L * layer + 2 * emb + h}


# ------------------------------------------------------------------------------------------------ fast


def test_dry_run_plan_has_train_and_merge_steps(tmp_path):
    proc, _ = run_train("dry_run=true", f"output_dir={tmp_path / 'r'}", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"-m", "finetune.recipes.alpacalora"' in proc.stdout
    assert '"-m", "finetune.recipes.merge"' in proc.stdout
    assert "accumulation 16 x 1 process" in proc.stdout  # 64 / 4 / 1
    assert not (tmp_path / "r").exists()


def test_dry_run_deepspeed_config_and_full_method_has_no_merge(tmp_path):
    proc, _ = run_train(
        "dry_run=true", "method=full", "hardware.deepspeed_stage=3", f"output_dir={tmp_path / 'r'}", outputs=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.split("--- deepspeed.json", 1)[1]
    ds = json.loads(text[: text.index("\n}") + 2])
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert "finetune.recipes.merge" not in proc.stdout


@pytest.mark.parametrize(
    "override,key",
    [
        ("prompt_template_name=nope", "prompt_template_name"),
        ("method=galore method.galore_layerwise=true", "method.galore_layerwise"),  # accumulation 16, needs 1
        ("backend.attn_implementation=flash_attention_2", "backend.attn_implementation"),
        ("backend.attn_implementation=fast", "backend.attn_implementation"),
    ],
)
def test_bad_input_refused_with_one_line(tmp_path, override, key):
    proc, _ = run_train(*override.split(), outputs=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_train_on_inputs_masks_prompt_tokens(tiny_model):
    from transformers import AutoTokenizer

    from finetune.recipes.common import IGNORE_INDEX
    from finetune.recipes.data import encode_alpaca
    from finetune.recipes.templates import alpaca_prompt, load_template

    tok = AutoTokenizer.from_pretrained(tiny_model("tiny_llama"))
    tpl = load_template("alpaca")
    row = {"instruction": "Reverse the words.", "input": "red rice", "output": "rice red"}
    n_prompt = len(tok(alpaca_prompt(tpl, row["instruction"], row["input"]))["input_ids"])
    masked = encode_alpaca(row, tok, tpl, 1030, train_on_inputs=False)
    full = encode_alpaca(row, tok, tpl, 1030, train_on_inputs=True)
    assert masked["input_ids"] == full["input_ids"] and full["input_ids"][-1] == tok.eos_token_id
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert masked["labels"][n_prompt:] == masked["input_ids"][n_prompt:] and len(masked["labels"]) > n_prompt
    assert full["labels"] == full["input_ids"]
    cut = encode_alpaca(row, tok, tpl, 8, train_on_inputs=True)  # cutoff_len truncates (no room for EOS)
    assert len(cut["input_ids"]) == 8


def test_a_chat_longer_than_cutoff_len_keeps_the_newest_question(tiny_model):
    """Generation prompts over cutoff_len: a chat drops its oldest exchanges (never the newest question or the
    answer cue); one over-long prompt loses its start, not its end, and keeps its BOS; a prompt that fits is the
    training prompt unchanged."""
    from transformers import AutoTokenizer

    from finetune.recipes.prompting import PromptFormat
    from finetune.recipes.templates import alpaca_prompt, load_template

    tok = AutoTokenizer.from_pretrained(tiny_model("tiny_llama"))
    tpl = load_template("alpaca_short")
    question = {"role": "user", "content": "Sort the words.\nrock moon bean"}
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": f"Copy the words.\nred rice green {i} " + "blue " * 10},
            {"role": "assistant", "content": f"red rice green {i} " + "blue " * 10},
        ]
    last = tok(alpaca_prompt(tpl, "Sort the words.", "rock moon bean"))["input_ids"]
    wide = PromptFormat("alpaca", "alpaca_short", tpl, cutoff_len=4096)
    full = wide.encode(tok, history + [question])
    assert full[-len(last) + 1 :] == last[1:] and wide.encode(tok, [question]) == last
    fmt = PromptFormat("alpaca", "alpaca_short", tpl, cutoff_len=len(full) // 2)
    ids = fmt.encode(tok, history + [question])
    assert len(ids) <= len(full) // 2 and ids[-len(last) + 1 :] == last[1:] and ids[0] == tok.bos_token_id
    fits = [wide.encode(tok, history[2 * k :] + [question]) for k in range(len(history) // 2 + 1)]
    assert ids == next(f for f in fits if len(f) <= len(full) // 2)  # the newest whole exchanges that fit
    tight = PromptFormat("alpaca", "alpaca_short", tpl, cutoff_len=len(last) - 4)  # one prompt, too long
    cut = tight.encode(tok, [question])
    assert len(cut) == len(last) - 4 and cut[0] == tok.bos_token_id and cut[-5:] == last[-5:]


def test_sharegpt_rows_use_chat_template_and_mask_user_turns(tiny_model):
    from transformers import AutoTokenizer

    from finetune.recipes.common import IGNORE_INDEX
    from finetune.recipes.data import encode_messages, to_messages

    tok = AutoTokenizer.from_pretrained(tiny_model("tiny_llama"))
    row = {
        "conversations": [
            {"from": "human", "value": "Copy the words.\niron salt"},
            {"from": "gpt", "value": "iron salt"},
        ]
    }
    ex = encode_messages(to_messages(row), tok, 1030, train_on_inputs=False)
    trained = [i for i, ln in zip(ex["input_ids"], ex["labels"]) if ln != IGNORE_INDEX]
    assert tok.decode(trained).strip().startswith("iron salt") and trained[-1] == tok.eos_token_id
    assert "### Instruction:" in tok.decode(ex["input_ids"])


# ------------------------------------------------------------------------------------------------ one LoRA run


def test_packing_has_no_cross_contamination(tiny_model):
    """Packed rows: position ids restart per example, the first label of each example is masked, and each
    example's logits in the packed row equal its logits run alone (the block-diagonal mask transformers builds
    from position_ids), for eager and SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.recipes.common import IGNORE_INDEX
    from finetune.recipes.data import Collator, pack_examples

    exs = [
        {"input_ids": list(range(5 + i, 5 + i + n)), "labels": list(range(5 + i, 5 + i + n))}
        for i, n in enumerate((7, 5, 9, 4, 12))
    ]
    rows = pack_examples(exs, max_len=20, seed=0)
    assert sum(r["n_examples"] for r in rows) == 5 and all(len(r["input_ids"]) <= 20 for r in rows)
    assert sorted(sum(1 for p in r["position_ids"] if p == 0) for r in rows) == sorted(r["n_examples"] for r in rows)
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][i] == IGNORE_INDEX for i in starts)
    batch = Collator(pad_id=0)(rows)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model("tiny_llama"), attn_implementation=impl).eval()
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            for i, r in enumerate(rows):
                starts = [j for j, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
                for a, b in zip(starts, starts[1:]):
                    alone = model(input_ids=torch.tensor([r["input_ids"][a:b]])).logits[0]
                    assert (packed[i, a:b] - alone).abs().max().item() < 1e-5, impl


def test_cpu_precision_auto(tmp_path, monkeypatch):
    """hardware=cpu, precision auto: bf16 mixed precision only where the CPU has bf16 instructions and the model's
    hidden size is >= 256 (where it was measured to pay), fp32 otherwise."""
    from finetune.auto import hardware

    for hidden in (64, 512):
        (tmp_path / str(hidden)).mkdir()
        (tmp_path / str(hidden) / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    from omegaconf import OmegaConf

    def model(path, builder=None):
        return OmegaConf.create({"path": str(path), "builder": builder})

    monkeypatch.setattr(hardware, "cpu_bf16", lambda: True)
    assert [hardware.cpu_precision(model(tmp_path / h)) for h in ("64", "512", "missing")] == ["fp32", "bf16", "fp32"]
    # a model built on first use: its builder's plan says what its config.json will (the first run = later runs)
    assert hardware.cpu_precision(model(tmp_path / "missing", "smollm2_135m")) == "bf16"
    assert hardware.cpu_precision(model(tmp_path / "missing", "tiny_llama")) == "fp32"
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: False)
    assert hardware.cpu_precision(model(tmp_path / "512")) == "fp32"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alpacalora") / "lora"
    _train(out, "save_steps=4")
    return out


@pytest.mark.slow
def test_lora_run_outputs_and_counts(lora_run, tiny_model):
    c = _llama_counts(tiny_model("tiny_llama"))
    s = read_json(lora_run / "train_summary.json")
    r = 8
    lora = c["L"] * (r * (c["h"] + c["h"]) + r * (c["h"] + c["kv"]))  # q_proj and v_proj: r*(d_in + d_out)
    assert s["trainable_params"] == lora + 2 * c["emb"]  # + modules_to_save embed_tokens, lm_head
    losses = [ln for _, ln in _losses(lora_run)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    m = read_json(lora_run / "metrics.json")
    reported = "train_loss eval_loss first_train_loss total_params trainable_params tokens_per_s peak_rss_mb"
    for k in [*reported.split(), "train_runtime_s"]:
        assert m.get(k) is not None, k
    assert m["tokens_per_s"] > 0 and m["peak_rss_mb"] > 100
    # the tiny Llama is untied: PEFT's "Model has `tie_word_embeddings=True` ..." (it checks the class, not the
    # config) would be a false line in the user's log
    for step in ("train", "merge"):
        assert "tie_word_embeddings=True" not in (lora_run / "logs" / f"{step}.log").read_text(), step
    # tokens/s counts every input token processed (what other tools mean); the supervised targets are fewer
    assert s["train_tokens"] > s["train_target_tokens"] > 0 and m["tokens_per_s"] > m["target_tokens_per_s"] > 0
    rows = [json.loads(line) for line in (lora_run / "history.jsonl").read_text().splitlines()]
    assert all(r["total_steps"] == 12 for r in rows if "loss" in r)  # what the progress line reads
    assert (lora_run / "lazyllm_lora" / "adapter_config.json").exists()
    assert (lora_run / "lazyllm_merge" / "tokenizer.json").exists()
    assert (lora_run / "loss.png").exists() and any((lora_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (lora_run / "checkpoints" / "checkpoint-12" / "FINETUNE_COMPLETE").exists()


@pytest.mark.slow
def test_merged_logits_equal_base_plus_adapter(lora_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model("tiny_llama"))
    adapted = PeftModel.from_pretrained(base, lora_run / "lazyllm_lora").eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "lazyllm_merge").eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model("tiny_llama"))(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - plain).abs().max().item() > 1e-3  # the adapter did change the model


@pytest.mark.slow
def test_same_seed_twice_identical(lora_run, tmp_path):
    out = tmp_path / "again"
    _train(out, "save_steps=4", "merge=false")
    assert _losses(out) == _losses(lora_run)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(lora_run, tmp_path):
    out = tmp_path / "killed"
    argv = [PY, str(REPO / "train.py"), *SMALL, f"output_dir={out}", "save_steps=4", "merge=false"]
    env = user_env()
    proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "checkpoint-4" / "FINETUNE_COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint-4 before the run ended"
    # SIGKILL the worker (it runs in its own session under the launcher) and the driver: no clean-up at all
    assert signal_workers("alpacalora", out)
    proc.kill()
    proc.wait()
    assert not (out / "train_summary.json").exists()  # it really died mid-training
    # what a user types to continue: the folder and resume=true; the run's own overrides are replayed
    proc, _ = run_train(f"output_dir={out}", "resume=true", outputs=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = read_json(out / "train_summary.json")
    assert s["resumed_from"] and s["resumed_from"].endswith(tuple(f"checkpoint-{k}" for k in (4, 8)))
    resumed, ref = dict(_losses(out)), dict(_losses(lora_run))
    assert sorted(resumed) == list(range(1, 13))
    assert resumed[12] == pytest.approx(ref[12], abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_pauses_and_resume_continues_the_same_curve(lora_run, tmp_path):
    """The first Ctrl-C: a complete checkpoint at the end of the current step, one line saying what was saved and
    the command that continues; that command gives the loss curve of an uninterrupted run. A second resume while
    the first runs is refused (the run's lock), and resume=true of a run that saved nothing is refused."""
    job = [*SMALL, "merge=false"]
    out = tmp_path / "paused"
    p = start_train(*job, f"output_dir={out}", env=user_env(OMP_NUM_THREADS="1"))
    for line in p.stdout:
        if line.startswith("step=3 "):
            p.send_signal(signal.SIGINT)
            break
    rest, err = p.communicate(timeout=600)
    assert p.returncode == 130, err
    ckpt = re.search(r"paused: (checkpoint-\d+) saved in (\S+); continue with: (.+)$", err, re.M)
    assert ckpt and err.strip().count("\n") == 0, err
    assert (out / "checkpoints" / ckpt.group(1) / "FINETUNE_COMPLETE").exists()
    assert "stopping: the step saves a checkpoint" in rest and "Traceback" not in rest + err
    assert read_json(out / "manifest.json")["status"] == "paused"
    # while another process holds the run (a run in it is running), resume=true is refused; its lock dies with it
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time; from finetune.run_dir import claim_run_dir as c; "
            f"c(__import__('pathlib').Path({str(out)!r}), resume=True, exact=True); print('held', flush=True); "
            "time.sleep(120)",
        ],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    refused = subprocess.run(
        [PY, str(REPO / "train.py"), f"output_dir={out}", "resume=true"],
        cwd=str(REPO),
        env=user_env(),
        capture_output=True,
        text=True,
    )
    holder.kill()
    holder.wait()
    assert refused.returncode == 2 and f"is running (pid {holder.pid} on " in refused.stderr, refused.stderr
    command = ckpt.group(3).split()
    assert command[:2] == ["python", "train.py"]
    resumed = subprocess.run(
        [PY, str(REPO / "train.py"), *command[2:]], cwd=str(REPO), env=user_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = [ln for _, ln in _losses(out)]
    assert len(losses) == 12 and losses == pytest.approx([ln for _, ln in _losses(lora_run)], abs=1e-5)
    # a run folder that holds no complete checkpoint (stopped before it saved one): nothing to continue
    empty = tmp_path / "nothing-saved"
    shutil.copytree(out, empty, ignore=shutil.ignore_patterns("checkpoints", ".finetune.lock"))
    (empty / "manifest.json").write_text(
        json.dumps({**read_json(empty / "manifest.json"), "status": "interrupted", "run_dir": str(empty)})
    )
    again = subprocess.run(
        [PY, str(REPO / "train.py"), f"output_dir={empty}", "resume=true"],
        cwd=str(REPO),
        env=user_env(),
        capture_output=True,
        text=True,
    )
    assert (
        again.returncode == 2
        and again.stderr.startswith("error: resume=True: ")
        and "holds no complete " in again.stderr
    )


@pytest.mark.slow
def test_ddp_two_processes_gloo_equals_single(lora_run, tmp_path):
    out = tmp_path / "ddp"
    _train(out, "launcher.nproc_per_node=2", "merge=false")
    s = read_json(out / "train_summary.json")
    assert s["world_size"] == 2 and s["gradient_accumulation_steps"] == 1
    log = (out / "logs" / "train.log").read_text()
    assert "world=2" in log
    ddp, ref = _losses(out), _losses(lora_run)
    assert [k for k, _ in ddp] == [k for k, _ in ref]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ddp, ref)) < 1e-3


# ------------------------------------------------------------------------------------------------ every method

METHODS = {
    # name: (overrides, expected trainable count from the model's shape)
    "full": (["method=full"], lambda c: c["total"]),
    "freeze": (
        ["method=freeze", "method.freeze_trainable_layers=1", "method.freeze_extra_modules=norm"],
        lambda c: c["layer"] + c["h"],
    ),  # last layer + final norm (segment match)
    "loraplus": (["method=loraplus", "modules_to_save=null"], lambda c: c["L"] * 8 * (3 * c["h"] + c["kv"])),
    "rslora": (
        ["method=rslora", "modules_to_save=null", "train_on_inputs=false"],
        lambda c: c["L"] * 8 * (3 * c["h"] + c["kv"]),
    ),
    "dora": (
        ["method=dora", "modules_to_save=null"],
        lambda c: c["L"] * (8 * (3 * c["h"] + c["kv"]) + c["h"] + c["kv"]),
    ),  # + magnitude vectors
    "pissa": (
        ["method=pissa", "modules_to_save=null", "method.pissa_iter=-1"],
        lambda c: c["L"] * 8 * (3 * c["h"] + c["kv"]),
    ),
    # as a user types it: the default modules_to_save (embed_tokens, lm_head) kept through the PiSSA conversion
    "pissa_default": (["method=pissa"], lambda c: c["L"] * 8 * (3 * c["h"] + c["kv"]) + 2 * c["emb"]),
    "galore": (["method=galore", "method.galore_rank=8", "method.galore_update_interval=4"], lambda c: c["total"]),
    "galore_layerwise": (
        [
            "method=galore",
            "method.galore_layerwise=true",
            "batch_size=4",
            "method.galore_rank=8",
            "method.galore_update_interval=4",
        ],
        lambda c: c["total"],
    ),
    "badam_layer": (["method=badam", "method.badam_switch_interval=4"], lambda c: c["layer"]),  # one block at a time
    "badam_ratio": (
        ["method=badam", "method.badam_mode=ratio", "method.badam_update_ratio=0.5"],
        lambda c: c["total"] - 2 * c["emb"],
    ),  # embeddings excluded
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_artefact_loads(name, tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    overrides, expected = METHODS[name]
    out = tmp_path / name
    _train(out, *overrides)
    model_dir = tiny_model("tiny_llama")
    s = read_json(out / "train_summary.json")
    assert s["trainable_params"] == expected(_llama_counts(model_dir)), s
    losses = [ln for _, ln in _losses(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    base_logits = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    if name in ("loraplus", "rslora", "dora", "pissa", "pissa_default"):
        from peft import PeftModel

        cfg = read_json(out / "lazyllm_lora" / "adapter_config.json")
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "lazyllm_lora")
        merged = AutoModelForCausalLM.from_pretrained(out / "lazyllm_merge")
        with torch.no_grad():
            a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        assert (a - b).abs().max().item() < 1e-4
        assert (a - base_logits).abs().max().item() > 1e-4
        if name == "rslora":
            assert cfg["use_rslora"] is True
            # the tokenised rows, from the data cache shared by runs (the train log names the entry it used)
            import re

            used = re.search(r"tokenised data: .* \((/\S+\.json)\)", (out / "logs" / "train.log").read_text())
            cache = Path(used.group(1))
            ex = json.loads(cache.read_text())[0]
            assert ex["labels"][0] == -100 and ex["labels"][-1] == ex["input_ids"][-1]  # prompt masked
        if name == "dora":
            assert cfg["use_dora"] is True
        if name == "pissa":  # converted: a plain LoRA of rank 2r
            assert cfg["r"] == 16 and cfg["init_lora_weights"] is True
    else:
        model = AutoModelForCausalLM.from_pretrained(out / "lazyllm_merge")
        with torch.no_grad():
            assert (model(input_ids=ids).logits - base_logits).abs().max().item() > 1e-4
        assert not (out / "lazyllm_lora").exists()


@pytest.mark.slow
def test_deepspeed_zero2_lora_matches_plain_run(lora_run, tmp_path):
    """DeepSpeed's CPU accelerator under HF Trainer (one process; the recipe supplies the torchrun environment).
    The first run on a machine JIT-builds deepspeed_shm_comm (minutes on a busy 2-core box); later runs reuse it."""
    out = tmp_path / "ds2"
    _train(out, "hardware.deepspeed_stage=2", "merge=false")
    s = read_json(out / "train_summary.json")
    assert s["deepspeed"] is True
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    ds, ref = dict(_losses(out)), dict(_losses(lora_run))
    assert ds[12] == pytest.approx(ref[12], abs=1e-3)


@pytest.mark.slow
def test_deepspeed_zero2_optimizer_offload(lora_run, tmp_path):
    """ZeRO-2 with the optimizer offloaded: DeepSpeed JIT-builds its cpu_adam op (about a minute the first time on
    a machine) and steps DeepSpeedCPUAdam; the loss follows the plain run's."""
    out = tmp_path / "ds2off"
    _train(out, "hardware.deepspeed_stage=2", "hardware.offload_optimizer=true", "merge=false")
    assert "(DeepSpeed, over DeepSpeedCPUAdam)" in (out / "logs" / "train.log").read_text()
    zero = json.loads((out / "deepspeed.json").read_text())["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    ds, ref = dict(_losses(out)), dict(_losses(lora_run))
    assert ds[12] == pytest.approx(ref[12], abs=1e-2)


@pytest.mark.slow
def test_padding_free_batches_train_as_padded_ones(lora_run, tmp_path):
    """On CPU the batches are padding-free (each micro-batch one row, attention within each example); padded batches
    (backend.padding_free=false, where attention auto runs eager attention for short batches and SDPA above) train
    the same, within float tolerance."""
    log = (lora_run / "logs" / "train.log").read_text()
    assert "batches: padding-free" in log and "attention: auto" not in log
    out = tmp_path / "padded"
    _train(out, "save_steps=4", "backend.padding_free=false")
    log = (out / "logs" / "train.log").read_text()
    assert "attention: auto on CPU: eager for batches up to 256 tokens" in log and "padding-free" not in log
    a, b = _losses(lora_run), _losses(out)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-3


@pytest.mark.slow
def test_bf16_mixed_precision_on_cpu(tmp_path, tiny_model):
    """precision=bf16 on CPU: frozen weights bf16, trainable weights fp32 under autocast. The loss falls, the
    adapter is saved in fp32, and the merge (into the fp32 base) equals base+adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model("tiny_llama")
    out = tmp_path / "bf16"
    _train(out, "hardware.precision=bf16")
    s = read_json(out / "train_summary.json")
    assert s["precision"] == "bf16"
    assert "precision: bf16 mixed" in (out / "logs" / "train.log").read_text()
    losses = [ln for _, ln in _losses(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    from safetensors.torch import load_file

    tensors = load_file(str(out / "lazyllm_lora" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(out / "lazyllm_merge").eval()
    assert merged.dtype == torch.float32
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out / "lazyllm_lora").eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() < 1e-4


@pytest.mark.slow
def test_packing_run_trains(tmp_path):
    """backend.packing=true: fewer, fuller rows; the loss falls and the held-out loss is computed unpacked."""
    out = tmp_path / "packed"
    _train(out, "backend.packing=true", "cutoff_len=256")
    log = (out / "logs" / "train.log").read_text()
    assert "packing: 128 training examples -> " in log
    losses = [ln for _, ln in _losses(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert read_json(out / "train_summary.json")["eval_loss"] is not None


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_merges_into_the_full_precision_base(tmp_path, tiny_model):
    """method=qlora as typed (4-bit NF4 base through bitsandbytes on this CPU, LoRA on top, the held-out evaluation
    included): the loss falls; the merge goes into the full-precision base, so merged == fp32 base + adapter
    (5e-7 here); against the 4-bit training model it differs by the base's own quantisation error, measured here."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "qlora"
    proc = _train(out, "method=qlora")
    assert "QLoRA: base loaded in 4-bit nf4" in (out / "logs" / "train.log").read_text()
    losses = [ln for _, ln in _losses(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert read_json(out / "metrics.json")["eval_loss"] > 0 and "merge" in proc.stdout
    model_dir = tiny_model("tiny_llama")
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "lazyllm_merge")(input_ids=ids).logits
        full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "lazyllm_lora")
        assert (merged - full(input_ids=ids).logits).abs().max().item() < 1e-4
        q = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
            device_map={"": "cpu"},
        )
        qbase = AutoModelForCausalLM.from_pretrained(model_dir, **q).train()  # the training kernel (see recipe)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        quant_error = (qbase(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item()
        qtrained = PeftModel.from_pretrained(qbase, out / "lazyllm_lora").train()
        for mod in qtrained.modules():
            if hasattr(mod, "lora_dropout"):
                for d in mod.lora_dropout.values():
                    d.p = 0.0  # train mode for the kernel, no dropout
        gap = (merged - qtrained(input_ids=ids).logits).abs().max().item()
    assert 0 < quant_error and gap <= 2 * quant_error + 1e-4, (gap, quant_error)


@pytest.mark.slow
def test_zero3_loads_the_weights_partitioned(tmp_path, tiny_model):
    """Under ZeRO-3 the Trainer's DeepSpeed config exists before from_pretrained, so every rank loads its shard
    (deepspeed.zero.Init) instead of the whole model; parameter counts still read the full sizes."""
    out = tmp_path / "z3"
    _train(out, "method=full", "hardware.deepspeed_stage=3", "max_steps=2", "eval_steps=2")
    assert "ZeRO-3: weights loaded partitioned across the ranks" in (out / "logs" / "train.log").read_text()
    s = read_json(out / "train_summary.json")
    assert (
        s["deepspeed"] is True
        and s["total_params"] == s["trainable_params"] == _llama_counts(tiny_model("tiny_llama"))["total"]
    )  # full sizes (ds_numel), not the shards
