"""Validation of a composed config, in order, before anything is written: the config's own rules
(finetune/config/validate.py) with what needs more than the config, called from here by the driver
(finetune/run.py prepare): the machine's hardware resolved, the tracking targets checked, the data files read row
by row and the export's settings checked. config/ itself depends on nothing of ours above it."""

from __future__ import annotations

from typing import List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.config.paths import resolve_user_paths
from finetune.config.schema import DataConfig, choices
from finetune.config.validate import (
    _choice,
    _typed_keys,
    check_adapter,
    check_added_keys,
    check_hardware,
    check_kind,
    check_layout,
    check_method,
    check_mixing,
    check_model,
    check_optimizer_rules,
    check_paths,
    check_sizes,
)
from finetune.errors import ConfigError


def validate(cfg: DictConfig, overrides: Optional[List[str]] = None) -> dict:
    """The config's own rules, before anything is written. Returns facts learned on the way (data format, row count,
    data hashes). Nothing of a backend or launcher is imported here: the driver runs their own checks next
    (finetune/run.py prepare)."""
    from finetune.auto.hardware import resolve_hardware
    from finetune.tracking import check as check_tracking

    overrides = list(overrides or [])
    typed = _typed_keys(overrides)
    check_added_keys(cfg, overrides)
    resolve_user_paths(cfg)  # every path absolute, against the folder the user ran from
    resolve_hardware(cfg)  # hardware=auto, cpus/memory_gb 0: detect this machine (no torch)
    check_sizes(cfg)
    check_tracking(cfg)  # report_to, tracking.* (defaults filled in and recorded)
    check_hardware(cfg)
    check_layout(cfg)
    check_kind(cfg)
    check_method(cfg, typed)
    check_optimizer_rules(cfg)
    check_paths(cfg)
    check_model(cfg)
    check_export(cfg, typed)
    check_adapter(cfg, typed)
    return {"data": check_data(cfg)}


def check_export(cfg: DictConfig, typed) -> None:
    """export= / export_type= (finetune/export.py): allowed values together, what llama.cpp can take; an
    export_type typed without an export would be ignored: refused."""
    from finetune.export import check_config

    if cfg.export is None and "export_type" in typed:
        raise ConfigError("export_type", cfg.export_type, "has no effect without export=gguf or export=gguf-lora")
    check_config(cfg)


def check_data(cfg: DictConfig) -> dict:
    """The data files, row by row, in a format the backend takes (backend.data_formats); data.format=auto becomes
    the detected format, so the backends' own checks (LLaMA-Factory's per stage) read it without reading the
    files again."""
    from finetune import data_check, sources

    fmt = cfg.data.format
    _choice("data.format", fmt, choices(DataConfig, "format"))
    check_mixing(cfg)
    if sources.registry(cfg.data):  # data=llamafactory: datasets of a dataset_info.json
        plain = OmegaConf.to_container(cfg, resolve=True)
        info = sources.check(plain, list(cfg.backend.data_formats))
        with open_dict(cfg):
            cfg.data.format = info["format"]
        return info
    if not cfg.data.path and cfg.data.get("dataset_dir"):
        raise ConfigError(
            "data.dataset",
            text=f"data.dataset: required value is missing (datasets of {cfg.data.dataset_dir}/dataset_info.json: "
            "data.dataset=a, or 'data.dataset=[a,b]')",
        )
    if not cfg.data.path:
        raise ConfigError(
            "data.path",
            cfg.data.path,
            "name the training data: a file or folder (data.path=...), or datasets of a dataset_info.json "
            "(data=llamafactory data.dataset=...)",
        )
    info = data_check.check_data(str(cfg.data.path), fmt, list(cfg.backend.data_formats))
    if cfg.data.eval_path:
        data_check.check_data(str(cfg.data.eval_path), info["format"], [], key="data.eval_path")
    with open_dict(cfg):
        cfg.data.format = info["format"]
    return info
