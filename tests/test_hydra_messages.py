"""Where finetune leans on Hydra and OmegaConf beyond their documented API, pinned: each kind of compose error is
turned into its one line from the exceptions' fields (finetune/cli.py explain_hydra_error), and the two Hydra
internals we replace still exist with the shape we replace. A Hydra or OmegaConf upgrade that changes any of this
fails here, with the kind named, rather than as a worse message in a user's terminal."""

from __future__ import annotations

import inspect

import pytest
from conftest import refusal

# one override per kind of Hydra/OmegaConf error -> the exact line (after "error: ") a user sees
MESSAGES = [
    # hydra.errors.MissingConfigException (missing_cfg_file, options): a config group option that does not exist
    (
        ["backend=colie"],
        "backend='colie': one of alpacalora, auto, collie, dummy, flagembedding, llamafactory (did you mean 'collie'?)",
    ),
    (
        ["+experiment=nope"],
        "experiment='nope': one of alpaca_lora, collie_lora, embedding_finetune, llamafactory_lora_sft, smollm2_dpo, "
        "smollm2_kto, smollm2_lora",
    ),
    # omegaconf ConfigAttributeError / ConfigKeyError (full_key) under ConfigCompositionException: unknown key
    (["lora_rr=3"], "lora_rr: unknown key (did you mean 'lora_r'?)"),
    (["method.lora_rr=3"], "method.lora_rr: unknown key (did you mean 'method.lora_r'?)"),
    # omegaconf ValidationError (full_key, value, object_type): a value of the wrong type for its schema field
    (["lora_r=abc"], "lora_r='abc': must be integer"),
    (["learning_rate=fast"], "learning_rate='fast': must be float"),
    (["train_on_inputs=maybe"], "train_on_inputs='maybe': must be a bool (true/false)"),
    (["hardware.deepspeed_stage=x"], "hardware.deepspeed_stage='x': must be integer"),
    # hydra.errors.OverrideParseException (override): the command-line grammar
    (["lora_r"], "override 'lora_r': cannot be parsed (KEY=VALUE; quote values with special characters)"),
    # hydra ConfigCompositionException: a comma list without -m (its fix is on the message's later lines)
    (
        ["lora_target_modules=q_proj,v_proj"],
        "override 'lora_target_modules=q_proj,v_proj': a comma list is a sweep, which runs with -m; for a list "
        "write lora_target_modules=[q_proj,v_proj], for text with commas quote it: lora_target_modules='q_proj,v_proj'",
    ),
    (
        ["lora_r=range(1,3)"],
        "override 'lora_r=range(1,3)': is a sweep, which runs with -m (python train.py -m lora_r=range(1,3))",
    ),
    (["lora_r=[1"], "override 'lora_r=[1': cannot be parsed (KEY=VALUE; quote values with special characters)"),
    # omegaconf MissingMandatoryValue (full_key): a ??? value never set (raised when our checks read it)
    (["model=llama"], "model.path: required value is missing (set model.path=...)"),
]


@pytest.mark.parametrize("overrides,line", MESSAGES, ids=[" ".join(o) for o, _ in MESSAGES])
def test_hydra_error_kind_gives_its_line(overrides, line, tmp_path):
    assert refusal(*overrides, outputs=tmp_path) == (2, line)


def test_the_hydra_internals_we_replace_keep_their_shape():
    """finetune.cli.setup replaces hydra._internal.utils.run_and_report (Hydra's error printer: ours prints one
    line) and wraps Hydra.get_mode (a whole extra composition only to read hydra.mode, skipped when no override
    can set it; tests/test_sweeps.py runs hydra.mode=MULTIRUN without -m through it)."""
    import hydra._internal.utils as hutils
    from hydra._internal.hydra import Hydra

    from finetune.cli import setup

    assert list(inspect.signature(hutils.run_and_report).parameters) == ["func"]
    assert list(inspect.signature(Hydra.get_mode).parameters) == ["self", "config_name", "overrides"]
    setup()
    assert hutils.run_and_report.__module__ == "finetune.cli" and getattr(Hydra.get_mode, "_finetune", False)
    # @hydra.main reaches run_and_report through the module attribute, so the replacement is the one it calls
    assert "run_and_report(" in inspect.getsource(hutils._run_hydra)
