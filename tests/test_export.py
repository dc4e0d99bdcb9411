"""GGUF export (finetune export, export=gguf|gguf-lora; finetune/export.py): what is refused, in one line and before
anything heavy is imported; the plan of a run that exports; the chat templates the prompt travels in.

The real thing, on the real model, is checked by tests/test_readme.py on the README's SmolLM2 showcase run
(`finetune export ... --to gguf --type q8_0`, then f16, q4_k_m and gguf-lora): prompt ids, greedy answers against
the merged model, the LoRA GGUF on the base GGUF, transformers reading the GGUF back, and the round trip through
model=gguf (_gguf_like_the_merged_model, _chat_with_the_gguf).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import FINETUNE, REPO, run_train, user_env

from finetune.recipes.chat_templates import alpaca_jinja, alpaca_ollama, layout_of, render
from finetune.recipes.prompting import PromptFormat
from finetune.recipes.templates import alpaca_prompt, load_template, template_names

SMOL = ["model=smollm2_135m"]  # the default tiny model's tokenizer is refused (trained here)
REFUSED = [
    (
        ["export=gguf"],
        "error: export='gguf': model tiny_llama's tokenizer was trained here (finetune/tools/tiny_models.py), and "
        "llama.cpp's converter knows the tokenizers of published models only (by their pre-tokenizer): export a run "
        "of model=smollm2_135m, model=gguf or your own model",
    ),
    (["export=ggu"], "error: export='ggu': one of gguf, gguf-lora (did you mean 'gguf'?)"),
    (["export=gguf", "export_type=q5"], "error: export_type='q5': one of bf16, f16, q4_k_m, q8_0"),
    (
        ["export=gguf-lora", "export_type=q4_k_m"],
        "error: export_type='q4_k_m': a LoRA GGUF is one of bf16, f16, q8_0 (llama.cpp's quantizer does not take "
        "adapters)",
    ),
    (["export_type=q8_0"], "error: export_type='q8_0': has no effect without export=gguf or export=gguf-lora"),
    (
        [*SMOL, "method=full", "export=gguf-lora"],
        "error: export='gguf-lora': method full trains no LoRA adapter; use export=gguf",
    ),
    (
        ["backend=flagembedding", "export=gguf"],
        "error: export='gguf': model tiny_bert is an embedding model (backend flagembedding); GGUF export is for "
        "causal language models: use the saved model folder with sentence-transformers or FlagEmbedding",
    ),
]


@pytest.mark.parametrize("overrides,expected", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_export_keys_refused_in_one_line(overrides, expected, tmp_path):
    proc, run = run_train(*overrides, outputs=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [expected]
    assert run is None and not (tmp_path / "run").exists()


def test_a_run_plans_the_export_as_its_last_step(tmp_path):
    proc, _ = run_train(*SMOL, "export=gguf", "export_type=q8_0", "dry_run=true", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = [
        line.split(".", 1)[1].split()[0] for line in proc.stdout.splitlines() if line[:5].strip().rstrip(".").isdigit()
    ]
    assert steps[-1] == "export_gguf" and steps[0] in ("build_model", "train")
    assert '"-m", "finetune.recipes.export_gguf"' in proc.stdout and '"--type", "q8_0"' in proc.stdout
    assert "export=gguf: gguf/ gets the model as q8_0 GGUF (llama.cpp's converter and quantizer)" in proc.stdout


def _export(*args: str, cwd: Path = REPO):
    return subprocess.run(
        [FINETUNE, "export", *args], cwd=str(cwd), env=user_env(), capture_output=True, text=True, timeout=120
    )


def test_finetune_export_refuses_in_one_line(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    collie = tmp_path / "collie_ckpt"
    collie.mkdir()
    (collie / "trainer_state_dict.json").write_text(json.dumps({"dp_size": 1, "tp_size": 1, "pp_size": 1}))
    raw = tmp_path / "collie_run" / "collie_adapter"
    raw.mkdir(parents=True)
    (raw / "adapter_config.json").write_text("{}")
    (raw.parent / "collie_summary.json").write_text("{}")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    tiny = tmp_path / "tiny_run"  # a run of the default tiny model: refused before llama.cpp's build starts
    tiny.mkdir()
    (tiny / "resolved_config.json").write_text(json.dumps({"model": {"name": "tiny_llama", "builder": "tiny_llama"}}))
    cases = [
        (
            ["--to", "gguf", str(tiny)],
            f"error: run='{tiny}': model tiny_llama's tokenizer was trained here (finetune/tools/tiny_models.py), and "
            "llama.cpp's converter knows the tokenizers of published models only (by their pre-tokenizer): export a "
            "run of model=smollm2_135m, model=gguf or your own model",
        ),
        (["--to", "onnx", str(llama)], "error: to='onnx': one of gguf, gguf-lora"),
        (["--to", "gguf", "--type", "q5", str(llama)], "error: type='q5': one of bf16, f16, q4_k_m, q8_0"),
        (
            ["--to", "gguf", str(bert)],
            f"error: run='{bert}': is an embedding model (BertModel); GGUF export is for causal language models: use "
            "the folder itself with sentence-transformers or FlagEmbedding",
        ),
        (
            ["--to", "gguf", str(collie)],
            f"error: run='{collie}': is a Collie checkpoint (Collie's own sharded layout), which llama.cpp's converter "
            "cannot read; export the run folder instead (its lazyllm_merge / lazyllm_lora are in Hugging Face layout)",
        ),
        (
            ["--to", "gguf-lora", str(raw)],
            f"error: run='{raw}': is Collie's own adapter layout (q/k rows permuted as Collie stores them), which "
            f"would give wrong weights; export the run folder {raw.parent} (its adapter in Hugging Face layout)",
        ),
        (
            ["--to", "gguf-lora", str(llama)],
            f"error: run='{llama}': is not a run folder or an adapter folder (adapter_config.json): --to gguf-lora "
            "converts an adapter",
        ),
        (
            ["--to", "gguf", str(llama), "--out", str(tmp_path / "taken")],
            f"error: out='{tmp_path / 'taken'}': exists and is not empty; an export never writes into a folder it "
            "did not make: choose another --out",
        ),
        (
            ["--to", "gguf", str(tmp_path / "nothing")],
            f"error: run='{tmp_path / 'nothing'}': not a run folder (resolved_config.json), a sweep folder "
            "(summary.json), a model folder (config.json) or an adapter folder (adapter_config.json)",
        ),
    ]
    for args, expected in cases:
        proc = _export(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.splitlines() == [expected], (args, proc.stderr)


def test_what_is_exported(tmp_path):
    """A run: its merged model, else base + adapter; gguf-lora: the adapter; a sweep folder: its best job."""
    from finetune.export import default_out, resolve

    base, sweep = tmp_path / "base", tmp_path / "sweep"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    for job in ("0", "1"):
        run = sweep / job
        (run / "lazyllm_lora").mkdir(parents=True)
        (run / "lazyllm_lora" / "adapter_config.json").write_text("{}")
        cfg = {"name": "sweep", "backend": {"name": "alpacalora"}, "model": {"path": str(base), "kind": "causal_lm"}}
        (run / "resolved_config.json").write_text(json.dumps({**cfg, "method": {}}))
        outputs = {"adapter": str(run / "lazyllm_lora"), "merged": str(run / "lazyllm_merge")}
        (run / "manifest.json").write_text(json.dumps({"outputs": outputs}))
    (sweep / "summary.json").write_text(json.dumps({"best_job": "1"}))
    src = resolve(str(sweep), "gguf")
    assert src.run_dir == str(sweep / "1") and (src.model, src.adapter) == (
        str(base),
        str(sweep / "1" / "lazyllm_lora"),
    )
    assert default_out(src, "gguf") == sweep / "1" / "gguf"
    (sweep / "1" / "lazyllm_merge").mkdir()
    (sweep / "1" / "lazyllm_merge" / "config.json").write_text("{}")
    assert (resolve(str(sweep / "1"), "gguf").model, resolve(str(sweep / "1"), "gguf").adapter) == (
        str(sweep / "1" / "lazyllm_merge"),
        None,
    )
    lora = resolve(str(sweep / "1"), "gguf-lora")
    assert (lora.model, lora.adapter) == (str(base), str(sweep / "1" / "lazyllm_lora"))


def test_generate_refuses_a_missing_gguf_in_one_line(tmp_path):
    proc = subprocess.run(
        [FINETUNE, "generate", str(tmp_path / "m.gguf"), "--prompt", "hi"],
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: run='{tmp_path / 'm.gguf'}': no such file (a GGUF file, or a folder finetune export wrote)"
    ]


# ------------------------------------------------------------------------------------------- the templates

ROWS = [
    {"instruction": "Reverse the words.", "input": "red rice"},
    {"instruction": "Copy the words.", "input": ""},
    {"instruction": "Sort the words.", "input": "b a\nc"},  # an input of two lines stays one input
    {"instruction": 'Say it\'s "done" \\ ok', "input": "{x} {{y}}"},  # quotes, backslashes, braces
]


@pytest.mark.parametrize("name", template_names())
def test_alpaca_chat_template_renders_the_training_prompt(name):
    """The Jinja template the GGUF carries gives, for a user message 'instruction\\ninput', exactly the alpaca
    prompt training built from the row; and for a chat, what finetune chat builds (earlier prompts and answers)."""
    t = load_template(name)
    jinja = alpaca_jinja(t, bos=False)
    for row in ROWS:
        turns = [{"role": "user", "content": "\n".join(x for x in (row["instruction"], row["input"]) if x)}]
        assert render(jinja, turns) == alpaca_prompt(t, row["instruction"], row["input"] or None)
    chat = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "Reverse the words.\nred rice"},
        {"role": "assistant", "content": "rice red"},
        {"role": "user", "content": "  Copy the words.  \n  a b  \n"},
    ]
    fmt = PromptFormat("alpaca", name, t)

    class Tok:  # PromptFormat's alpaca text, without a tokenizer
        bos_token_id = None

        def __call__(self, text, add_special_tokens, padding):
            return {"input_ids": text}

    assert render(jinja, chat) == fmt.encode(Tok(), chat)
    assert render(alpaca_jinja(t, bos=True), chat[1:2], bos_token="<s>").startswith("<s>" + t["prompt_input"][:5])


def test_alpaca_ollama_template_says_the_same_prompt():
    """Ollama's Go template: the same literal pieces around the instruction and the input (Go has no split: the
    first newline is found byte by byte); no triple quote, which a Modelfile cannot hold."""
    t = load_template("alpaca_short")
    go = alpaca_ollama(t, None)
    assert '"""' not in go
    assert '{{ "### Instruction:\\n" }}{{ $ins }}{{ "\\n\\n### Input:\\n" }}{{ $inp }}' in go
    assert "(eq (index $c $i) 10)" in go and "{{- range $i := len $c }}" in go


def test_chat_template_layout_for_ollama():
    chatml = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    lay = layout_of(chatml, "<s>", "</s>")
    assert lay.wrap["user"] == ("<|im_start|>user\n", "<|im_end|>\n") and lay.cue == "<|im_start|>assistant\n"
    assert lay.wrap["system"] == ("<|im_start|>system\n", "<|im_end|>\n")
    assert '{{- range .Messages }}{{- if eq .Role "user" }}{{ "<|im_start|>user\\n" }}{{ .Content }}' in lay.ollama()
    # a template whose text depends on more than the turn (the alpaca split) has no plain layout
    assert layout_of(alpaca_jinja(load_template("alpaca"), False), "", "") is None
