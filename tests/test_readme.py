"""The README and its docs pages, as a new user meets them: every command of their code blocks runs as typed, in
order, in a fresh clone of this repository, with the user's environment (no FINETUNE_* variables), from the clone's
root, and the main ones again from another working folder. Each must give the exit code and the output the page
documents. The order is the README's, then each docs page its "## Documentation" list links, in that list's order
(DOCS): later commands use the runs of earlier ones.

- ``bash scripts/setup.sh && .venv/bin/python train.py`` runs first (the README's first command), then every
  other command with the environment activated (``source .venv/bin/activate``), in that order.
- Placeholders are what a user fills in from what came before: ``<repo>`` the clone, ``outputs/runs/<date>/<time>-
  <name>`` the newest run folder, ``outputs/multiruns/<date>/<time>`` the newest sweep folder, ``<mlflow run id>``
  the newest run logged to MLflow.
- ``finetune mlflow-server start`` leaves a real MLflow server running for the commands after it, as for a user;
  ``finetune mlflow-server stop`` ends it (and the clone fixture stops it whatever happens).
- ``$ command`` lines of a block are refusals: exit code 2 and exactly the line the page shows.
- ``bash scripts/test.sh`` is the command that runs this test (CI runs it): it is the one command not run here.

EXPECT lists every command with what it must print; a command of the README or its docs pages missing from it (or
an entry whose command left them) fails the test, so the pages and the test move together.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, user_env
from test_setup import fresh_clone
from test_sweeps import summary_rows

README = REPO / "README.md"
COMPLETED = r"\[finetune\] completed: "
SWEEP = r"summary: \S+/summary\.md \({} jobs, 0 not completed"
# command as written in the README -> (exit code, regexes its output must match, timeout in seconds)
EXPECT = {
    "bash scripts/setup.sh && .venv/bin/python train.py": (0, [r"setup: ready", COMPLETED + r".*eval_loss="], 1800),
    "python train.py backend=collie lora_r=16": (0, [r"setup-collie: ", r"\[collie_merge\]", COMPLETED], 1800),
    "python train.py --cfg job": (0, [r"(?m)^backend:\n  name: alpacalora$", r"(?m)^lora_r: 8$"], 120),
    "python train.py experiment=smollm2_lora": (
        0,
        [
            r"gen_eval \(before\)",
            COMPLETED + r".*base_eval_exact_match=0"
            r"(\.0\d*)?\s+eval_exact_match=(0\.[2-9]\d*|1)\b",
        ],
        1800,
    ),
    'finetune generate outputs/runs/<date>/<time>-<name> --prompt "Copy the words." --input "red rice"': (
        0,
        [r"\[finetune generate\] the merged model .*prompt template alpaca", r"(?m)^red rice$"],
        600,
    ),
    "finetune chat outputs/runs/<date>/<time>-<name>": (0, [r"/reset clears the history", r"you> "], 600),
    # the llama.cpp environment is built by scripts/test.sh beside the suite; a user's first export builds it here
    "finetune export outputs/runs/<date>/<time>-<name> --to gguf --type q8_0": (
        0,
        [
            r"llama\.cpp llama_model_quantize",
            r"wrote \S+/gguf/smollm2_lora-q8_0\.gguf",
            r"\[finetune export\] \S+\.gguf",
        ],
        2400,
    ),
    "finetune chat outputs/runs/<date>/<time>-<name>/gguf/smollm2_lora-q8_0.gguf": (
        0,
        [r"smollm2_lora-q8_0\.gguf through llama\.cpp", r"the GGUF's own chat template", r"you> "],
        600,
    ),
    "python train.py dry_run=true": (0, [r"steps:\n  1\. train", r"dry run: nothing was written"], 120),
    "python train.py method=dora lora_r=16 num_epochs=1": (0, [r"dora=True", COMPLETED], 600),
    "python train.py method=pissa": (0, [r"PiSSA conversion: kept the trained", COMPLETED], 600),
    "python train.py experiment=alpaca_lora": (0, [COMPLETED], 600),
    "python train.py experiment=llamafactory_lora_sft": (0, [r"llamafactory_cli train", COMPLETED], 600),
    "python train.py data=llamafactory data.dataset=identity val_set_size=8 max_steps=10": (
        0,
        [COMPLETED + r".*eval_loss="],
        600,
    ),
    "python train.py backend=llamafactory data=llamafactory data.dataset=kto_en_demo backend.stage=kto max_steps=4": (
        0,
        [r"llamafactory_cli train", COMPLETED],
        600,
    ),
    "python train.py data=llamafactory 'data.dataset=[identity,alpaca_en_demo]' "
    "'data.mix={identity: 3, alpaca_en_demo: 1}' val_set_size=8 max_steps=5": (
        0,
        [COMPLETED + r".*  data: identity 91 \+ alpaca_en_demo 30 rows"],
        600,
    ),
    "python train.py experiment=smollm2_dpo": (
        0,
        [
            r"pref_eval \(before\): accuracy \d+/64",
            COMPLETED + r".*base_eval_preference_accuracy=0\.\d+\s+eval_preference_accuracy=(0\.\d+|1)\b",
        ],
        1800,
    ),
    "python train.py experiment=smollm2_dpo adapter=outputs/runs/<date>/<time>-smollm2_lora max_steps=16": (
        0,
        [COMPLETED + r".*eval_preference_accuracy="],
        1800,
    ),
    "python train.py backend=flagembedding": (
        0,
        [r"embed_eval \(before\): recall_at_1", COMPLETED + r".*eval_loss="],
        600,
    ),
    "python train.py backend=auto explain=true model=llama model.path=data/model_shapes/llama-2-7b "
    "hardware=a100_80g_x8 dry_run=true": (0, [r"\[auto\] choice: ", r"dry run: nothing was written"], 120),
    "python train.py launcher.nproc_per_node=2": (0, [r"torch\.distributed\.run", COMPLETED], 600),
    "python train.py backend.packing=true cutoff_len=256": (
        0,
        [r"packing: \d+ training examples -> \d+ rows", COMPLETED],
        600,
    ),
    "python train.py -m lora_r=4,8,16 'lora_alpha=${eval:2*lora_r}' max_steps=10": (0, [SWEEP.format(3)], 1200),
    "python train.py -m +sweep=lora_methods max_steps=10": (0, [SWEEP.format(4)], 1200),
    "python train.py -m backend=alpacalora,llamafactory experiment=llamafactory_lora_sft": (0, [SWEEP.format(2)], 1200),
    "python train.py +hparams_search=lora_optuna hydra.sweeper.n_trials=3 max_steps=8": (0, [SWEEP.format(3)], 1200),
    "finetune summarize outputs/multiruns/<date>/<time>": (0, [SWEEP.format(r"\d+")], 300),
    "finetune reproduce outputs/runs/<date>/<time>-<name>": (0, [r"reproduced: loss curves (identical|match)"], 900),
    'cd "$(mktemp -d)" && python <repo>/train.py output_dir=runs/first': (0, [COMPLETED + r"/tmp/\S+/runs/first"], 600),
    "python train.py report_to=mlflow": (
        0,
        [
            r"\[finetune\] mlflow: run [0-9a-f]{32} in experiment 'run' \(the local "
            r"store outputs/mlflow",
            COMPLETED,
        ],
        600,
    ),
    "python train.py 'report_to=[tensorboard,wandb]' max_steps=20": (
        0,
        [
            r"\[finetune\] wandb: offline run \w+ in "
            r"\S+/wandb/offline-run-",
            COMPLETED,
        ],
        600,
    ),
    # the server runs in the background until `finetune mlflow-server stop` (the clone fixture also stops it)
    "finetune mlflow-server start": (0, [r"mlflow-server: running: http://127\.0\.0\.1:\d+"], 900),
    "MLFLOW_TRACKING_URI=$(finetune mlflow-server url) python train.py -m lora_r=4,8 report_to=mlflow max_steps=10": (
        0,
        [
            SWEEP.format(2),
            r"\[finetune\] mlflow: sweep run [0-9a-f]{32} in experiment 'run' "
            r"\(http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/[0-9a-f]{32}\)",
        ],
        1200,
    ),
    "finetune reproduce <mlflow run id>": (
        0,
        [r"reproduce: MLflow run [0-9a-f]{32} is the run folder", r"reproduced: loss curves (identical|match)"],
        900,
    ),
    "finetune mlflow-server stop": (0, [r"mlflow-server: stopped"], 120),
    "python train.py method=qlora": (0, [r"QLoRA: base loaded in 4-bit nf4", COMPLETED], 600),
    "python train.py hardware=a100_80g_x8 launcher=slurm dry_run=true": (
        0,
        [r"#SBATCH --gpus-per-node=8", r"--nproc_per_node=8"],
        120,
    ),
    "bash scripts/gpu_smoke.sh --dry-run": (0, [r"alpacalora_qlora: ", r"estimator: "], 120),
    "python train.py -m data=llamafactory 'data.dataset=[identity,alpaca_en_demo]' "
    "'data.mix={identity: 1, alpaca_en_demo: 1}' data.mix.identity=1,3 val_set_size=8 max_steps=5": (
        0,
        [SWEEP.format(2)],
        1200,
    ),
    "python train.py experiment=smollm2_kto": (0, [COMPLETED + r".*eval_preference_accuracy="], 1800),
}
NOT_RUN = {"bash scripts/test.sh": "the command that runs this test (CI runs it)"}
PNG = b"\x89PNG\r\n\x1a\n"


def _history_losses(job: Path):
    return [r["loss"] for r in map(json.loads, (job / "history.jsonl").read_text().splitlines()) if "loss" in r]


def _lora_r_sweep(clone: Path) -> None:
    """Every job of the sweep in the summary, alpha paired with r, each job's loss falling, the summary's objective
    what the job returned, trainable parameters growing by r*(in+out) per module, and the plot against lora_r."""
    folder = clone / newest("outputs/multiruns/*/*", clone)
    rows = summary_rows(folder)
    assert [(r["lora_r"], r["lora_alpha"], r["status"]) for r in rows] == [
        ("4", "8", "completed"),
        ("8", "16", "completed"),
        ("16", "32", "completed"),
    ]
    for row in rows:
        job = folder / row["job"]
        losses = _history_losses(job)
        assert len(losses) >= 3 and losses[-1] < losses[0], losses
        result = json.loads((job / "result.json").read_text())
        assert result["metric_name"] == "eval_loss" and result["metric"] == result["metrics"]["eval_loss"] > 0
        assert float(row["objective"]) == pytest.approx(result["metric"])
    params = [int(r["trainable_params"]) for r in rows]
    assert params[0] < params[1] < params[2] and (params[1] - params[0]) % 4 == 0
    assert (folder / "metric_vs_lora_r.png").read_bytes()[:8] == PNG


def _backends_sweep(clone: Path) -> None:
    """One experiment on two backends, compared in one table and one plot; the backends' own differing defaults are
    columns, not plot axes."""
    folder = clone / newest("outputs/multiruns/*/*", clone)
    rows = summary_rows(folder)
    assert [(r["backend"], r["status"]) for r in rows] == [("alpacalora", "completed"), ("llamafactory", "completed")]
    assert all(float(r["eval_loss"]) > 0 and float(r["train_loss"]) > 0 for r in rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["params"][0] == "backend" and summary["n_failed"] == 0
    assert (folder / "loss_curves.png").read_bytes()[:8] == PNG and (folder / "metric_vs_backend.png").exists()
    assert not list(folder.glob("metric_vs_lora_alpha.png"))
    for row in rows:
        losses = _history_losses(folder / row["job"])
        assert len(losses) >= 3 and losses[-1] < losses[0], (row["backend"], losses)


def _optuna(clone: Path) -> None:
    """Optuna got what train.py returned: its best value is the summary's best objective; alpha stays 2 x r."""
    from omegaconf import OmegaConf

    folder = clone / newest("outputs/multiruns/*/*", clone)
    rows = summary_rows(folder)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    objectives = [float(r["objective"]) for r in rows]
    assert OmegaConf.load(folder / "optimization_results.yaml").best_value == pytest.approx(min(objectives))
    assert (
        json.loads((folder / "summary.json").read_text())["best_job"] == rows[objectives.index(min(objectives))]["job"]
    )
    assert all(int(r["lora_alpha"]) == 2 * int(r["lora_r"]) for r in rows)


def _reproduced(clone: Path) -> None:
    """The replay of a CPU run with the same versions: the same loss and eval curves bit for bit, no config change."""
    report = json.loads((clone / newest("outputs/runs/*/*/reproduce.json", clone)).read_text())
    curves = {c["key"]: c for c in report["curves"]}
    assert curves["loss"]["steps_compared"] >= 3 and curves["loss"]["identical"], curves
    assert curves["eval_loss"]["identical"], curves
    metrics = {m["metric"]: m for m in report["metrics"]}
    assert metrics["eval_loss"]["diff"] == 0 and metrics["trainable_params"]["diff"] == 0
    assert not report["config_differences"]


def _collie_lora(clone: Path) -> None:
    """Collie's LoRA run: the loss and the eval loss fall, metrics.json agrees with the history, and the exported
    adapter (q/k rows converted back from Collie's layout) and the merged model give Collie's own logits, which
    Collie's raw save_peft output does not."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = clone / newest("outputs/runs/*/*", clone)
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x.strip()]
    loss = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(loss) >= 3 and loss[-1] < loss[0], loss
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert all("learning_rate" in r and "tokens_per_s" in r for r in rows if "loss" in r)
    m = json.loads((run / "metrics.json").read_text())
    assert m["train_loss"] == loss[-1] and m["eval_loss"] == evals[-1]
    assert 0 < m["trainable_params"] < m["total_params"] and m["tokens_per_s"] > 0 and m["peak_rss_mb"] > 0
    assert m["collie_cpu_patches"] == 6
    assert (run / "loss.png").stat().st_size > 1000 and list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((run / "lazyllm_merge").glob("tokenizer*"))
    check = json.loads((run / "merge_check.json").read_text())
    assert check["ok"] and check["adapter_vs_collie"] < 1e-4 and check["merged_vs_adapter"] < 1e-4, check
    # independently: the merged folder reloaded gives Collie's recorded logits, and training changed them
    probe = json.loads((run / "collie_probe.json").read_text())
    base_dir = str(clone / "models" / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(str(run / "lazyllm_merge")).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        for ids, ref in zip(probe["input_ids"], probe["logits"]):
            got = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(got, torch.tensor(ref), atol=1e-4)
            assert (base(input_ids=torch.tensor([ids])).logits[0] - got).abs().max() > 1e-3
    # the conversion is needed: Collie's raw save_peft output (q rows in Collie's layout) does not reproduce them
    raw = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run / "collie_adapter"))
    with torch.no_grad():
        ids, ref = probe["input_ids"][0], torch.tensor(probe["logits"][0])
        assert (raw.eval()(input_ids=torch.tensor([ids])).logits[0] - ref).abs().max() > 1e-3
    adapter = load_file(str(run / "lazyllm_lora" / "adapter_model.safetensors"))
    qb = [v for key, v in adapter.items() if "q_proj.lora_B" in key]
    assert qb and all(float(v.abs().max()) > 0 for v in qb)


def _default_run(clone: Path) -> None:
    """The default run computes what it computed when its reference curve was recorded (within the band that
    seed-free reruns on another thread count stay in: finetune/tools/reference_curves.py); then the first run of the
    real model, built on first use in this fresh clone, is paused after its first checkpoint and resumed (the
    config it composed before the model existed must be the one composed after)."""
    from finetune.tools.reference_curves import outside

    assert outside(clone / newest("outputs/runs/*/*", clone), "default") == []
    _first_use_pause_resume(clone)


def _first_use_pause_resume(clone: Path) -> None:
    out = clone / "outputs" / "first-use"
    args = ["model=smollm2_135m", "max_steps=4", "save_steps=1", "max_samples=48", "val_set_size=8"]
    args += ["cutoff_len=64", "batch_size=4", "micro_batch_size=4", "merge=false", f"output_dir={out}"]
    proc = subprocess.Popen(
        [str(clone / ".venv" / "bin" / "python"), "train.py", *args],
        cwd=str(clone),
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = out / "checkpoints" / "checkpoint-1" / "FINETUNE_COMPLETE"
    deadline = time.monotonic() + 900
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "paused: checkpoint-" in err, err[-3000:]
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert steps[0]["name"] == "build_model" and steps[0]["status"] == "completed"  # its first use built it
    proc, _ = shell(f"python train.py output_dir={out} resume=true", clone, clone, 900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] and summary["global_step"] == 4


def _smollm2_learned(clone: Path) -> None:
    """The real model learned the tasks: exact match, token F1 and ROUGE-L up, the loss down, the answers side by
    side; the conversion from the GGUF file is the package's file and gives its logits; the merged model is the base
    plus the adapter; the tokenizer and prompt files saved with both rebuild the prompt ids training used."""
    from test_smollm2 import TEXTS, _max_logit_diff

    from finetune.recipes.data import encode_alpaca
    from finetune.recipes.prompting import PromptFormat
    from finetune.recipes.templates import load_template

    run = clone / newest("outputs/runs/*/*", clone)
    smol = clone / "models" / "smollm2-135m"
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval_exact_match"] > m["base_eval_exact_match"], m
    assert m["eval_token_f1"] > m["base_eval_token_f1"] and m["eval_rouge_l"] > m["base_eval_rouge_l"], m
    losses = _history_losses(run)
    assert losses[-1] < losses[0], losses
    table = (run / "eval" / "samples.md").read_text()
    assert "| # | prompt | reference | before | after |" in table and "✓" in table
    assert list((run / "tensorboard" / "generation").glob("events.out.tfevents.*"))
    built = json.loads((smol / "BUILT_BY").read_text())
    assert built["source_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert built["logits_check"]["max_abs_diff"] <= 1e-5 and built["tied_embeddings"]
    assert json.loads((smol / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert _max_logit_diff(run / "lazyllm_merge", smol, run / "lazyllm_lora", TEXTS) < 1e-4
    from finetune.tools.reference_curves import outside

    assert outside(run, "smollm2") == []  # what training computes has not moved (tests/reference/loss_curves.json)

    from transformers import AutoTokenizer, GenerationConfig

    cfg = json.loads((run / "resolved_config.json").read_text())
    base_tok = AutoTokenizer.from_pretrained(smol)
    rows = [json.loads(line) for line in (run / "eval" / "heldout.jsonl").read_text().splitlines()][:8]
    for folder in (run / "lazyllm_lora", run / "lazyllm_merge"):
        tok = AutoTokenizer.from_pretrained(folder)
        fmt = PromptFormat.for_folder(folder, tok)
        assert fmt.kind == "alpaca" and fmt.template == cfg["prompt_template_name"] == "alpaca_short"
        gen = GenerationConfig.from_pretrained(folder)
        assert gen.eos_token_id == tok.eos_token_id == 2 and gen.pad_token_id == 2
        assert tok.chat_template == base_tok.chat_template
        for row in rows:
            ex = encode_alpaca(row, base_tok, load_template("alpaca_short"), int(cfg["cutoff_len"]), False)
            n = sum(1 for label in ex["labels"] if label == -100)  # the prompt part training masked
            assert fmt.encode(tok, fmt.row_turns(row)[0]) == ex["input_ids"][:n]


def _generate_gives_the_evaluated_answers(clone: Path) -> None:
    """`finetune generate RUN --data` on the first batch of held-out rows answers what the run's own evaluation
    answered (same batch, same greedy decoding), and one prompt from the merged folder streams the same answer."""
    run = clone / newest("outputs/runs/*/*", clone)
    after = json.loads((run / "eval" / "generate_after.json").read_text())
    batch = int(json.loads((run / "resolved_config.json").read_text())["generate_batch_size"])
    rows = (run / "eval" / "heldout.jsonl").read_text().splitlines()[:batch]
    first = clone / "outputs" / "first_batch.jsonl"  # outputs/ is git-ignored: the clone stays clean
    first.write_text("\n".join(rows) + "\n")
    proc, _ = shell(f"finetune generate {run} --data {first}", clone, clone, 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = re.findall(r"^    -> (.*?)(?:    \(right\)|    \(reference: .*\))?$", proc.stdout, re.M)
    assert answers == [s["answer"].strip() for s in after["samples"][:batch]], proc.stdout[-3000:]
    row = json.loads(rows[0])
    single = clone / "outputs" / "first_row.jsonl"
    single.write_text(rows[0] + "\n")
    expected, _ = shell(f"finetune generate {run} --data {single}", clone, clone, 600)  # unpadded, as one prompt is
    one, _ = shell(
        f"finetune generate {run / 'lazyllm_merge'} --prompt {shlex.quote(row['instruction'])} "
        f"--input {shlex.quote(row['input'])}",
        clone,
        clone,
        600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert f"    -> {one.stdout.strip()}" in expected.stdout, (one.stdout, expected.stdout)


def _chat_in_a_terminal(clone: Path) -> None:
    """The same chat in a real terminal: a multi-line message (a trailing backslash), /reset, /exit."""
    from conftest import run_in_terminal

    run = clone / newest("outputs/runs/*/*", clone)
    answers = ["Reverse the words.\\", "red rice", "/reset", "Copy the words.\\", "red rice", "/exit"]
    screen = run_in_terminal([str(clone / ".venv" / "bin" / "finetune"), "chat", str(run)], cwd=clone, answers=answers)
    assert "/reset clears the history, /exit (or Ctrl-D) quits" in screen, screen
    assert "...> red rice" in screen  # the input went on a continuation line
    replies = re.findall(r"model> (.*)", screen)
    assert len(replies) == 2 and all(a.strip() for a in replies), screen
    assert "(history cleared)" in screen
    assert screen.count("you>") == 4 and screen.rstrip().endswith("/exit")  # the process ended at /exit


EXPORTS = {"f16": "gguf-f16"}  # another type of the showcase run beside the README's q8_0 (q4_k_m: bench/gguf_types.py)


def _llamacpp(clone: Path, *args: str, timeout: float = 900):
    """finetune.gguf_runner in the clone's llama.cpp environment (what `finetune generate` runs for a .gguf)."""
    env = {**user_env(), "PYTHONPATH": str(clone)}
    python = str(clone / ".venv-llamacpp" / "bin" / "python")
    proc = subprocess.run(
        [python, "-m", "finetune.gguf_runner", *args],
        cwd=str(clone),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _gguf_answers(clone: Path, name: str, data: Path, limit: str, model: Path, lora: Path = None) -> list:
    """llama.cpp's greedy answers (and prompt ids) to the rows of ``data`` with the GGUF's own chat template."""
    out = clone / "outputs" / f"answers-{name}.json"
    args = ["--model", str(model), *(["--lora", str(lora)] if lora else []), "--data", str(data)]
    _llamacpp(clone, "answer", *args, "--out", str(out), "--max-new-tokens", limit)
    return json.loads(out.read_text())["rows"]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _read_back(run: Path, tok, trained, refs):
    """transformers reads the f16 GGUF back: (its logits' distances on 4 held-out rows, same argmax everywhere)."""
    import torch
    from transformers import AutoModelForCausalLM

    # transformers reads the f16 GGUF back. The tolerance: an f16 GGUF changes one thing, the matrices rounded to
    # f16 (11-bit mantissa; norms stay f32), so it must give the merged model's logits with its matrices rounded to
    # f16 in torch, to float32 accuracy (measured: 0.0 apart), while both sit ~0.03 from the fp32 logits (of
    # magnitude ~37: 1e-3 relative) with the same argmax at every position.
    f16 = run / "gguf-f16"
    name = json.loads((f16 / "export.json").read_text())["files"]["model"]
    back = AutoModelForCausalLM.from_pretrained(str(f16), gguf_file=name, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(run / "lazyllm_merge"), dtype=torch.float32).eval()
    rounded = AutoModelForCausalLM.from_pretrained(str(run / "lazyllm_merge"), dtype=torch.float32).eval()
    diff = rounding = to_rounded = 0.0
    same_argmax = True
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
        for i in range(4):
            ids = torch.tensor([trained[i] + tok(refs[i], add_special_tokens=False)["input_ids"]])
            want, got, r16 = merged(input_ids=ids).logits, back(input_ids=ids).logits, rounded(input_ids=ids).logits
            diff = max(diff, float((got - want).abs().max()))
            rounding = max(rounding, float((r16 - want).abs().max()))
            to_rounded = max(to_rounded, float((got - r16).abs().max()))
            same_argmax &= bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"vs_merged": diff, "merged_rounded_to_f16": rounding, "vs_rounded": to_rounded}, same_argmax


def _gguf_like_the_merged_model(clone: Path) -> None:
    """The exported files answer like the model the run measured. On the showcase run's held-out rows, each GGUF run
    by llama.cpp with its embedded template (llama-cpp-python's chat completion): the prompt ids equal the prompt
    ids training used on every row; f16 gives the merged HF model's greedy answers (its evaluation's) on >= 95% of
    the rows; q8_0's exact match is within 5 points of the HF model's; the LoRA GGUF on the
    base GGUF answers like the f16 merged GGUF. transformers reads the f16 GGUF back (gguf_file=) with the merged
    model's logits, as close as the merged model's own weights rounded to f16 are."""
    from transformers import AutoTokenizer

    from finetune.recipes.data import encode_alpaca
    from finetune.recipes.gen_eval import answer_of
    from finetune.recipes.templates import load_template

    run = clone / newest("outputs/runs/*/*", clone)
    for type_, folder in EXPORTS.items():
        proc, _ = shell(f"finetune export {run} --to gguf --type {type_} --out {run / folder}", clone, clone, 1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc, _ = shell(f"finetune export {run} --to gguf-lora", clone, clone, 1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for folder in ("gguf", *EXPORTS.values(), "gguf-lora"):
        files = sorted(p.name for p in (run / folder).iterdir())
        assert "Modelfile" in files and "README.md" in files and "export.json" in files, files
    modelfile = (run / "gguf" / "Modelfile").read_text()
    assert "FROM ./smollm2_lora-q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """' in modelfile and '{{ "### Instruction:\\n" }}{{ $ins }}' in modelfile, modelfile

    cfg = json.loads((run / "resolved_config.json").read_text())
    after = json.loads((run / "eval" / "generate_after.json").read_text())["samples"]
    rows = [json.loads(x) for x in (run / "eval" / "heldout.jsonl").read_text().splitlines()][: len(after)]
    data = clone / "outputs" / "gguf_rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(run / "lazyllm_merge")
    template = load_template(cfg["prompt_template_name"])
    trained = []
    for row in rows:
        ex = encode_alpaca(row, tok, template, int(cfg["cutoff_len"]), False)
        trained.append(ex["input_ids"][: sum(1 for label in ex["labels"] if label == -100)])
    limit = str(cfg["max_new_tokens"])
    hf = [_norm(s["answer"]) for s in after]
    refs = [str(r["output"]) for r in rows]

    def exact(answers):
        return sum(
            answer_of(a, len(answer_of(r, 10**6).splitlines())) == answer_of(r, 10**6) for a, r in zip(answers, refs)
        ) / len(refs)

    figures = {"rows": len(rows), "hf_exact_match": exact(hf)}
    results = {}
    for type_, folder in {"q8_0": "gguf", **EXPORTS}.items():
        info = json.loads((run / folder / "export.json").read_text())
        got = _gguf_answers(clone, type_, data, limit, run / folder / info["files"]["model"])
        answers = [_norm(r["answer"]) for r in got]
        results[type_] = answers
        same_ids = sum(r["prompt_ids"] == t for r, t in zip(got, trained))
        figures[type_] = {
            "size_mb": info["sizes_mb"][info["files"]["model"]],
            "export_s": info["times"]["total_s"],
            "same_answer_as_hf": sum(a == b for a, b in zip(answers, hf)) / len(hf),
            "exact_match": exact(answers),
            "prompt_ids_equal": f"{same_ids}/{len(rows)}",
        }
        assert same_ids == len(rows), (type_, got[0]["prompt_ids"], trained[0])
    lora = json.loads((run / "gguf-lora" / "export.json").read_text())
    got = _gguf_answers(
        clone,
        "lora",
        data,
        limit,
        run / "gguf-lora" / lora["files"]["model"],
        run / "gguf-lora" / lora["files"]["lora"],
    )
    lora_answers = [_norm(r["answer"]) for r in got]
    figures["lora_same_answer_as_f16"] = sum(a == b for a, b in zip(lora_answers, results["f16"])) / len(hf)
    figures["lora_size_mb"] = lora["sizes_mb"][lora["files"]["lora"]]

    figures["transformers_read_back"], same_argmax = _read_back(run, tok, trained, refs)
    print(f"GGUF figures: {json.dumps(figures)}")
    (clone / "outputs" / "gguf_figures.json").write_text(json.dumps(figures, indent=1))
    assert figures["f16"]["same_answer_as_hf"] >= 0.95, figures
    assert abs(figures["q8_0"]["exact_match"] - figures["hf_exact_match"]) <= 0.05, figures
    assert figures["lora_same_answer_as_f16"] >= 0.95, figures
    back = figures["transformers_read_back"]
    assert same_argmax and back["vs_rounded"] <= 1e-4 and back["vs_merged"] <= 0.1, figures


def _chat_with_the_gguf(clone: Path) -> None:
    """The GGUF in a real terminal (llama.cpp, the file's template: the alpaca prompt from a two-line message), then
    the round trip: the exported f16 GGUF imported with model=gguf trains again."""
    from conftest import run_in_terminal

    run = clone / newest("outputs/runs/*/*", clone)
    gguf = run / "gguf" / "smollm2_lora-q8_0.gguf"
    answers = ["Copy the words.\\", "red rice", "/exit"]
    screen = run_in_terminal([str(clone / ".venv" / "bin" / "finetune"), "chat", str(gguf)], cwd=clone, answers=answers)
    replies = re.findall(r"model> (.*)", screen)
    assert replies and replies[0].strip() == "red rice", screen  # what the README's finetune generate answers
    f16 = run / "gguf-f16" / "smollm2_lora-f16.gguf"
    proc, _ = shell(
        f"python train.py model=gguf model.gguf_file={f16} output_dir=outputs/gguf_roundtrip max_steps=3 batch_size=4 "
        "micro_batch_size=4 cutoff_len=128 val_set_size=8 prompt_template_name=alpaca_short",
        clone,
        clone,
        1200,
    )
    check(proc, 0, [r"step build_model", COMPLETED], "round trip")
    built = next((clone / "models" / "gguf").glob("smollm2_lora-f16-*/BUILT_BY"))
    record = json.loads(built.read_text())
    assert record["logits_check"]["max_abs_diff"] <= 1e-5 and record["special_tokens"]["eos_token"] == "<|im_end|>"
    losses = _history_losses(clone / "outputs" / "gguf_roundtrip")
    assert losses and all(x == x for x in losses), losses


def _preference_learned(clone: Path, kind: str = "dpo", at_least: float = 0.25) -> dict:
    """The real model's preferences changed: held-out preference accuracy up by ``at_least`` (the DPO showcase's
    16 steps: 29.7 points measured, 53.1% -> 82.8%), the margin up, both in metrics.json, in two history rows
    (before: step 0, after: the last step) and in TensorBoard; every pair's margins side by side; the answers scored
    too."""
    run = clone / newest(f"outputs/runs/*/*-smollm2_{kind}", clone)
    m = json.loads((run / "metrics.json").read_text())
    gain = m["eval_preference_accuracy"] - m["base_eval_preference_accuracy"]
    assert gain >= at_least and m["eval_preference_accuracy_gain"] == pytest.approx(gain), m
    assert m["eval_preference_margin"] > m["base_eval_preference_margin"], m
    assert m["preference_eval_pairs"] == 64 and "eval_exact_match" in m and "base_eval_exact_match" in m
    rows = [
        r for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if "eval_preference_accuracy" in r
    ]
    assert [r["eval_preference_accuracy"] for r in rows] == [
        m["base_eval_preference_accuracy"],
        m["eval_preference_accuracy"],
    ] and rows[0]["step"] == 0 < rows[1]["step"]
    assert (
        "| # | prompt | chosen | rejected | margin before | margin after |"
        in (run / "eval" / "preference_samples.md").read_text()
    )
    assert list((run / "tensorboard" / "generation").glob("events.out.tfevents.*"))
    assert json.loads((run / "result.json").read_text())["metric"] == m["eval_preference_accuracy"]
    return m


def _kto_learned(clone: Path) -> None:
    """The KTO variant moves the held-out preferences the same way (measured: 53% -> 95%)."""
    _preference_learned(clone, "kto", at_least=0.20)


def _mix_weights_swept(clone: Path) -> None:
    """A sweep of a mixture weight: a column of the summary, and each job trained its own composition."""
    folder = clone / newest("outputs/multiruns/*/*", clone)
    rows = summary_rows(folder)
    assert [(r["data.mix.identity"], r["status"]) for r in rows] == [("1", "completed"), ("3", "completed")]
    got = [json.loads((folder / r["job"] / "manifest.json").read_text())["data"]["composition"] for r in rows]
    assert got == [{"identity": 91, "alpaca_en_demo": 91}, {"identity": 91, "alpaca_en_demo": 30}]


def _dpo_on_sft(clone: Path) -> None:
    """DPO on top of the SFT showcase's adapter: LLaMA-Factory merged that adapter into the base before training a
    new one; the export merged both; the evaluations before training loaded the base with it."""
    run = clone / newest("outputs/runs/*/*-smollm2_dpo", clone)
    sft = clone / newest("outputs/runs/*/*-smollm2_lora", clone)
    assert "Merged 1 adapter(s)." in (run / "logs" / "train.log").read_text()
    export = (run / "llamafactory" / "export.yaml").read_text()
    assert f"adapter_name_or_path: {sft / 'lazyllm_lora'},{run / 'lazyllm_lora'}" in export
    before = json.loads((run / "eval" / "preference_before.json").read_text())
    assert before["adapter"] == str(sft / "lazyllm_lora")
    assert json.loads((run / "resolved_config.json").read_text())["adapter"] == str(sft / "lazyllm_lora")


# what a command left behind, checked after it (the README runs are the suite's real sweeps, replays and the
# real model's run)
AFTER = {
    "bash scripts/setup.sh && .venv/bin/python train.py": _default_run,
    "python train.py experiment=smollm2_dpo": _preference_learned,
    "python train.py experiment=smollm2_kto": _kto_learned,
    "python train.py -m data=llamafactory 'data.dataset=[identity,alpaca_en_demo]' "
    "'data.mix={identity: 1, alpaca_en_demo: 1}' data.mix.identity=1,3 val_set_size=8 max_steps=5": _mix_weights_swept,
    "python train.py experiment=smollm2_dpo adapter=outputs/runs/<date>/<time>-smollm2_lora max_steps=16": _dpo_on_sft,
    "python train.py backend=collie lora_r=16": _collie_lora,
    "python train.py experiment=smollm2_lora": _smollm2_learned,
    'finetune generate outputs/runs/<date>/<time>-<name> --prompt "Copy the words." --input "red rice"': (
        _generate_gives_the_evaluated_answers
    ),
    "finetune chat outputs/runs/<date>/<time>-<name>": _chat_in_a_terminal,
    "finetune export outputs/runs/<date>/<time>-<name> --to gguf --type q8_0": _gguf_like_the_merged_model,
    "finetune chat outputs/runs/<date>/<time>-<name>/gguf/smollm2_lora-q8_0.gguf": _chat_with_the_gguf,
    "python train.py -m lora_r=4,8,16 'lora_alpha=${eval:2*lora_r}' max_steps=10": _lora_r_sweep,
    "python train.py -m backend=alpacalora,llamafactory experiment=llamafactory_lora_sft": _backends_sweep,
    "python train.py +hparams_search=lora_optuna hydra.sweeper.n_trials=3 max_steps=8": _optuna,
    "finetune reproduce outputs/runs/<date>/<time>-<name>": _reproduced,
}
# the main commands again, from another working folder: <repo>/train.py from a fresh temporary folder (a sweep
# from another folder: tests/test_user_world.py, on the dummy backend; the README's own `cd "$(mktemp -d)"` line)
ELSEWHERE = [
    "python train.py dry_run=true",
    "python train.py method=dora lora_r=16 num_epochs=1",
]
# Two fresh clones run the README side by side (tests/test_readme_sweeps.py runs the second): this file from the
# README's first command to the single runs and the replay of the newest one; the other from the sweeps on (its
# clone set up by the user's `bash scripts/setup.sh`). Each keeps README order.
SECOND_FROM = "python train.py -m lora_r=4,8,16 'lora_alpha=${eval:2*lora_r}' max_steps=10"


def split_commands():
    runnable = [c for c in COMMANDS if c not in NOT_RUN]
    at = runnable.index(SECOND_FROM)
    replay = "finetune reproduce outputs/runs/<date>/<time>-<name>"  # replays the newest single run: the first's
    return runnable[:at] + [replay], [c for c in runnable[at:] if c != replay]


def docs_pages() -> list:
    """The docs pages the README's "## Documentation" list links (``](docs/NAME.md)``), in its order, each once."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"(?ms)^## Documentation\n(.*?)(?=^## |\Z)", text)
    pages = []
    for page in re.findall(r"\]\((docs/[\w.-]+\.md)\)", section.group(1) if section else ""):
        if page not in pages:
            pages.append(page)
    return pages


def readme_blocks():
    """(commands, refusals): shell lines of the ``bash`` blocks (comments and blank lines dropped), and the
    ``$ command`` / expected line pairs of the plain blocks, of the README and then of each page of DOCS."""
    text = "\n".join((REPO / page).read_text(encoding="utf-8") for page in ["README.md", *DOCS])
    commands, refusals = [], []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        lines = body.splitlines()
        if lang == "bash":
            for line in lines:
                line = strip_comment(line).strip()
                if line:
                    commands.append(line)
        else:
            for i, line in enumerate(lines):
                if line.startswith("$ "):
                    refusals.append((line[2:], lines[i + 1]))
    return commands, refusals


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


DOCS = docs_pages()  # the README's docs pages, in the order its commands run
COMMANDS, REFUSALS = readme_blocks()
FIRST, SECOND = split_commands()


def test_every_readme_command_has_an_expectation():
    assert set(COMMANDS) - set(EXPECT) - set(NOT_RUN) == set(), "README commands this test does not know"
    assert set(EXPECT) - set(COMMANDS) == set(), "expectations for commands that left the README"
    assert COMMANDS[0] == "bash scripts/setup.sh && .venv/bin/python train.py"
    assert DOCS and all((REPO / page).is_file() for page in DOCS), DOCS
    assert len(REFUSALS) >= 5
    assert sorted(FIRST + SECOND) == sorted(c for c in COMMANDS if c not in NOT_RUN)


def make_clone(dest: Path, setup: bool) -> Path:
    """A fresh clone; ``setup``: the user's setup command first (bash scripts/setup.sh), for a clone whose commands
    do not start with the README's first one."""
    folder = fresh_clone(dest)
    if setup:
        proc, _ = shell("bash scripts/setup.sh", folder, folder, 1800, activate=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


def stop_servers(folder: Path) -> None:
    """`finetune mlflow-server start` keeps a server running until its stop command: stop it anyway."""
    if (folder / "outputs" / "mlflow" / "server.json").exists():
        subprocess.run(
            [str(folder / ".venv" / "bin" / "finetune"), "mlflow-server", "stop"],
            cwd=str(folder),
            env=user_env(),
            capture_output=True,
            timeout=120,
        )


def clone_fixture(name: str, setup: bool):
    """A module's fresh clone (see make_clone); whatever happens, a server a command left running is stopped."""

    @pytest.fixture(scope="module")
    def clone(tmp_path_factory):
        folder = make_clone(tmp_path_factory.mktemp(name) / "finetune", setup)
        try:
            yield folder
        finally:
            stop_servers(folder)

    return clone


clone = clone_fixture("readme", setup=False)


def newest(pattern: str, clone: Path) -> str:
    found = sorted(clone.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"nothing matches {pattern} in {clone}"
    return str(found[-1].relative_to(clone))


def as_typed(command: str, clone: Path) -> str:
    """The command with the placeholders a user fills in from what came before."""
    command = command.replace("<repo>", str(clone))
    if "outputs/runs/<date>/<time>-smollm2_lora" in command:  # the SFT showcase's run
        command = command.replace(
            "outputs/runs/<date>/<time>-smollm2_lora", newest("outputs/runs/*/*-smollm2_lora", clone)
        )
    if "outputs/runs/<date>/<time>-<name>" in command:
        command = command.replace("outputs/runs/<date>/<time>-<name>", newest("outputs/runs/*/*", clone))
    if "<mlflow run id>" in command:  # the newest run logged to MLflow (its tracking.json)
        found = sorted(clone.glob("outputs/runs/*/*/tracking.json"), key=lambda p: p.stat().st_mtime)
        ids = [json.loads(p.read_text()).get("mlflow", {}).get("run_id") for p in found]
        ids = [i for i in ids if i]
        assert ids, "no run logged to MLflow before this command"
        command = command.replace("<mlflow run id>", ids[-1])
    if "outputs/multiruns/<date>/<time>" in command:
        command = command.replace("outputs/multiruns/<date>/<time>", newest("outputs/multiruns/*/*", clone))
    return command


def shell(command: str, cwd: Path, clone: Path, timeout: float, activate: bool = True):
    """A user's bash: the environment activated as the README says (source .venv/bin/activate), then the line."""
    line = f"source {clone}/.venv/bin/activate && {command}" if activate else command
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", line],
        cwd=str(cwd),
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # `finetune chat` reads to the end: exits
    return proc, time.monotonic() - t0


def check(proc, code: int, patterns, command: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"{command}: exit {proc.returncode}\n{out[-4000:]}"
    for p in patterns:
        assert re.search(p, out), f"{command}: no {p!r} in the output\n{out[-4000:]}"


def run_readme_command(command: str, clone: Path, record_property) -> None:
    code, patterns, timeout = EXPECT[command]
    first = command == COMMANDS[0]
    proc, seconds = shell(as_typed(command, clone), clone, clone, timeout, activate=not first)
    record_property("readme_command", command)
    record_property("exit", proc.returncode)
    record_property("seconds", round(seconds, 1))
    print(f"README: {command}  -> exit {proc.returncode} in {seconds:.0f} s")
    check(proc, code, patterns, command)
    if command in AFTER:
        AFTER[command](clone)


@pytest.mark.slow
@pytest.mark.parametrize("command", FIRST)
def test_readme_command(command, clone, record_property):
    run_readme_command(command, clone, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("command,expected", REFUSALS, ids=[c for c, _ in REFUSALS])
def test_readme_refusal(command, expected, clone):
    proc, _ = shell(command, clone, clone, 120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [expected]
    assert not list((clone / "outputs").glob("runs/*/*-run-refused*"))


def run_from_another_folder(command: str, clone: Path, tmp_path: Path, record_property) -> None:
    code, patterns, timeout = EXPECT[command]
    elsewhere = command.replace("python train.py", f"python {clone}/train.py", 1)
    proc, seconds = shell(elsewhere, tmp_path, clone, timeout)
    record_property("readme_command", f"(from another folder) {elsewhere.replace(str(clone), '<repo>')}")
    record_property("exit", proc.returncode)
    record_property("seconds", round(seconds, 1))
    print(f"README (from {tmp_path}): {elsewhere}  -> exit {proc.returncode} in {seconds:.0f} s")
    check(proc, code, patterns, elsewhere)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in ELSEWHERE if c in FIRST])
def test_readme_command_from_another_folder(command, clone, tmp_path, record_property):
    run_from_another_folder(command, clone, tmp_path, record_property)
