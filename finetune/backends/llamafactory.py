"""llamafactory: drive the real LLaMA-Factory 0.9.5 (`llamafactory-cli train` / `export`) from the composed config.

plan() maps the config onto two LLaMA-Factory YAML files and a dataset_info.json in <run>/llamafactory/:

    train.yaml          model, stage, method (lora / LoRA+ / rsLoRA / DoRA / PiSSA, freeze, full, GaLore, BAdam),
                        data, optimisation, evaluation, precision; backend.extra.<key> last (checked against
                        LLaMA-Factory's own argument list, llamafactory_keys.py)
    dataset_info.json   one entry per data file, columns/tags read from the rows (llamafactory_data.py)
    export.yaml         LLaMA-Factory's export: merge the adapter (or re-save a full/freeze model) into merge_path

Steps: `train` (llamafactory-cli train, wrapped by recipes/llamafactory.py to record peak memory and convert
trainer_state.json into <run>/history.jsonl) and `merge` (llamafactory-cli export), when merge=true.

Known traps, handled on purpose (each is in plan.notes of the dry run):
  - CPU: `use_cpu: true` (bf16 on CPU needs it); CUDA_VISIBLE_DEVICES="" so a GPU box never relaunches the
    CLI under torchrun for a CPU run; on GPU the launcher pins CUDA_VISIBLE_DEVICES to the processes asked for
    (several visible GPUs make the CLI relaunch itself under torchrun).
  - `template` is always written; null is refused when the tokenizer has no chat template (LF would fall back
    to `empty`, which has no EOS).
  - `optim` is always written (transformers' default adamw_torch_fused breaks GaLore and BAdam ratio mode).
  - PiSSA: the merge uses `pissa_converted` (pissa_convert=true is required to merge: the FSVD init is random).
  - A reused output folder silently resumes: fresh runs write `overwrite_output_dir: true` into a folder we
    refuse to reuse; resume=true writes `overwrite_output_dir: false` so LF resumes from its last checkpoint.
Standard library + omegaconf only.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from finetune.backends import gen_eval, pref_eval
from finetune.backends.llamafactory_keys import KEYS, TEMPLATE_TOKENS, TEMPLATES
from finetune.config.derived import (
    CHECKPOINTS,
    adapter_dir,
    deepspeed_offload,
    grad_accum,
    hf_deepspeed_config,
    merged_dir,
    world_size,
)
from finetune.config.schema import LlamafactoryBackend, choices
from finetune.errors import ConfigError, one_of, suggest
from finetune.plan import Plan, Step
from finetune.recipes.llamafactory import PRELOAD  # what the worker imports: preloaded once (launchers/zygote.py)
from finetune.tracking import wants

LF_DIR = "llamafactory"
# keys this backend would ignore: refused when typed (finetune/run.py check_unused_keys)
NOT_USED = {
    "prompt_template_name": "LLaMA-Factory formats prompts with its chat template: set backend.template",
}
STAGES = choices(LlamafactoryBackend, "stage")
GALORE_OPTIMS = ("adamw_torch", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor")
EVAL_STRATEGIES = choices(LlamafactoryBackend, "eval_strategy")

# LF keys this adapter writes from our own config: set them through our keys, not backend.extra
MANAGED = {
    "model_name_or_path": "model.path",
    "adapter_name_or_path": "adapter",
    "trust_remote_code": "trust_remote_code",
    "stage": "backend.stage",
    "do_train": "(always true)",
    "finetuning_type": "method",
    "template": "backend.template",
    "dataset": "data.path or data.dataset",
    "dataset_dir": "data.path or data.dataset_dir",
    "eval_dataset": "data.eval_path or data.eval_dataset",
    "mix_strategy": "data.mix_strategy",
    "interleave_probs": "data.interleave_probs",
    "output_dir": "target_path",
    "overwrite_output_dir": "resume",
    "cutoff_len": "cutoff_len",
    "max_samples": "max_samples",
    "val_size": "val_set_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "batch_size",
    "learning_rate": "learning_rate",
    "num_train_epochs": "num_epochs",
    "max_steps": "max_steps",
    "lr_scheduler_type": "lr_scheduler_type",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "optim": "optim",
    "seed": "seed",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_strategy": "save_steps",
    "save_total_limit": "save_total_limit",
    "eval_steps": "eval_steps",
    "report_to": "report_to",
    "use_cpu": "hardware.device",
    "train_on_prompt": "train_on_inputs",
    "bf16": "hardware.precision",
    "fp16": "hardware.precision",
    "deepspeed": "hardware.deepspeed_stage",
    "disable_gradient_checkpointing": "gradient_checkpointing",
    "lora_rank": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target": "lora_target_modules",
    "additional_target": "modules_to_save",
    "eval_strategy": "backend.eval_strategy",
    "plot_loss": "backend.plot_loss",
}
# method.<key> written as is (LF uses the same names)
METHOD_KEYS = {
    "freeze": ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
    "lora": (
        "use_rslora",
        "use_dora",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "pissa_init",
        "pissa_iter",
        "pissa_convert",
        "create_new_adapter",
        "quantization_bit",
        "quantization_type",
        "double_quantization",
    ),
    "galore": (
        "use_galore",
        "galore_target",
        "galore_rank",
        "galore_update_interval",
        "galore_scale",
        "galore_proj_type",
        "galore_layerwise",
    ),
    "badam": (
        "use_badam",
        "badam_mode",
        "badam_start_block",
        "badam_switch_mode",
        "badam_switch_interval",
        "badam_update_ratio",
        "badam_mask_mode",
        "badam_verbose",
    ),
}
for _keys in METHOD_KEYS.values():
    MANAGED.update({k: f"method.{k}" for k in _keys})
MANAGED["quantization_method"] = "method=qlora (bitsandbytes)"
MANAGED.update(
    {
        k: f"backend.{k}"
        for k in (
            "preprocessing_num_workers",
            "overwrite_cache",
            "per_device_eval_batch_size",
            "ddp_timeout",
            "pref_beta",
            "pref_loss",
        )
    }
)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _csv(v) -> str:
    v = _plain(v)
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def _lf_method(cfg) -> str:
    """Which METHOD_KEYS family the method belongs to."""
    if cfg.method.uses_lora:
        return "lora"
    return {"freeze": "freeze", "galore": "galore", "badam": "badam"}.get(cfg.method.name, "full")


def _has_chat_template(model_path: Path) -> bool:
    if (model_path / "chat_template.jinja").is_file():
        return True
    tc = model_path / "tokenizer_config.json"
    try:
        return bool(json.loads(tc.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _misfit(name: str, tokens: set, bos, where: str = "the tokenizer") -> str:
    """Why template ``name`` does not fit a tokenizer with these single-id ``tokens`` and BOS, or ""."""
    needed, uses_bos = TEMPLATE_TOKENS.get(name, ((), False))
    missing = [t for t in needed if t not in tokens]
    if missing:
        return (
            f"needs the token(s) {', '.join(missing)}, which {where} lacks (LLaMA-Factory would add them without "
            "resizing the model: IndexError in training)"
        )
    if uses_bos and bos and (bos in needed or bos in TEMPLATE_TOKENS["chatml"][0]):
        return f"puts the tokenizer's BOS before the turns, and {where}'s BOS is the chat marker {bos}"
    return ""


def check_template_fits(cfg) -> None:
    """A template whose special tokens the tokenizer lacks is refused, with the templates that fit: LLaMA-Factory
    would add them as new tokens without resizing the embeddings (llama3 on SmolLM2: <|eot_id|> becomes EOS with
    id 49152 and training fails with 'IndexError: index out of range in self')."""
    from finetune.config import model_facts

    tokens = model_facts.tokenizer_tokens(cfg.model)
    if tokens is None:  # a sentencepiece-only tokenizer: not readable without it
        return
    bos = model_facts.special_token(cfg.model, "bos_token")
    folder = Path(str(cfg.model.path)).name
    why = _misfit(str(cfg.backend.template), tokens, bos, f"the tokenizer of {folder}")
    if not why:
        return
    meta = model_facts.model_config(cfg.model)
    hint = (
        " ".join(
            str(x)
            for x in (
                cfg.model.name,
                folder,
                meta.get("_name_or_path"),
                meta.get("_model_name_or_path"),
                meta.get("model_type"),
            )
            if x
        )
        .lower()
        .replace(" ", "")
    )
    fits = [n for n, (needed, _) in TEMPLATE_TOKENS.items() if needed and not _misfit(n, tokens, bos)]
    fits.sort(key=lambda n: (n not in hint, n not in ("chatml", "default"), len(n), n))
    shown = ", ".join(fits[:6]) + (", ..." if len(fits) > 6 else "")
    own = " or null (the tokenizer's own chat template)" if model_facts.has_chat_template(cfg.model) else ""
    raise ConfigError("backend.template", cfg.backend.template, f"{why}; templates that fit: {shown or 'default'}{own}")


def check_tied_embeddings(cfg) -> None:
    """LLaMA-Factory 0.9.5 passes additional_target to PEFT as modules_to_save without ensure_weight_tying: on a
    model whose embedding and output layer share one matrix it trains separate copies and the merged model comes
    out untied (peft 0.18.1); the alpacalora backend trains the shared matrix once."""
    from finetune.config import model_facts

    m = cfg.method
    if not m.uses_lora or not _plain(m.modules_to_save) or not model_facts.tied_embeddings(cfg.model):
        return
    names = model_facts.embedding_names(cfg.model)
    chosen = [
        str(x)
        for x in (
            _plain(m.modules_to_save)
            if not isinstance(_plain(m.modules_to_save), str)
            else str(m.modules_to_save).split(",")
        )
    ]
    if any(x.strip() in names for x in chosen):
        raise ConfigError(
            "modules_to_save",
            _csv(m.modules_to_save),
            f"model {cfg.model.name} ties its embedding and output layer; LLaMA-Factory 0.9.5 would "
            "train two separate copies and untie them in the merge: use modules_to_save=[] or "
            "backend=alpacalora (which trains the shared matrix once)",
        )


def _check_value(key: str, value, kind: str, choices) -> None:
    where = f"backend.extra.{key}"
    if value is None:
        return
    if kind == "choice" and str(value) not in choices:
        raise ConfigError(where, value, one_of(choices), suggest(str(value), choices))
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(where, value, "must be true or false")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(where, value, "must be an integer")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(where, value, "must be a number")
    if kind == "str" and not isinstance(value, (str, int, float)):
        raise ConfigError(where, value, "must be a string (comma-separated for lists)")


# the data formats each stage trains on (data.format is the detected one after validation)
STAGE_FORMATS = {
    "sft": ("alpaca", "sharegpt"),
    "pt": ("text", "alpaca"),
    "rm": ("preference",),
    "dpo": ("preference",),
    "kto": ("kto",),
}


def check(cfg) -> None:
    """LLaMA-Factory's own rules, checked before its 7-30 s import: stage and data, template, method, layout, and
    the backend.extra keys."""
    b = cfg.backend
    if b.stage not in STAGES:
        raise ConfigError("backend.stage", b.stage, one_of(STAGES), suggest(b.stage, STAGES))
    if cfg.data.format not in STAGE_FORMATS[b.stage]:
        fits = [s for s in STAGES if cfg.data.format in STAGE_FORMATS.get(s, ())]
        raise ConfigError(
            "data.format",
            cfg.data.format,
            f"stage {b.stage} trains on {', '.join(STAGE_FORMATS[b.stage])} data",
            f"{cfg.data.format} data trains with backend.stage={' or backend.stage='.join(fits)}" if fits else "",
        )
    if b.eval_strategy not in EVAL_STRATEGIES:
        raise ConfigError("backend.eval_strategy", b.eval_strategy, one_of(EVAL_STRATEGIES))
    check_template(cfg)
    check_tied_embeddings(cfg)
    losses = KEYS["pref_loss"][1]
    if b.pref_loss not in losses:
        raise ConfigError("backend.pref_loss", b.pref_loss, one_of(losses), suggest(b.pref_loss, losses))
    if b.preprocessing_num_workers is not None and b.preprocessing_num_workers < 1:
        raise ConfigError("backend.preprocessing_num_workers", b.preprocessing_num_workers, "must be >= 1")
    check_method_rules(cfg)
    if cfg.hardware.device == "cpu" and cfg.launcher.nnodes > 1:
        raise ConfigError("launcher.nnodes", cfg.launcher.nnodes, "multi-node LLaMA-Factory runs need GPUs")
    # data size vs held-out rows
    if float(cfg.val_set_size) == 1:
        raise ConfigError(
            "val_set_size",
            cfg.val_set_size,
            "LLaMA-Factory reads 1 as the whole set: use a fraction in (0, 1) or a row count >= 2",
        )
    check_extra(cfg)
    gen_eval.check(cfg)


def check_template(cfg) -> None:
    """backend.template: a LLaMA-Factory template name that fits the tokenizer, or null when the tokenizer has a
    chat template of its own (LLaMA-Factory would otherwise fall back to `empty`, which has no EOS)."""
    b = cfg.backend
    if b.template is None:
        tiny = cfg.model.builder and not cfg.model.builder.startswith(("smollm", "gguf"))
        if tiny:
            raise ConfigError(
                "backend.template",
                None,
                f"tiny model {cfg.model.name} has no chat template; use backend.template=default",
            )
        if not cfg.model.builder and not _has_chat_template(Path(str(cfg.model.path))):
            raise ConfigError(
                "backend.template",
                None,
                "the tokenizer has no chat template, so LLaMA-Factory would use "
                "its `empty` template (no EOS: the model never learns to stop); set backend.template="
                "default for base models, or the model's template name",
            )
    elif b.template not in TEMPLATES:
        raise ConfigError(
            "backend.template",
            b.template,
            f"not one of LLaMA-Factory's {len(TEMPLATES)} template names "
            "(listed in finetune/backends/llamafactory_keys.py)",
            suggest(b.template, TEMPLATES),
        )
    else:
        check_template_fits(cfg)


def check_method_rules(cfg) -> None:
    """Method rules LLaMA-Factory enforces only after its 7-30 s import (optimizer, PiSSA, 4-bit QLoRA on CPU)."""
    b, m, hw = cfg.backend, cfg.method, cfg.hardware
    opt = str(cfg.optim)
    if m.name == "galore" and opt not in GALORE_OPTIMS:
        raise ConfigError(
            "optim", opt, f"LLaMA-Factory's GaLore takes {', '.join(GALORE_OPTIMS)} (anything else: 'Unknown optim')"
        )
    if m.name == "badam" and opt == "adamw_torch_fused":
        raise ConfigError(
            "optim",
            opt,
            "BAdam's block optimizer does not take fused AdamW ('unexpected keyword fused'); use optim=adamw_torch",
        )
    if m.uses_lora and m.pissa_init:
        if b.stage == "kto":
            raise ConfigError("method", m.name, "LLaMA-Factory cannot use PiSSA for stage kto")
        if hw.deepspeed_stage == 3:
            raise ConfigError("hardware.deepspeed_stage", 3, "PiSSA cannot be initialised under ZeRO-3")
        if cfg.merge and not m.pissa_convert:
            raise ConfigError(
                "method.pissa_convert",
                False,
                "merging a PiSSA adapter needs pissa_convert=true (the "
                "saved adapter re-runs the randomised SVD on load, so merges would differ); or merge=false",
            )
    if (
        m.uses_lora
        and m.get("quantization_bit") == 4
        and hw.device == "cpu"
        and (float(cfg.val_set_size) > 0 or cfg.data.eval_path)
        and b.eval_strategy != "no"
    ):
        raise ConfigError(
            "method.quantization_bit",
            4,
            "4-bit QLoRA on a CPU cannot evaluate through LLaMA-Factory: "
            "bitsandbytes 0.50.2 repacks the 4-bit weights in place for its CPU inference kernel during "
            "evaluation (asserting on layers not a multiple of 32); set val_set_size=0, or use "
            "backend=alpacalora (which keeps the training kernel for evaluation)",
        )


def check_extra(cfg) -> None:
    """backend.extra: only keys llamafactory-cli accepts, with values of their type, none we already write."""
    hw = cfg.hardware
    extra = _plain(cfg.backend.extra) or {}
    if not isinstance(extra, dict):
        raise ConfigError("backend.extra", extra, "must be a mapping of LLaMA-Factory keys")
    for key, value in extra.items():
        if key in MANAGED:
            raise ConfigError(f"backend.extra.{key}", value, f"is written from {MANAGED[key]}; set that instead")
        if key not in KEYS:
            raise ConfigError(
                f"backend.extra.{key}",
                value,
                "LLaMA-Factory 0.9.5 does not accept this key (llamafactory-cli would refuse it)",
                suggest(key, KEYS),
            )
        kind, kchoices = KEYS[key]
        _check_value(key, value, kind, kchoices)
    if extra.get("flash_attn") == "fa2":
        from finetune.auto.hardware import flash_attention_unavailable

        why = flash_attention_unavailable(hw)
        if why:  # LLaMA-Factory 0.9.5 would log "FlashAttention-2 is not installed." and silently use sdpa
            raise ConfigError("backend.extra.flash_attn", "fa2", why)
    if extra.get("pure_bf16") and hw.device == "cpu":
        raise ConfigError("backend.extra.pure_bf16", True, "needs a bf16 GPU; on CPU use hardware.precision=bf16")


def _deepspeed_config(hw) -> dict:
    zero: Dict[str, Any] = {"stage": int(hw.deepspeed_stage), **deepspeed_offload(hw, pin_memory=True)}
    if int(hw.deepspeed_stage) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return hf_deepspeed_config(zero)


def train_args(cfg, run_dir: Path, ctx: dict, data: "DataSpec") -> Dict[str, Any]:
    """The LLaMA-Factory train yaml as a dict (plain values, in a readable order); data: what LLaMA-Factory reads
    (data_spec). Sections in yaml order: model and method, data, output, optimisation, evaluation, hardware;
    backend.extra last."""
    evals = data.eval_dataset
    a: Dict[str, Any] = {}
    a.update(_model_args(cfg))
    a.update(_data_args(cfg, data))
    a.update(_output_args(cfg, run_dir))
    a.update(_optim_args(cfg))
    a.update(_eval_args(cfg, evals))
    a.update(_hardware_args(cfg.hardware, Path(run_dir) / LF_DIR))
    a.update(_plain(cfg.backend.extra) or {})
    return a


def _model_args(cfg) -> Dict[str, Any]:
    """The model, the stage and the method's own keys (LoRA family, freeze, GaLore, BAdam; QLoRA through bnb)."""
    m = cfg.method
    a: Dict[str, Any] = {
        "model_name_or_path": str(Path(str(cfg.model.path)).absolute()),
        "trust_remote_code": bool(cfg.trust_remote_code),
        "stage": str(cfg.backend.stage),
        "do_train": True,
        "finetuning_type": str(m.finetuning_type),
    }
    if cfg.get("adapter"):  # a trained adapter to start from: merged into the base (create_new_adapter), or resumed
        a["adapter_name_or_path"] = str(cfg.adapter)
    fam = _lf_method(cfg)
    if fam == "lora":
        a.update(
            lora_rank=int(m.lora_r),
            lora_alpha=int(m.lora_alpha),
            lora_dropout=float(m.lora_dropout),
            lora_target=_csv(m.lora_target_modules),
        )
        if _plain(m.modules_to_save):
            a["additional_target"] = _csv(m.modules_to_save)
    for k in METHOD_KEYS.get(fam, ()):
        v = _plain(m[k])
        if v is not None:
            a[k] = v
    if fam == "lora" and not m.pissa_init:
        for k in ("pissa_iter", "pissa_convert"):
            a.pop(k, None)
    if fam == "lora" and m.get("quantization_bit"):
        a["quantization_method"] = "bnb"  # QLoRA through bitsandbytes; the export merges into the
    else:  # full-precision base (export.yaml has no quantisation)
        for k in ("quantization_bit", "quantization_type", "double_quantization"):
            a.pop(k, None)
    return a


def _data_args(cfg, data: "DataSpec") -> Dict[str, Any]:
    b, d = cfg.backend, cfg.data
    a: Dict[str, Any] = {"dataset_dir": data.dataset_dir, "dataset": ",".join(data.dataset)}
    if data.eval_dataset:
        a["eval_dataset"] = ",".join(data.eval_dataset)
    if d.mix_strategy != "concat":  # LLaMA-Factory's own mixing, passed through
        a["mix_strategy"] = str(d.mix_strategy)
        if d.interleave_probs is not None:
            probs = _plain(d.interleave_probs)
            a["interleave_probs"] = probs if isinstance(probs, str) else ",".join(str(float(p)) for p in probs)
    a["template"] = str(b.template)
    a["cutoff_len"] = int(cfg.cutoff_len)
    a["train_on_prompt"] = bool(cfg.train_on_inputs)
    if cfg.max_samples is not None and not data.sampled:  # sampled rows: max_samples was applied when drawing them
        a["max_samples"] = int(cfg.max_samples)
    a["overwrite_cache"] = bool(b.overwrite_cache)
    a["preprocessing_num_workers"] = int(b.preprocessing_num_workers)
    return a


def _output_args(cfg, run_dir: Path) -> Dict[str, Any]:
    a: Dict[str, Any] = {
        "output_dir": str(Path(run_dir) / CHECKPOINTS),  # checkpoints; the train step moves the result to target_path
        "overwrite_output_dir": not bool(cfg.resume),
        "logging_steps": int(cfg.logging_steps),
    }
    if int(cfg.save_steps) > 0:
        a.update(save_strategy="steps", save_steps=int(cfg.save_steps), save_total_limit=int(cfg.save_total_limit))
    else:
        a["save_strategy"] = "no"
    a["plot_loss"] = bool(cfg.backend.plot_loss)
    a["report_to"] = "none"  # metrics.json, loss.png, tensorboard/ and MLflow / W&B (the driver) come from history
    a["include_num_input_tokens_seen"] = "non_padding"
    return a


def _optim_args(cfg) -> Dict[str, Any]:
    b = cfg.backend
    a: Dict[str, Any] = {
        "per_device_train_batch_size": int(cfg.micro_batch_size),
        "gradient_accumulation_steps": grad_accum(cfg),
        "learning_rate": float(cfg.learning_rate),
        "num_train_epochs": float(cfg.num_epochs),
    }
    if int(cfg.max_steps) > 0:
        a["max_steps"] = int(cfg.max_steps)
    a.update(
        lr_scheduler_type=str(cfg.lr_scheduler_type),
        warmup_ratio=float(cfg.warmup_ratio),
        weight_decay=float(cfg.weight_decay),
        max_grad_norm=float(cfg.max_grad_norm),
        optim=str(cfg.optim),
        seed=int(cfg.seed),
        disable_gradient_checkpointing=not bool(cfg.gradient_checkpointing),
        ddp_timeout=int(b.ddp_timeout),
    )
    if b.stage in ("dpo", "kto"):
        a["pref_beta"] = float(b.pref_beta)
        if b.stage == "dpo":
            a["pref_loss"] = str(b.pref_loss)
    return a


def _eval_args(cfg, evals: list) -> Dict[str, Any]:
    """An eval set (data.eval_path) or a held-out share (val_set_size), unless backend.eval_strategy=no."""
    b, a = cfg.backend, {}
    vs = float(cfg.val_set_size)
    if evals or (vs > 0 and b.eval_strategy != "no"):
        if not evals:
            a["val_size"] = int(vs) if vs > 1 else vs
        a["per_device_eval_batch_size"] = int(b.per_device_eval_batch_size)
        if b.eval_strategy == "steps" and int(cfg.eval_steps) > 0:
            a.update(eval_strategy="steps", eval_steps=int(cfg.eval_steps))
        else:
            a["eval_strategy"] = "epoch" if b.eval_strategy != "no" else "no"
    return a


def _hardware_args(hw, lf: Path) -> Dict[str, Any]:
    a: Dict[str, Any] = {}
    if hw.precision == "bf16":
        a["bf16"] = True
    elif hw.precision == "fp16":
        a["fp16"] = True
    if hw.deepspeed_stage is not None:
        a["deepspeed"] = str(lf / "ds_config.json")
    elif hw.device == "cpu":
        a["use_cpu"] = True
    return a


@dataclass
class DataSpec:
    """What LLaMA-Factory reads: its dataset_dir and dataset names, and the dataset_info.json we write (None: the
    user's own folder, read unchanged)."""

    dataset_dir: str
    dataset: List[str]
    eval_dataset: List[str] = field(default_factory=list)
    info: Optional[Dict[str, dict]] = None  # written to <run>/llamafactory/dataset_info.json
    sampled: Optional[str] = None  # the folder the train step writes the sampled rows to (sources.write_sampled)


def data_spec(cfg, ctx: dict, lf: Path) -> DataSpec:
    """Our data files: a dataset_info.json built from their rows (llamafactory_data.py). Datasets of a
    dataset_info.json (data=llamafactory): LLaMA-Factory reads the user's folder unchanged, unless rows are sampled
    (data.mix, or an entry's num_samples): then the train step writes the sampled rows to <run>/llamafactory/data/
    and our dataset_info.json gives them the user's columns and tags, so LLaMA-Factory trains on exactly the rows
    and counts of the manifest's composition (and the evaluation steps know the held-out rows)."""
    from finetune import sources

    if sources.registry(cfg.data):
        data = OmegaConf.to_container(cfg.data, resolve=True)
        train, held = sources.names(data)
        if not ctx.data.get("sampled"):
            return DataSpec(str(cfg.data.dataset_dir), train, [held] if held else [])
        from finetune.lfdata import read_info

        user = read_info(cfg.data.dataset_dir)
        folder = lf / "data"
        info = {
            n: {
                **{k: v for k, v in user[n].items() if k not in ("file_name", "num_samples")},
                "file_name": str(folder / f"{n}.jsonl"),
            }
            for n in train + ([held] if held else [])
        }
        return DataSpec(str(lf), train, [held] if held else [], info, sampled=str(folder))
    from finetune.backends.llamafactory_data import dataset_info

    fmt = ctx.data.get("format") or str(cfg.data.format)
    info = dataset_info(str(cfg.data.path), fmt, "train")
    if cfg.data.eval_path:
        info.update(dataset_info(str(cfg.data.eval_path), fmt, "eval", key="data.eval_path"))
    return DataSpec(
        str(lf), [n for n in info if n.startswith("train")], [n for n in info if n.startswith("eval")], info
    )


def export_args(cfg, run_dir: Path) -> Dict[str, Any]:
    out = adapter_dir(cfg, run_dir)
    m = cfg.method
    a: Dict[str, Any] = {
        "model_name_or_path": str(Path(str(cfg.model.path)).absolute()),
        "trust_remote_code": bool(cfg.trust_remote_code),
        "template": str(cfg.backend.template),
    }
    if m.uses_lora:
        adapter = str(out / "pissa_converted" if m.pissa_init else out)
        a.update(adapter_name_or_path=",".join(adapter_chain(cfg, adapter)), finetuning_type="lora")
    else:  # full / freeze / GaLore / BAdam: the trained folder is the model
        a.update(model_name_or_path=str(out), finetuning_type="full")
    a.update(export_dir=str(merged_dir(cfg, run_dir)), export_size=5, export_device="cpu", export_legacy_format=False)
    return a


def adapter_chain(cfg, trained: str) -> List[str]:
    """The adapters that make the trained model, in order: the one the run started from (adapter=, merged into the
    base before training) and the trained one; a resumed start adapter (create_new_adapter=false) is the trained
    one."""
    start = cfg.get("adapter")
    return [str(start), trained] if start and cfg.method.create_new_adapter else [trained]


def _yaml(d: dict, title: str) -> str:
    return f"# {title} (written by finetune; run it with llamafactory-cli)\n" + OmegaConf.to_yaml(OmegaConf.create(d))


def cli(command: str, yaml: Path) -> list:
    """`llamafactory-cli <command> <yaml>`, run as `python -m llamafactory.cli` with this interpreter: the same entry
    point as the console script, without trusting the script's shebang (a relocated venv keeps the old path). A
    train goes through finetune.recipes.llamafactory_cli: LLaMA-Factory's run_exp with our checkpoint markers and
    pause callbacks (a distributed one is handed to LLaMA-Factory's CLI unchanged)."""
    module = "finetune.recipes.llamafactory_cli" if command == "train" else "llamafactory.cli"
    return [sys.executable, "-m", module, command, str(yaml)]


def plan(cfg, run_dir, ctx) -> Plan:
    """The files LLaMA-Factory reads (train.yaml, dataset_info.json) and the steps in the order they run (train, then
    the export that merges the adapter, with the evaluation by generation around them when asked). Longer than 80
    lines on purpose: it reads as the run's script; each Step literal spreads over several lines once formatted."""
    run_dir = Path(run_dir)
    lf = run_dir / LF_DIR
    data = data_spec(cfg, ctx, lf)
    targs = train_args(cfg, run_dir, ctx, data)
    files = {f"{LF_DIR}/train.yaml": _yaml(targs, "LLaMA-Factory train config")}
    if data.info is not None:
        files[f"{LF_DIR}/dataset_info.json"] = json.dumps(data.info, indent=2) + "\n"
    if cfg.hardware.deepspeed_stage is not None:
        files[f"{LF_DIR}/ds_config.json"] = json.dumps(_deepspeed_config(cfg.hardware), indent=2) + "\n"
    env = {"HF_HUB_OFFLINE": "1"}
    if cfg.hardware.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # never relaunch under torchrun for GPUs a CPU run does not use
    if cfg.hardware.deepspeed_stage is not None:
        # LLaMA-Factory 0.9.5 refuses DeepSpeed outside a distributed launch ("Please use `FORCE_TORCHRUN=1` to
        # launch DeepSpeed training.", hparams/parser.py), also for one process on one GPU
        env["FORCE_TORCHRUN"] = "1"
    out = adapter_dir(cfg, run_dir)
    ckpts = run_dir / CHECKPOINTS
    train_cmd = cli("train", lf / "train.yaml")
    steps = [
        Step(
            name="train",
            distributed="env",
            env=env,
            preload=PRELOAD,
            pausable=world_size(cfg) == 1,  # our callbacks are in a single-process run only
            progress=str(ckpts / "trainer_log.jsonl"),
            argv=[
                sys.executable,
                "-m",
                "finetune.recipes.llamafactory",
                "--run-dir",
                str(run_dir),
                "--output-dir",
                str(ckpts),
                "--artefact",
                str(out),
                "--device",
                str(cfg.hardware.device),
                *(["--write-data", data.sampled] if data.sampled else []),
                *(["--interleave", json.dumps(_interleave(cfg, ctx))] if cfg.data.mix_strategy != "concat" else []),
                "--",
                *train_cmd,
            ],
        )
    ]
    outputs = {"lf_output": str(out), ("adapter" if cfg.method.uses_lora else "model"): str(out)}
    notes = [
        f"stage {cfg.backend.stage}, finetuning_type {targs['finetuning_type']}, template {targs['template']}, "
        f"optim {targs['optim']} (always written: transformers' default adamw_torch_fused breaks GaLore/BAdam)",
        "overwrite_output_dir: "
        + (
            "false (resume=true: LLaMA-Factory resumes from the last checkpoint)"
            if cfg.resume
            else "true, in a fresh folder (a reused one silently resumes)"
        ),
        "report_to: none in LLaMA-Factory; metrics.json, loss.png and tensorboard/ are built from history.jsonl"
        + (
            "; MLflow / W&B runs are logged by the driver from it, as for every backend"
            if wants(cfg.report_to, "mlflow") or wants(cfg.report_to, "wandb")
            else ""
        ),
    ]
    if cfg.hardware.device == "cpu":
        notes.append(
            "CPU: use_cpu=true and CUDA_VISIBLE_DEVICES='' (several visible GPUs make the CLI relaunch "
            "itself under torchrun)"
        )
    if cfg.data.eval_path:
        notes.append("data.eval_path is the eval set: val_set_size is not used")
    notes += _data_notes(cfg, ctx, data)
    if cfg.merge:
        eargs = export_args(cfg, run_dir)
        files[f"{LF_DIR}/export.yaml"] = _yaml(eargs, "LLaMA-Factory export (merge) config")
        steps.append(
            Step(
                name="merge",
                env=dict(env, FORCE_TORCHRUN="0"),
                rank0_only=True,
                argv=cli("export", lf / "export.yaml"),
                preload=PRELOAD,
            )
        )
        outputs["merged"] = eargs["export_dir"]
        if cfg.method.uses_lora and cfg.method.pissa_init:
            notes.append("PiSSA: merging pissa_converted/ (a plain LoRA delta on the original model)")
    start = [str(cfg.adapter)] if cfg.get("adapter") else []  # what the evaluations before training load
    if cfg.merge:
        after, adapters = outputs["merged"], []
    elif cfg.method.uses_lora:
        after = str(Path(str(cfg.model.path)).absolute())
        adapters = adapter_chain(cfg, str(out / "pissa_converted" if cfg.method.pissa_init else out))
    else:
        after, adapters = str(out), []
    first, last = gen_eval.steps(cfg, run_dir, after, adapter=",".join(adapters) or None, before_adapter=start)
    pfirst, plast = pref_eval.steps(cfg, run_dir, after, adapters=adapters, before_adapters=start)
    first, last = first + pfirst, plast + last
    notes += gen_eval.note(cfg) + pref_eval.note(cfg)
    if cfg.get("adapter"):
        notes.append(
            f"starts from the adapter {cfg.adapter}: "
            + (
                "merged into the base, a new adapter trains on top (the preference reference model is the base with it)"
                if cfg.method.create_new_adapter
                else "LLaMA-Factory goes on training it (create_new_adapter=false)"
            )
        )
    return Plan(backend="llamafactory", steps=first + steps + last, files=files, outputs=outputs, notes=notes)


def _interleave(cfg, ctx: dict) -> dict:
    """What the train step needs to count the rows per dataset LLaMA-Factory's interleaving draws: the datasets'
    sizes (after max_samples), the probabilities, the seed and the stopping strategy."""
    facts = ctx.data
    probs = _plain(cfg.data.interleave_probs)
    if isinstance(probs, str):
        probs = [float(x) for x in probs.split(",")]
    return {
        "sizes": facts.get("composition") or {},
        "probabilities": probs,
        "seed": int(cfg.seed),
        "strategy": str(cfg.data.mix_strategy),
    }


def _data_notes(cfg, ctx: dict, data: DataSpec) -> List[str]:
    facts = ctx.data
    if "composition" not in facts:
        return []
    from finetune.sources import describe

    if data.info is None:
        note = f"data: LLaMA-Factory reads {data.dataset_dir}/dataset_info.json unchanged ({', '.join(data.dataset)})"
    else:
        note = (
            f"data: the sampled rows ({describe(facts['composition'])}, seed {int(cfg.seed)}) are written to "
            f"{data.sampled} by the train step; dataset_info.json gives them the entries' columns and tags"
        )
    if cfg.data.mix_strategy != "concat":
        note += f"; mix_strategy {cfg.data.mix_strategy} (LLaMA-Factory draws the rows; the train step counts them)"
    if data.eval_dataset:
        note += f"; {data.eval_dataset[0]} is the eval set (val_set_size is not used)"
    return [note]


_PARAMS = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(cfg, run_dir, ctx) -> dict:
    run_dir = Path(run_dir)
    out = adapter_dir(cfg, run_dir)
    metrics: Dict[str, Any] = {}
    from finetune.history import read_history

    rows = read_history(run_dir)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    res = _read_json(out / "all_results.json") or {}
    absent = []
    if losses:
        metrics.update(first_train_loss=losses[0], train_loss=losses[-1])
    else:
        # a short run (max_steps < logging_steps) logs no per-step loss: it trained all the same; report what
        # LLaMA-Factory did log (its mean training loss over the run) and say what is missing
        steps = (_read_json(out / "trainer_state.json") or {}).get("global_step")
        absent.append(
            f"no per-step training loss was logged (logging_steps={int(cfg.logging_steps)}, "
            f"{steps if steps is not None else '?'} steps run): train_loss is LLaMA-Factory's mean over the "
            "run, and there is no loss curve; set logging_steps lower to get one"
        )
        if "train_loss" in res:
            metrics["train_loss"] = res["train_loss"]
    if "eval_loss" in res:
        metrics["eval_loss"] = res["eval_loss"]
    elif evals:
        metrics["eval_loss"] = evals[-1]
    if "train_loss" in res:
        metrics["train_loss_avg"] = res["train_loss"]  # LF's mean over all steps
    if "train_runtime" in res:
        metrics["train_runtime_s"] = res["train_runtime"]
    for k in ("eval_rewards/accuracies", "rewards/accuracies", "eval_accuracy"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            metrics[k.replace("/", "_")] = vals[-1]
    tokens = _read_json(run_dir / LF_DIR / "worker.json") or {}
    if tokens.get("composition"):  # LLaMA-Factory's interleaving: the rows per dataset it drew
        metrics["data_composition"] = tokens["composition"]
    for k in ("peak_rss_mb", "tokens_per_s", "total_tokens", "wall_s"):
        if tokens.get(k) is not None:
            metrics[k if k != "wall_s" else "train_wall_s"] = tokens[k]
    log = run_dir / "logs" / "train.log"
    try:
        found = _PARAMS.findall(log.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        found = []
    if found:
        metrics["trainable_params"] = int(found[-1][0].replace(",", ""))
        metrics["total_params"] = int(found[-1][1].replace(",", ""))
    if absent:
        metrics["absent"] = absent
    metrics["lf_output"] = str(out)
    merged = merged_dir(cfg, run_dir)
    if cfg.merge and (merged / "config.json").exists():
        metrics["merged_path"] = str(merged)
    return metrics
