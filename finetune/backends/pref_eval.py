"""The preference evaluation a backend adds to its plan when ``preference_eval=true`` (the worker is
finetune/recipes/pref_eval.py): ``preference_eval_before`` scores the held-out preference pairs with the model the
run starts from, ``preference_eval_after`` with what it produced. A pair is right when the model gives the chosen
answer a higher log-likelihood than the rejected one; the margin is the difference. Standard library + omegaconf.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from finetune.errors import ConfigError
from finetune.plan import Step
from finetune.run_files import RESOLVED_CONFIG

KEYS = ("preference_eval", "preference_eval_rows")
# metrics the preference evaluation writes (metrics.json); a sweep ranks by them maximised
METRICS = (
    "eval_preference_accuracy",
    "eval_preference_margin",
    "base_eval_preference_accuracy",
    "base_eval_preference_margin",
    "eval_preference_accuracy_gain",
)
PAIR_FORMATS = ("preference", "kto")


def check(cfg) -> None:
    """preference_eval needs held-out preference pairs (or KTO rows that pair up) of a causal language model; a metric
    it computes needs it on."""
    if str(cfg.metric) in METRICS and not cfg.preference_eval:
        raise ConfigError("metric", cfg.metric, "is computed by the preference evaluation: set preference_eval=true")
    if not cfg.preference_eval:
        return
    if cfg.backend.name != "llamafactory":
        raise ConfigError(
            "preference_eval",
            True,
            f"scores the preference stages of backend=llamafactory (dpo, kto), not backend {cfg.backend.name}",
        )
    if int(cfg.preference_eval_rows) < 0:
        raise ConfigError("preference_eval_rows", cfg.preference_eval_rows, "must be >= 0 (0: every held-out pair)")
    if cfg.model.kind != "causal_lm":
        raise ConfigError("preference_eval", True, "scores answers of a causal language model")
    if cfg.data.format not in PAIR_FORMATS:
        raise ConfigError(
            "preference_eval",
            True,
            f"scores held-out preference pairs; the run's data holds {cfg.data.format} rows (use preference pairs or "
            "KTO rows: backend.stage=dpo, rm or kto)",
        )
    lf = cfg.backend.name == "llamafactory"
    if lf and cfg.backend.stage == "rm":
        raise ConfigError(
            "preference_eval", True, "scores a language model's answers; stage rm trains a reward model (use dpo)"
        )
    held_out = float(cfg.val_set_size) > 0 and not (lf and cfg.backend.eval_strategy == "no")
    if not held_out and not cfg.data.eval_path and not cfg.data.get("eval_dataset"):
        raise ConfigError(
            "preference_eval",
            True,
            "needs held-out pairs: val_set_size > 0, data.eval_path or data.eval_dataset",
        )
    if cfg.data.mix_strategy != "concat" and not (cfg.data.eval_path or cfg.data.get("eval_dataset")):
        raise ConfigError(
            "preference_eval",
            True,
            f"with data.mix_strategy={cfg.data.mix_strategy} LLaMA-Factory's held-out rows cannot be known here; hold "
            "a dataset out instead (data.eval_dataset)",
        )


def steps(cfg, run_dir, after_model: str, adapters=(), before_adapters=()) -> tuple:
    """(steps to run first, steps to run last); empty unless preference_eval=true. ``adapters``: on top of
    after_model (merge=false); ``before_adapters``: the adapter the run starts from (adapter=)."""
    if not cfg.preference_eval:
        return [], []
    rc = str(Path(run_dir) / RESOLVED_CONFIG)
    argv = [sys.executable, "-m", "finetune.recipes.pref_eval", "--config", rc, "--stage"]
    # LLaMA-Factory's template encodes the pairs of its runs (imported once by the preloaded process)
    preload = ["llamafactory.data.template"] if cfg.backend.name == "llamafactory" else []
    before = Step(
        name="preference_eval_before",
        rank0_only=True,
        preload=preload,
        argv=[
            *argv,
            "before",
            "--model",
            str(cfg.model.path),
            *(["--adapter", ",".join(before_adapters)] if before_adapters else []),
        ],
    )
    after = Step(
        name="preference_eval_after",
        rank0_only=True,
        preload=preload,
        argv=[*argv, "after", "--model", str(after_model), *(["--adapter", ",".join(adapters)] if adapters else [])],
    )
    return [before], [after]


def note(cfg) -> List[str]:
    if not cfg.preference_eval:
        return []
    rows = int(cfg.preference_eval_rows)
    return [
        f"preference evaluation: {'all' if rows == 0 else f'the first {rows}'} held-out pairs scored before and "
        "after training (sum of the answer's token log-probabilities, chosen vs rejected); accuracy and mean margin "
        "in metrics.json and history.jsonl, pairs in eval/preference_samples.md"
    ]
