"""Every key of the root schema, on every backend: used, or refused when typed (never silently ignored).

A backend that would ignore a key lists it in NOT_USED (finetune/backends/<name>.py) with what to use instead;
validation refuses it when typed. Every other key must be read by the backend's adapter or its worker process,
or by the driver (run folder, dry run, timeout, sweep metric, ...).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

ROOT_KEYS = None

# the evaluation by generation: planned by these backends (finetune/backends/gen_eval.py), run by its own worker
GEN_EVAL = ["finetune/backends/gen_eval.py", "finetune/recipes/gen_eval.py"]
# where each backend's code reads the config: its adapter (plan) and the worker processes it starts
SOURCES = {
    "alpacalora": [
        "finetune/backends/alpacalora.py",
        "finetune/recipes/alpacalora.py",
        "finetune/recipes/data.py",
        "finetune/sources.py",
        *GEN_EVAL,
    ],
    "llamafactory": [
        "finetune/backends/llamafactory.py",
        "finetune/recipes/llamafactory.py",
        *GEN_EVAL,
        "finetune/backends/pref_eval.py",
        "finetune/recipes/pref_eval.py",
    ],
    "flagembedding": [
        "finetune/backends/flagembedding.py",
        "finetune/recipes/flagembedding.py",
        "finetune/recipes/flagembedding_eval.py",
    ],
    "collie": [
        "finetune/backends/collie.py",
        "finetune/recipes/collie.py",
        "finetune/recipes/collie_merge.py",
        "finetune/sources.py",
        *GEN_EVAL,
    ],
}
DRIVER = [
    "finetune/run.py",
    "finetune/config/validate.py",
    "finetune/checks.py",
    "finetune/config/resume.py",
    "finetune/callbacks.py",
    "finetune/report/metrics.py",
    "finetune/backends/auto.py",
    "finetune/tracking/__init__.py",
    "finetune/tracking/tracker.py",
    "finetune/launchers/local.py",
]
# the driver's own keys: what every backend gets from the driver rather than from its worker
DRIVER_KEYS = {
    "name",
    "output_dir",
    "allow_outside_outputs",
    "resume",
    "dry_run",
    "explain",
    "timeout_min",
    "metric",
    "fail_fast",
    "report_to",
    "tracking",
    "verbose",  # the launcher: what reaches the terminal
    "export",  # finetune/export.py: the run's last step, refused in one line where the model cannot be exported
    "export_type",
}


def root_keys():
    from finetune.config.schema import RootConfig

    return [
        f.name
        for f in dataclasses.fields(RootConfig)
        if f.name not in ("backend", "model", "method", "hardware", "data", "launcher")
    ]


# root keys read through finetune/config/derived.py: code that calls the function reads them
DERIVED_READS = {
    "grad_accum(": ("batch_size", "micro_batch_size"),
    "adapter_dir(": ("target_path",),
    "merged_dir(": ("merge_path",),
}


def reads(text: str, key: str) -> bool:
    """Does the code read the key (cfg.key, m.key, cfg["key"], cfg.get("key"), select(cfg, "key"), or a function of
    finetune/config/derived.py that reads it)?"""
    if any(call in text and key in keys for call, keys in DERIVED_READS.items()):
        return True
    return bool(re.search(rf"\.{key}\b|[\"']{key}[\"']", text))


def source(paths) -> str:
    return "\n".join((REPO / p).read_text() for p in paths)


@pytest.mark.parametrize("backend", sorted(SOURCES))
def test_every_root_key_is_used_or_refused(backend):
    from omegaconf import OmegaConf

    from finetune.backends import get_backend
    from finetune.config.validate import LORA_ONLY_KEYS

    not_used = getattr(get_backend(backend), "NOT_USED", {})
    code, driver = source(SOURCES[backend]), source(DRIVER)
    methods = OmegaConf.load(REPO / "conf" / "backend" / f"{backend}.yaml").backend.methods
    lora = any(m in methods for m in ("lora", "loraplus", "rslora", "dora", "pissa"))
    silent = []
    for key in root_keys():
        if key in LORA_ONLY_KEYS and not lora:
            continue  # refused by the method rules: LoRA options with a non-LoRA method
        if key in not_used:
            continue  # refused when typed: test_a_key_the_backend_ignores_is_refused_when_typed
        if key in DRIVER_KEYS and reads(driver, key):
            continue
        if not reads(code, key):
            silent.append(key)
    assert not silent, f"backend {backend} neither reads nor refuses: {silent}"


def _validate(overrides):
    """Every check the driver runs before a run starts (config, backend, launcher)."""
    from finetune.cli import setup
    from finetune.run import prepare

    setup()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=overrides)
    return prepare(cfg, overrides)


CASES = [
    (b, k)
    for b in sorted(SOURCES)
    for k in getattr(__import__(f"finetune.backends.{b}", fromlist=["x"]), "NOT_USED", {})
]
VALUES = {
    "cutoff_len": "256",
    "val_set_size": "16",
    "eval_steps": "5",
    "train_on_inputs": "false",
    "prompt_template_name": "alpaca_short",
    "merge": "true",
    "merge_path": "/tmp/x",
    "save_steps": "5",
    "save_total_limit": "3",
    "method.use_rslora": "true",
    "method.use_dora": "true",
    "method.loraplus_lr_ratio": "4",
    "method.pissa_init": "true",
    "method.create_new_adapter": "true",
    "generate_eval": "true",
    "generate_eval_rows": "8",
    "max_new_tokens": "16",
    "generate_batch_size": "4",
    "preference_eval": "true",
    "preference_eval_rows": "8",
    "adapter": "/tmp/x",
}


@pytest.mark.parametrize("backend,key", CASES, ids=[f"{b}-{k}" for b, k in CASES])
def test_a_key_the_backend_ignores_is_refused_when_typed(backend, key):
    from finetune.errors import ConfigError

    overrides = [f"backend={backend}", f"{key}={VALUES[key]}"]
    if backend == "collie":
        overrides.append("backend.venv=" + str(Path.home() / ".cache" / "does-not-matter"))
    with pytest.raises(ConfigError) as e:
        _validate(overrides)
    assert str(e.value).startswith(f"{key}=") and f"is not used by backend {backend}" in str(e.value), str(e.value)
