"""The README, as a new user meets it: every command of its code blocks runs as typed, in order, in a fresh clone
of this repository, with the user's environment (no FINETUNE_* variables), from the clone's root, and the main
ones again from another working folder. Each must give the exit code and the output the README documents.

- ``bash scripts/setup.sh && .venv/bin/python train.py`` runs first (the README's first command), then every
  other command with the environment activated (``source .venv/bin/activate``), in README order.
- Placeholders are what a user fills in from what came before: ``<repo>`` the clone, ``outputs/runs/<date>/<time>-
  <name>`` the newest run folder, ``outputs/multiruns/<date>/<time>`` the newest sweep folder, ``<mlflow run id>``
  the newest run logged to MLflow.
- ``finetune mlflow-server start`` leaves a real MLflow server running for the commands after it, as for a user;
  ``finetune mlflow-server stop`` ends it (and the clone fixture stops it whatever happens).
- ``$ command`` lines of a block are refusals: exit code 2 and exactly the line the README shows.
- ``bash scripts/test.sh`` is the command that runs this test (CI runs it): it is the one command not run here.

EXPECT lists every command with what it must print; a README command missing from it (or an entry whose command
left the README) fails the test, so README and test move together.
"""

from __future__ import annotations

import json
import re
import shlex
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
    "python train.py dry_run=true": (0, [r"steps:\n  1\. train", r"dry run: nothing was written"], 120),
    "python train.py method=dora lora_r=16 num_epochs=1": (0, [r"dora=True", COMPLETED], 600),
    "python train.py method=pissa": (0, [r"PiSSA conversion: kept the trained", COMPLETED], 600),
    "python train.py experiment=alpaca_lora": (0, [COMPLETED], 600),
    "python train.py experiment=llamafactory_lora_sft": (0, [r"llamafactory-cli|llamafactory\.cli", COMPLETED], 600),
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


# what a command left behind, checked after it (the README runs are the suite's real sweeps, replays and the
# real model's run)
AFTER = {
    "python train.py backend=collie lora_r=16": _collie_lora,
    "python train.py experiment=smollm2_lora": _smollm2_learned,
    'finetune generate outputs/runs/<date>/<time>-<name> --prompt "Copy the words." --input "red rice"': (
        _generate_gives_the_evaluated_answers
    ),
    "finetune chat outputs/runs/<date>/<time>-<name>": _chat_in_a_terminal,
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


def readme_blocks():
    """(commands, refusals): shell lines of the ``bash`` blocks (comments and blank lines dropped), and the
    ``$ command`` / expected line pairs of the plain blocks."""
    text = README.read_text(encoding="utf-8")
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


COMMANDS, REFUSALS = readme_blocks()
FIRST, SECOND = split_commands()


def test_every_readme_command_has_an_expectation():
    assert set(COMMANDS) - set(EXPECT) - set(NOT_RUN) == set(), "README commands this test does not know"
    assert set(EXPECT) - set(COMMANDS) == set(), "expectations for commands that left the README"
    assert COMMANDS[0] == "bash scripts/setup.sh && .venv/bin/python train.py"
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
