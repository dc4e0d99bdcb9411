"""collie: Collie (collie-lm 1.0.7, OpenMOSS) in its own virtual environment, dp/tp/pp, runnable on CPU.

Collie needs transformers <= 4.50, protobuf 3.20.1 and megatron-core 0.2.0, so it lives in .venv-collie
(``bash scripts/setup_collie_env.sh`` or ``finetune setup-collie``; pinned in requirements-collie.lock).
The plan has three steps:

  1. collie_prepare  (Collie's python)  a ``.bin`` copy of a safetensors-only model (Collie reads only *.bin)
  2. collie_train    (Collie's python, torchrun when world size > 1)  finetune.recipes.collie: Collie's
                     model class + Trainer; for hardware.device=cpu the six CPU patches (finetune/compat/collie.py) are
                     applied
  3. collie_merge    (this environment)  adapter + base -> logits must equal Collie's own; merge_and_unload
                     -> lazyllm_merge (full fine-tuning: the saved model is checked the same way)

Standard library + omegaconf only at import.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from finetune.backends import gen_eval
from finetune.config.derived import adapter_dir, grad_accum, merged_dir, world_size
from finetune.config.resolvers import REPO_ROOT
from finetune.errors import ConfigError, one_of
from finetune.history import read_history
from finetune.plan import Plan, Step
from finetune.run_files import HISTORY, RESOLVED_CONFIG
from finetune.tool_envs import cannot_build_env

SETUP_CMD = "bash scripts/setup_collie_env.sh (or: finetune setup-collie)"
LOCK = REPO_ROOT / "requirements-collie.lock"  # CPU runs
CUDA_LOCK = REPO_ROOT / "requirements-collie-cuda.lock"  # GPU runs: + the CUDA runtime PyPI's torch build needs


def lock_file(cfg) -> Path:
    return CUDA_LOCK if cfg.hardware.device == "cuda" else LOCK


# model.family values the adapter supports: Collie also has InternLM2/ChatGLM2 classes, but their weight layouts
# (fused wqkv, ...) need their own export conversion, which is written and verified for Llama only
FAMILIES = ("llama",)
# keys this backend would ignore: refused when typed (finetune/run.py check_unused_keys)
NOT_USED = {
    "preference_eval": "the preference evaluation scores preference stages: backend=llamafactory backend.stage=dpo",
    "preference_eval_rows": "the preference evaluation scores preference stages: backend=llamafactory",
    "adapter": "starting from a trained adapter runs on backend=llamafactory (its adapter_name_or_path)",
    "eval_steps": "the collie backend evaluates the held-out rows once per epoch",
    "save_steps": "the collie backend saves the final adapter/model only (no intermediate checkpoints)",
    "save_total_limit": "the collie backend saves the final adapter/model only (no intermediate checkpoints)",
    "method.use_rslora": "Collie's PEFT set-up is plain LoRA (method=lora)",
    "method.use_dora": "Collie's PEFT set-up is plain LoRA (method=lora)",
    "method.loraplus_lr_ratio": "Collie's PEFT set-up is plain LoRA (method=lora)",
    "method.pissa_init": "Collie's PEFT set-up is plain LoRA (method=lora)",
    "method.create_new_adapter": "Collie trains one adapter on the base model",
}
PROMPT_TEMPLATES = ("alpaca", "alpaca_short")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


def venv_dir(cfg) -> Path:
    p = Path(str(cfg.backend.venv)).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def venv_python(cfg) -> Path:
    # through the venv's real folder (.venv-collie is a link into ~/.cache/finetune): DeepSpeed's JIT build
    # records the include paths it saw, so a clone elsewhere must see the same ones to reuse the build
    return venv_dir(cfg).resolve() / "bin" / "python"


def venv_ready(cfg) -> bool:
    """Does Collie's environment exist, complete and matching requirements-collie.lock?"""
    stamp = venv_dir(cfg) / ".finetune-lock.sha256"
    return (
        venv_python(cfg).exists()
        and stamp.is_file()
        and stamp.read_text().strip() == hashlib.sha256(lock_file(cfg).read_bytes()).hexdigest()
    )


def check_venv(cfg) -> None:
    """A missing or outdated environment is built by the run's first step (setup_collie); refused only when it
    cannot be built here."""
    if venv_ready(cfg):
        return
    why = cannot_build_env()
    if why:
        raise ConfigError(
            "backend.venv",
            str(venv_dir(cfg)),
            f"Collie's environment is missing or outdated and "
            f"cannot be built here: {why}; build it where it can be: {SETUP_CMD}",
        )


def check(cfg) -> None:
    b, meth = cfg.backend, cfg.method
    if cfg.data.get("eval_dataset"):
        raise ConfigError(
            "data.eval_dataset",
            cfg.data.eval_dataset,
            "Collie holds out val_set_size rows of its training data; hold a dataset out on backend=alpacalora or "
            "llamafactory",
        )
    dp, tp, pp = int(b.dp_size), int(b.tp_size), int(b.pp_size)
    ws = world_size(cfg)
    if dp * tp * pp != ws:
        raise ConfigError(
            "backend.dp_size",
            dp,
            f"dp_size x tp_size x pp_size = {dp} x {tp} x {pp} = {dp * tp * pp} "
            f"must equal the launcher's world size {ws} (launcher.nproc_per_node "
            f"{cfg.launcher.nproc_per_node} x launcher.nnodes {cfg.launcher.nnodes})",
        )
    for key, v in (("backend.dp_size", dp), ("backend.tp_size", tp), ("backend.pp_size", pp)):
        if v < 1:
            raise ConfigError(key, v, "must be >= 1")
    if meth.uses_lora and tp > 1:
        raise ConfigError(
            "backend.tp_size",
            tp,
            "Collie's tensor parallelism does not support LoRA "
            "(collie/config.py valid_config); use tp_size=1, or method=full",
        )
    if pp > 1:
        # seen here with method=full: Collie's ColliePipelineEngine calls DeepSpeed PipelineEngine internals that
        # 0.19.8 no longer has (dynamic_shape, mem_status, _allocate_buffers); with LoRA DeepSpeed asserts
        # "model must base PipelineModule" on Collie's PeftModel. Collie 1.0.7 predates them (2024-04).
        raise ConfigError(
            "backend.pp_size",
            pp,
            "Collie 1.0.7's pipeline engine does not run with the pinned DeepSpeed "
            "0.19.8 (private PipelineEngine API it calls is gone); use pp_size=1 with dp_size/tp_size",
        )
    if cfg.resume:
        raise ConfigError(
            "resume",
            True,
            "the collie backend does not resume a run (Collie's checkpoints are not "
            "wired in, so it would train again from step 0 into the same folder); start a new run",
        )
    if cfg.model.family not in FAMILIES:
        raise ConfigError(
            "model.family",
            cfg.model.family,
            f"the collie backend supports {', '.join(FAMILIES)} "
            "(Collie's adapter/weight layout conversion is verified for Llama only)",
        )
    if cfg.max_steps != -1:
        raise ConfigError("max_steps", cfg.max_steps, "Collie trains whole epochs; use num_epochs (max_steps=-1)")
    if float(cfg.num_epochs) != int(cfg.num_epochs):
        raise ConfigError("num_epochs", cfg.num_epochs, "Collie trains whole epochs: must be an integer")
    if cfg.prompt_template_name not in PROMPT_TEMPLATES:
        raise ConfigError("prompt_template_name", cfg.prompt_template_name, one_of(PROMPT_TEMPLATES))
    if cfg.lr_scheduler_type not in SCHEDULERS:
        raise ConfigError(
            "lr_scheduler_type", cfg.lr_scheduler_type, f"the collie backend implements {one_of(SCHEDULERS)}"
        )
    if cfg.optim not in OPTIMS:
        raise ConfigError("optim", cfg.optim, f"the collie backend uses torch AdamW: {one_of(OPTIMS)}")
    _check_model_shape(cfg, tp, pp)
    _check_model_fits_collie(cfg)
    gen_eval.check(cfg)
    check_venv(cfg)


def _check_model_fits_collie(cfg) -> None:
    """Collie 1.0.7's Llama hard-codes rope base 10000 without scaling (collie/models/llama/model.py) and keeps a
    separate lm_head: a model with another rope base, or with tied embeddings, would be trained as a different
    model (refused here rather than after Collie's environment is built; collie_prepare checks the rope again)."""
    from finetune.config import model_facts

    theta, rope_type, scaling = model_facts.rope(cfg.model)
    if theta != 10000.0 or rope_type != "default" or scaling:
        raise ConfigError(
            "model",
            cfg.model.name,
            f"uses rope_theta {theta:g} ({rope_type}"
            f"{', scaling' if scaling else ''}); Collie 1.0.7's Llama hard-codes rope base 10000 without "
            "scaling and would train a different model: use backend=alpacalora or backend=llamafactory",
        )
    if model_facts.tied_embeddings(cfg.model):
        raise ConfigError(
            "model",
            cfg.model.name,
            "ties its embedding and output layer; Collie 1.0.7's Llama keeps a "
            "separate lm_head (it would start untrained): use backend=alpacalora or backend=llamafactory",
        )


def _check_model_shape(cfg, tp: int, pp: int) -> None:
    from finetune.config.model_facts import model_config

    meta = model_config(cfg.model)  # config.json, or the builder's plan of a model built on first use
    heads = int(meta.get("num_attention_heads") or 0)
    kv = int(meta.get("num_key_value_heads") or heads)
    if tp > 1 and heads and (heads % tp or kv % tp):
        raise ConfigError(
            "backend.tp_size", tp, f"must divide the model's attention heads ({heads}) and key/value heads ({kv})"
        )


def outputs(cfg, run_dir: Path) -> dict:
    out = {}
    if cfg.method.uses_lora:
        out["adapter"] = str(adapter_dir(cfg, run_dir))
    if cfg.merge or not cfg.method.uses_lora:
        out["merged"] = str(merged_dir(cfg, run_dir))
    return out


def plan(cfg, run_dir: Path, ctx: dict) -> Plan:
    rc = str(Path(run_dir) / RESOLVED_CONFIG)
    py = str(venv_python(cfg))
    # DeepSpeed JIT-builds its CPU comm op once per environment: keep Collie's build apart from the main env's
    # (same op name, other torch), or each environment would rebuild it after the other one ran
    env = {
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": str(venv_dir(cfg).resolve() / "torch_extensions"),
    }
    if cfg.hardware.device == "cpu":
        # a CPU run on a GPU machine stays on the CPU: DeepSpeed picks its accelerator from torch.cuda otherwise
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    dp, tp, pp = int(cfg.backend.dp_size), int(cfg.backend.tp_size), int(cfg.backend.pp_size)
    accum = grad_accum(cfg, data_parallel=dp)
    # paths as the user typed them are relative to this process's folder; the steps run in the run folder
    out = outputs(cfg, run_dir)
    paths = [
        "--config",
        rc,
        "--model",
        str(Path(str(cfg.model.path)).absolute()),
        "--data",
        str(Path(str(cfg.data.path)).absolute()) if cfg.data.path else "",  # "": datasets of a dataset_info.json
        "--target",
        str(adapter_dir(cfg, run_dir)),
        "--merge",
        str(merged_dir(cfg, run_dir)),
    ]
    steps = (
        []
        if venv_ready(cfg)
        else [
            Step(
                name="setup_collie",
                argv=[
                    "bash",
                    str(REPO_ROOT / "scripts" / "setup_collie_env.sh"),
                    *(["--cuda"] if cfg.hardware.device == "cuda" else []),
                ],
                env={"FINETUNE_COLLIE_VENV": str(venv_dir(cfg))},
            )
        ]
    )
    steps += [
        Step(name="collie_prepare", argv=[py, "-m", "finetune.recipes.collie", "prepare", *paths], env=env),
        Step(
            name="collie_train",
            argv=[py, "-m", "finetune.recipes.collie", "train", *paths],
            env=env,
            distributed="torchrun",
            progress=HISTORY,
        ),
        Step(name="collie_merge", argv=[sys.executable, "-m", "finetune.recipes.collie_merge", *paths], preload=[]),
    ]
    notes = [
        f"Collie runs in its own environment: {venv_dir(cfg)}"
        + (
            ""
            if venv_ready(cfg)
            else " (missing or outdated: the setup_collie step builds it first, "
            "a few minutes and about 1.7 GB, once per machine)"
        ),
        f"dp={dp} tp={tp} pp={pp}; global batch {cfg.batch_size} = micro_batch_size {cfg.micro_batch_size} x "
        f"dp {dp} x gradient accumulation {accum}",
        "hardware.device=cpu: the worker applies six CPU patches before importing collie "
        "(gloo, no .cuda(), the loss all-reduce on the detached loss); "
        "hardware.device=cuda: none, and the job must see a GPU",
        "safetensors-only models get a .bin copy in <run>/collie_base (Collie's loader reads only *.bin)",
    ]
    if cfg.method.uses_lora:
        notes.append(
            "the adapter is exported in Hugging Face layout (Collie permutes q/k rows at load); "
            "collie_merge checks base+adapter and merged logits against Collie's own"
        )
    if "merged" in out:
        first, last = gen_eval.steps(cfg, run_dir, out["merged"])
    else:
        first, last = gen_eval.steps(cfg, run_dir, str(Path(str(cfg.model.path)).absolute()), adapter=out["adapter"])
    notes += gen_eval.note(cfg)
    return Plan(backend="collie", steps=first + steps + last, outputs=out, notes=notes)


def collect(cfg, run_dir: Path, ctx: dict) -> dict:
    run_dir = Path(run_dir)
    summary_file = run_dir / "collie_summary.json"
    if not summary_file.exists():
        raise RuntimeError(f"the Collie worker wrote no {summary_file.name}")
    s = json.loads(summary_file.read_text())
    hist = read_history(run_dir)
    losses = [r["loss"] for r in hist if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in hist if r.get("eval_loss") is not None]
    m = {
        "train_loss": losses[-1] if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "eval_loss": evals[-1] if evals else None,
    }
    for k in (
        "total_params",
        "trainable_params",
        "tokens_per_s",
        "target_tokens_per_s",
        "peak_rss_mb",
        "train_runtime_s",
        "optimizer_steps",
        "gradient_accumulation_steps",
        "dp_size",
        "tp_size",
        "pp_size",
        "train_rows",
        "eval_rows",
    ):
        m[k] = s.get(k)
    m["collie_cpu_patches"] = len(s.get("cpu_patches") or [])
    check = run_dir / "merge_check.json"
    if check.exists():
        for k, v in json.loads(check.read_text()).items():
            if k.endswith("_vs_collie") or k.endswith("_vs_adapter"):
                m[f"logits_maxdiff_{k}"] = v
    return m
