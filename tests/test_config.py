"""Config tier: every group option and experiment composes; the root schema and resolvers behave."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from finetune.cli import setup
from finetune.config.resolvers import safe_eval

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
setup()

GROUPS = ["backend", "model", "method", "hardware", "data", "launcher"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    node = cfg[group]
    assert node.name, f"{group}={option} has no name"
    # everything but user-supplied paths (???) resolves
    for key in node:
        if not OmegaConf.is_missing(node, key):
            OmegaConf.to_container(node, resolve=False)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.backend.name and cfg.model.name and cfg.method.name


def test_group_defaults_and_reference_values():
    cfg = _compose([])
    assert (cfg.backend.name, cfg.model.name, cfg.method.name, cfg.hardware.name, cfg.data.name, cfg.launcher.name) == (
        "alpacalora",
        "tiny_llama",
        "lora",
        "cpu",
        "tiny_alpaca",
        "local",
    )
    # alpacalora defaults mirror the reference (seeds/finetune_backends_reference.md)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.num_epochs, cfg.learning_rate, cfg.cutoff_len) == (
        64,
        4,
        2,
        5e-4,
        1030,
    )
    assert (cfg.val_set_size, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.train_on_inputs) == (
        200,
        8,
        32,
        0.05,
        True,
    )
    assert list(cfg.method.lora_target_modules) == ["q_proj", "v_proj"]


def test_short_keys_flow_into_groups_backend_collie():
    """`python train.py backend=collie lora_r=16` composes exactly as typed."""
    cfg = _compose(["backend=collie", "lora_r=16"])
    assert cfg.backend.name == "collie"
    assert cfg.lora_r == 16 and cfg.method.lora_r == 16
    assert cfg.lora_alpha == 16 and cfg.num_epochs == 3  # collie's reference defaults
    cfg = _compose(["backend=llamafactory"])
    assert cfg.learning_rate == 1e-4 and cfg.cutoff_len == 1024 and cfg.method.lora_alpha == 16


def test_method_flags():
    assert _compose(["method=rslora"]).method.use_rslora is True
    assert _compose(["method=dora"]).method.use_dora is True
    m = _compose(["method=pissa"]).method
    assert m.pissa_init and m.pissa_convert
    assert _compose(["method=loraplus"]).method.loraplus_lr_ratio == 16.0
    assert _compose(["method=galore"]).method.finetuning_type == "full"
    assert _compose(["method=badam", "method.badam_mode=ratio"]).method.badam_mode == "ratio"


def test_eval_resolver_pairs_alpha_to_rank():
    cfg = _compose(["lora_r=16", "lora_alpha=${eval:2*lora_r}"])
    assert cfg.lora_alpha == 32 and cfg.method.lora_alpha == 32
    cfg = _compose(["lora_r=4", "lora_alpha='${eval:2*${lora_r}}'"])  # the nested form, quoted for Hydra
    assert cfg.lora_alpha == 8


def test_safe_eval_refuses_code():
    assert safe_eval("2*8") == 16 and safe_eval("1/4") == 0.25 and safe_eval("-(3+1)") == -4
    for bad in ("__import__('os')", "a*2", "2**1000", "[1]"):
        with pytest.raises(ValueError):
            safe_eval(bad)


def test_schema_rejects_wrong_type_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["lora_r=abc"])
    with pytest.raises(ConfigCompositionException):
        _compose(["method.use_dora=maybe"])
