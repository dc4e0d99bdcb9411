"""auto: choose backend and parameters from the model's config.json, context length, batch, LoRA rank and the
hardware, then hand over to the chosen backend. Standard library + omegaconf only.

    python train.py backend=auto [method=auto] [hardware=auto|a100_80g_x8|cpu|...] [explain=true] [dry_run=true]

check(cfg)   estimates every combination (finetune/auto/planner.py), refuses with the numbers when nothing fits,
             and otherwise WRITES THE CHOICE INTO THE CONFIG: cfg.backend becomes the chosen backend's config (its
             schema + conf/backend/<name>.yaml, with its top-level defaults for keys the user did not type),
             cfg.method the chosen method (method=auto), and micro_batch_size, gradient_checkpointing,
             hardware.deepspeed_stage / offload, launcher.nproc_per_node (and Collie's dp/tp) the chosen values.
             The record goes to cfg.auto_choice (so into config.yaml, resolved_config.json and the manifest),
             with `overrides` that pin the choice for a reproduction that must not re-decide. Then the cross-field
             rules and the chosen backend's own check run again on the concrete config.
plan/collect delegate to the chosen backend; plan adds the decision to the plan's notes and ctx.auto_choice.
explain=true prints the estimate of the best plan per backend/method and the reason for the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.config.overrides import typed_keys
from finetune.config.schema import AutoBackend, choices
from finetune.errors import ConfigError

NOT_USED: dict = {}  # every root key means something here (the chosen backend's rules apply: finetune/run.py)


CONF = Path(__file__).resolve().parents[2] / "conf"
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save")


def _typed_keys() -> List[str]:
    """Keys the user typed on the command line (Hydra overrides), without group choices' values."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not under Hydra (tests calling check() directly)
        return []
    return typed_keys(overrides)


def _yaml(group: str, name: str) -> DictConfig:
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(group, name, f"no {path}")
    return OmegaConf.load(path)


def _schema_of(y: DictConfig, group: str) -> str:
    for d in y.get("defaults", []) or []:
        if isinstance(d, str) and d.startswith(f"/schema/{group}/"):
            return d.split("/")[3].split("@")[0]
    raise ConfigError(group, "?", f"conf/{group} option has no /schema/{group}/... defaults entry")


def group_node(group: str, name: str) -> DictConfig:
    """The composed node of one group option, as Hydra would build it: schema dataclass + the option's YAML."""
    from finetune.config.schema import SCHEMAS

    y = _yaml(group, name)
    schema = SCHEMAS[group][_schema_of(y, group)]
    body = y.get(group) if group == "backend" else y
    body = OmegaConf.masked_copy(body, [k for k in body.keys() if k != "defaults"]) if body is not None else {}
    return OmegaConf.merge(OmegaConf.structured(schema), body)


def backend_toplevel_defaults(name: str) -> Dict[str, object]:
    """Top-level keys a backend's YAML sets (package _global_), unresolved (interpolations kept)."""
    y = _yaml("backend", name)
    keys = [k for k in y.keys() if k not in ("defaults", "backend")]
    return {k: OmegaConf.to_container(y, resolve=False)[k] for k in keys}


def _as_list(v) -> List[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [t for t in v.split(",") if t]
    return [str(t) for t in v]


def _effective(cfg: DictConfig, backend: Optional[str], typed: List[str]) -> DictConfig:
    """A plain copy of the config with `backend`'s top-level defaults applied to the keys the user did not type."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if backend:
        for k, v in backend_toplevel_defaults(backend).items():
            if k not in typed:
                c[k] = v
    return c


def _request(cfg: DictConfig, backend: Optional[str], typed: List[str], data_format: str, rows: int = 0):
    from finetune.auto.planner import Request

    c = _effective(cfg, backend, typed)
    meth = cfg.method
    method = str(meth.name)
    if method == "auto" and any(k in typed for k in LORA_KEYS):
        method = "lora"  # LoRA options typed: only LoRA methods make sense
    return Request(
        batch_size=int(c.batch_size),
        seq_len=int(c.cutoff_len),
        method=method,
        precision=str(cfg.hardware.precision),
        lora_r=int(c.lora_r),
        lora_targets=_as_list(c.lora_target_modules) or ["q_proj", "v_proj"],
        modules_to_save=_as_list(c.modules_to_save),
        freeze_trainable_layers=int(meth.get("freeze_trainable_layers", 2)) if method == "freeze" else 2,
        galore_rank=int(meth.get("galore_rank", 16)) if method == "galore" else 16,
        galore_layerwise=bool(meth.get("galore_layerwise", False)) if method == "galore" else False,
        badam_mode=str(meth.get("badam_mode", "layer")) if method == "badam" else "layer",
        badam_update_ratio=float(meth.get("badam_update_ratio", 0.05)) if method == "badam" else 0.05,
        optim=str(c.optim),
        model_kind=str(cfg.model.kind),
        data_format=data_format,
        quantization_bit=int(meth.quantization_bit) if meth.get("quantization_bit") else None,
        candidates=[str(b) for b in cfg.backend.candidates],
        prefer=str(cfg.backend.prefer),
        micro_batch_size=int(c.micro_batch_size) if "micro_batch_size" in typed else None,
        gradient_checkpointing=bool(c.gradient_checkpointing) if "gradient_checkpointing" in typed else None,
        zero_stage=cfg.hardware.deepspeed_stage,
        zero_fixed=cfg.hardware.deepspeed_stage is not None or "hardware.deepspeed_stage" in typed,
        nproc_per_node=int(cfg.launcher.nproc_per_node) if "launcher.nproc_per_node" in typed else None,
        total_tokens=_total_tokens(c, rows),
    )


def _total_tokens(c: DictConfig, rows: int) -> float:
    """Tokens the run processes, an upper bound (every row padded to cutoff_len)."""
    if int(c.max_steps) > 0:
        return float(c.max_steps) * int(c.batch_size) * int(c.cutoff_len)
    if c.max_samples:
        rows = min(rows, int(c.max_samples))
    val = float(c.val_set_size)
    train_rows = rows - (val if val >= 1 else rows * val)
    return max(0.0, train_rows) * float(c.num_epochs) * int(c.cutoff_len)


def machine_of(cfg: DictConfig):
    from finetune.auto.hardware import device_flops
    from finetune.auto.planner import Machine

    hw = cfg.hardware
    return Machine(
        device=str(hw.device),
        gpus_per_node=int(hw.gpus_per_node),
        gpu_memory_gb=float(hw.gpu_memory_gb),
        gpu_type=hw.gpu_type,
        nnodes=max(int(hw.nnodes), int(cfg.launcher.nnodes)),
        cpus=int(hw.cpus),
        memory_gb=float(hw.memory_gb),
        flops=device_flops(hw),
    )


def choose(cfg: DictConfig, typed: Optional[List[str]] = None, data_format: Optional[str] = None, rows: int = 0):
    """The Choice for this config (no side effects)."""
    from finetune.auto.estimator import ModelShape
    from finetune.auto.planner import plan_choice

    typed = _typed_keys() if typed is None else typed
    from finetune.config.model_facts import model_config

    path = Path(str(cfg.model.path)) / "config.json"
    planned = model_config(cfg.model) if not path.is_file() else None  # built on first use: the builder's plan
    if not path.is_file() and not planned:
        raise ConfigError(
            "model.path",
            str(cfg.model.path),
            "backend=auto reads the model's config.json to estimate memory; build or download the model first",
        )
    try:
        shape = ModelShape.from_config(planned) if planned is not None else ModelShape.from_path(path)
    except ValueError as e:
        raise ConfigError("model.path", str(path), str(e)) from None
    fmt = data_format or str(cfg.data.format)
    base = _request(cfg, None, typed, fmt, rows)
    per = {b: _request(cfg, b, typed, fmt, rows) for b in base.candidates if (CONF / "backend" / f"{b}.yaml").is_file()}
    venv = None
    try:
        venv = str(group_node("backend", "collie").venv) if "collie" in base.candidates else None
    except Exception:  # noqa: BLE001 - the env resolver may be missing outside the driver
        venv = None
    return plan_choice(shape, base, machine_of(cfg), collie_venv=venv, per_backend=per)


def apply(cfg: DictConfig, choice, typed: List[str]) -> None:
    """Write the chosen backend, method and parameters into the config."""
    c = choice.chosen
    method_was_auto = str(cfg.method.name) == "auto"
    with open_dict(cfg):
        for k, v in backend_toplevel_defaults(c.backend).items():
            if k not in typed:
                cfg[k] = v
        cfg.backend = group_node("backend", c.backend)
        if method_was_auto:
            cfg.method = group_node("method", c.method)
        cfg.micro_batch_size = int(c.micro_batch_size)
        cfg.gradient_checkpointing = bool(c.gradient_checkpointing)
        cfg.hardware.deepspeed_stage = c.zero_stage
        cfg.hardware.offload_optimizer = bool(c.offload_optimizer)
        cfg.hardware.offload_param = bool(c.offload_param)
        cfg.launcher.nproc_per_node = int(c.nproc_per_node)
        if c.backend == "collie":
            cfg.backend.dp_size = int(c.dp)
            cfg.backend.tp_size = int(c.tp)
        record = choice.to_dict()
        record["method_was_auto"] = method_was_auto
        cfg.auto_choice = record


def check(cfg) -> None:
    from finetune.backends import BACKENDS, get_backend
    from finetune.checks import check_data
    from finetune.config import validate as v
    from finetune.errors import one_of

    allowed = [b for b in BACKENDS if b not in ("auto", "dummy")]
    for b in cfg.backend.candidates:
        if b not in allowed:
            raise ConfigError("backend.candidates", list(cfg.backend.candidates), f"each must be {one_of(allowed)}")
    if not len(cfg.backend.candidates):
        raise ConfigError("backend.candidates", [], f"needs at least one of {', '.join(allowed)}")
    prefer = choices(AutoBackend, "prefer")
    if cfg.backend.prefer not in prefer:
        raise ConfigError("backend.prefer", cfg.backend.prefer, one_of(prefer))
    typed = _typed_keys()
    data_format, rows = None, 0
    try:
        from finetune import data_check, sources

        if sources.registry(cfg.data):  # data=llamafactory: validation already read the datasets
            info = {"format": str(cfg.data.format), "rows": _registry_rows(cfg)}
        else:
            info = data_check.check_data(str(cfg.data.path), str(cfg.data.format), [])
        data_format, rows = info["format"], int(info["rows"])
    except Exception:  # noqa: BLE001 - the data rules run again below on the concrete backend
        pass
    choice = choose(cfg, typed, data_format, rows)
    if cfg.explain:
        print(choice.explain(), flush=True)
    if choice.chosen is None:
        raise ConfigError("backend", "auto", choice.reason, "" if cfg.explain else "explain=true lists every candidate")
    apply(cfg, choice, typed)
    # the concrete config must pass the same rules as if the user had typed it
    v.check_sizes(cfg)
    v.check_hardware(cfg)
    v.check_kind(cfg)
    v.check_method(cfg, typed)
    v.check_optimizer_rules(cfg)
    check_data(cfg)
    get_backend(cfg.backend.name).check(cfg)


def _registry_rows(cfg) -> int:
    from omegaconf import OmegaConf

    from finetune import sources

    return int(sources.check(OmegaConf.to_container(cfg, resolve=True), [])["rows"])


def _chosen(cfg):
    from finetune.backends import get_backend

    if cfg.backend.name == "auto":
        raise ConfigError("backend", "auto", "the choice has not been made yet (check(cfg) runs first)")
    return get_backend(cfg.backend.name)


def plan(cfg, run_dir, ctx):
    p = _chosen(cfg).plan(cfg, run_dir, ctx)
    rec = OmegaConf.to_container(cfg.auto_choice, resolve=True) if "auto_choice" in cfg else {}
    ctx.auto_choice = rec
    notes = [
        f"auto: {rec.get('reason', '')}",
        "auto: to reproduce without re-deciding, replace backend=auto with: " + " ".join(rec.get("overrides", [])),
    ]
    p.notes[:0] = notes
    return p


def collect(cfg, run_dir, ctx) -> dict:
    metrics = _chosen(cfg).collect(cfg, run_dir, ctx)
    rec = OmegaConf.to_container(cfg.auto_choice, resolve=True) if "auto_choice" in cfg else {}
    chosen = rec.get("chosen") or {}
    est = chosen.get("estimate_gib")
    if chosen.get("tokens_per_s"):
        metrics["auto_tokens_per_s_estimate"] = round(float(chosen["tokens_per_s"]), 1)
    if est is not None:
        metrics["auto_estimate_gib"] = est
        peak = metrics.get("peak_rss_mb")
        if cfg.hardware.device == "cpu" and isinstance(peak, (int, float)) and peak > 0:
            metrics["auto_estimate_ratio"] = round(est * 1024 / peak, 3)  # estimate / measured peak RSS
    return metrics
