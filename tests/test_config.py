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


# ------------------------------------------------------------------------- each default once, every key explained


def _schema_node(group: str, text: str):
    import yaml

    from finetune.config import schema

    for entry in (yaml.safe_load(text) or {}).get("defaults") or []:
        if isinstance(entry, str) and entry.startswith(f"/schema/{group}/"):
            return schema.SCHEMAS[group][entry.split("/")[-1].split("@")[0]]
    return None


def test_no_group_file_restates_a_schema_default():
    """A group option's YAML sets only what differs from its schema's defaults (finetune/config/schema.py): a
    default is written once, where its help is."""
    import dataclasses

    import yaml
    from omegaconf import MISSING

    restated = []
    for group in ("backend", "model", "method", "hardware", "data", "launcher"):
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            node = _schema_node(group, text)
            if node is None:
                continue
            body = yaml.safe_load(text) or {}
            body = body.get(group) or {} if "@package _global_" in text else body
            for f in dataclasses.fields(node):
                if f.name not in body or f.name == "defaults":
                    continue
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                if default is MISSING or default is dataclasses.MISSING:
                    continue
                value = body[f.name]
                if value == default and type(value) is type(default) or value is None is default:
                    restated.append(f"{path.relative_to(REPO)}: {f.name}: {value!r}")
    assert not restated, "restates the schema's default:\n" + "\n".join(restated)


def test_every_key_has_help_and_finetune_keys_prints_it(capsys):
    """`finetune keys [GROUP]` lists every key with its type, default, allowed values and help; every key has
    help; an unknown group is refused in one line with exit code 2."""
    from finetune import cli
    from finetune.config.keys import GROUPS, keys

    missing = [k.key for g in GROUPS for k in keys(g) if not k.help.strip()]
    assert not missing, f"keys without help: {missing}"
    assert cli.main(["keys", "method"]) == 0
    out = capsys.readouterr().out
    assert "method.quantization_type: str = 'nf4'  [nf4 | fp4]  (lora only)" in out, out
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    assert "top-level keys: python train.py KEY=VALUE" in out and "launcher.*  (options:" in out
    assert "  lora_r: int = 8" in out and "  tracking.flush_s:" in out
    with pytest.raises(SystemExit) as refused:
        cli.main(["keys", "methods"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: group='methods': one of backend, data, hardware, launcher, method, model, root, tracking "
        "(did you mean method?)"
    ] or (len(err) == 1 and "group='methods'" in err[0]), err


def test_a_worker_reading_a_misspelt_key_fails_loudly(tmp_path):
    """The workers read resolved_config.json through a read-only ConfigView: a key that is neither in the file nor
    the schema fails with the close matches, through [] and .get alike; a schema key the file lacks is the default;
    free-form mappings (backend.extra, data.mix) are plain; older run folders without the schema's keys read
    unchecked; a worker given other paths takes a new view (with_values)."""
    import json

    from finetune.config.keys import schema_keys
    from finetune.recipes.common import ConfigView, read_config

    data = {"lora_r": 8, "backend": {"name": "alpacalora", "extra": {"anything": 1}}, "data": {"mix": {"a": 1}}}
    path = tmp_path / "resolved_config.json"
    path.write_text(json.dumps({**data, "_keys": schema_keys()}))
    cfg = read_config(str(path))
    assert isinstance(cfg, ConfigView) and isinstance(cfg["backend"], ConfigView)
    assert cfg.get("lora_r") == 8 and cfg.get("lora_alpha", 32) == 32  # in the schema, not in this file
    with pytest.raises(KeyError, match=r"lora_rank: not a key of the run's config \(did you mean lora_r"):
        cfg.get("lora_rank")
    with pytest.raises(KeyError, match=r"backend.torch_thread: not a key .*did you mean torch_threads"):
        cfg["backend"].get("torch_thread")
    assert cfg["backend"]["extra"].get("whatever") is None and cfg["data"]["mix"].get("b") is None
    with pytest.raises(TypeError, match="read-only"):
        cfg["backend"]["name"] = "x"
    other = cfg.with_values({"backend.name": "x", "lora_r": 4})  # paths a worker is given on its command line
    assert other["backend"]["name"] == "x" and other["lora_r"] == 4 and cfg["backend"]["name"] == "alpacalora"
    assert json.loads(json.dumps(other))["backend"]["name"] == "x"
    with pytest.raises(KeyError, match="lora_rank"):
        other.get("lora_rank")
    path.write_text(json.dumps(data))  # a run folder from before the keys were recorded: read, unchecked
    old = read_config(str(path))
    assert old.get("anything") is None and old["backend"]["extra"]["anything"] == 1
