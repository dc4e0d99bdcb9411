"""The evaluation-by-generation steps a backend adds to its plan when ``generate_eval=true`` (the worker is
finetune/recipes/gen_eval.py): ``generate_eval_before`` answers the held-out rows with the base model before
training, ``generate_eval_after`` with what the run produced (the merged or trained model, or the base with the
adapter on top when merge=false). Standard library + omegaconf only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from finetune.errors import ConfigError
from finetune.plan import Step
from finetune.run_files import RESOLVED_CONFIG

KEYS = ("generate_eval", "generate_eval_rows", "max_new_tokens", "generate_batch_size")
# metrics the evaluation by generation writes (metrics.json); a sweep ranks by them maximised
METRICS = (
    "eval_exact_match",
    "eval_token_f1",
    "eval_rouge_l",
    "base_eval_exact_match",
    "base_eval_token_f1",
    "base_eval_rouge_l",
    "eval_exact_match_gain",
)


def check(cfg) -> None:
    """generate_eval needs held-out rows and sizes > 0; a metric it computes needs it on."""
    if str(cfg.metric) in METRICS and not cfg.generate_eval:
        raise ConfigError("metric", cfg.metric, "is computed by the evaluation by generation: set generate_eval=true")
    if not cfg.generate_eval:
        return
    for key in ("max_new_tokens", "generate_batch_size"):
        if int(cfg[key]) <= 0:
            raise ConfigError(key, cfg[key], "must be > 0")
    if int(cfg.generate_eval_rows) < 0:
        raise ConfigError("generate_eval_rows", cfg.generate_eval_rows, "must be >= 0 (0: every held-out row)")
    if cfg.model.kind != "causal_lm":
        raise ConfigError("generate_eval", True, "answers held-out rows with a causal language model")
    lf = cfg.backend.name == "llamafactory"
    if lf and cfg.backend.stage not in ("sft", "dpo", "kto"):
        raise ConfigError(
            "generate_eval",
            True,
            f"scores a language model's answers against references (backend.stage=sft, dpo: the chosen answer, kto: "
            f"the desirable one), not stage {cfg.backend.stage}",
        )
    held_out = float(cfg.val_set_size) > 0 and not (lf and cfg.backend.eval_strategy == "no")
    if not held_out and not (lf and cfg.data.eval_path) and not cfg.data.get("eval_dataset"):
        raise ConfigError(
            "generate_eval",
            True,
            "needs held-out rows: set val_set_size > 0"
            + (" (and backend.eval_strategy not no), or data.eval_path" if lf else "")
            + " (or hold a dataset out: data.eval_dataset)",
        )
    if lf and cfg.data.mix_strategy != "concat" and not cfg.data.get("eval_dataset"):
        raise ConfigError(
            "generate_eval",
            True,
            f"with data.mix_strategy={cfg.data.mix_strategy} LLaMA-Factory's held-out rows cannot be known here; hold "
            "a dataset out instead (data.eval_dataset)",
        )


def steps(cfg, run_dir, after_model: str, adapter: Optional[str] = None, before_adapter=()) -> tuple:
    """(steps to run first, steps to run last); empty unless generate_eval=true. ``adapter``: adapters (a comma
    list, merged in order) on top of after_model; ``before_adapter``: those the run starts from (adapter=)."""
    if not cfg.generate_eval:
        return [], []
    rc = str(Path(run_dir) / RESOLVED_CONFIG)
    argv = [sys.executable, "-m", "finetune.recipes.gen_eval", "--config", rc, "--stage"]
    scorer = ["rouge_score.rouge_scorer"]
    start = ["--adapter", ",".join(before_adapter)] if before_adapter else []
    before = Step(
        name="generate_eval_before",
        argv=[*argv, "before", "--model", str(cfg.model.path), *start],
        rank0_only=True,
        preload=scorer,
    )
    after = Step(
        name="generate_eval_after",
        rank0_only=True,
        preload=scorer,
        argv=[*argv, "after", "--model", str(after_model), *(["--adapter", str(adapter)] if adapter else [])],
    )
    return [before], [after]


def note(cfg) -> List[str]:
    if not cfg.generate_eval:
        return []
    rows = int(cfg.generate_eval_rows)
    return [
        f"evaluation by generation: {'all' if rows == 0 else f'the first {rows}'} held-out rows answered before "
        f"and after training (greedy, batches of {int(cfg.generate_batch_size)}, <= {int(cfg.max_new_tokens)} "
        "new tokens); exact match, token F1, ROUGE-L in metrics.json, answers in eval/samples.md"
    ]
