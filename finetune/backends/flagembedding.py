"""flagembedding: embedder and reranker fine-tuning through FlagEmbedding 1.4.2's own entry modules.

Steps of a run (all argv lists, no shell):
  1. eval_before  python -m finetune.recipes.flagembedding_eval --stage before   (recall@k / MRR of the base model)
  2. train        python -m FlagEmbedding.finetune.<embedder|reranker>.encoder_only.base --flags...
                  (the launcher wraps it in torchrun when world size > 1; DeepSpeed JSON from the hardware group)
  3. eval_after   python -m finetune.recipes.flagembedding_eval --stage after    (the saved model, through FlagModel /
                  FlagReranker; also turns the trainer's TensorBoard scalars into history.jsonl)

Which reference flags are not passed, and why: see conf/backend/flagembedding.yaml and the schema's docstring.
Standard library + omegaconf only at import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

from finetune.config.derived import deepspeed_offload, grad_accum, world_size
from finetune.config.schema import FlagembeddingBackend, choices
from finetune.errors import ConfigError, one_of
from finetune.plan import Plan, Step
from finetune.run_files import HISTORY, RESOLVED_CONFIG
from finetune.tracking import wants

TASKS = choices(FlagembeddingBackend, "task")
# keys this backend would ignore: refused when typed (finetune/run.py check_unused_keys)
NOT_USED = {
    "preference_eval": "the preference evaluation scores preference stages: backend=llamafactory backend.stage=dpo",
    "preference_eval_rows": "the preference evaluation scores preference stages: backend=llamafactory",
    "adapter": "starting from a trained adapter runs on backend=llamafactory (its adapter_name_or_path)",
    "cutoff_len": "the encoder's lengths are backend.query_max_len and backend.passage_max_len",
    "val_set_size": "the held-out queries are data.eval_path (recall@k / MRR before and after training)",
    "eval_steps": "FlagEmbedding evaluates before and after training (backend.eval), not during it",
    "train_on_inputs": "an embedder has no prompt/response split",
    "prompt_template_name": "queries take backend.query_instruction_for_retrieval (or _for_rerank) instead",
    "merge": "the whole encoder is trained and saved (no adapter, nothing to merge)",
    "merge_path": "the whole encoder is trained and saved in target_path (no adapter, nothing to merge)",
    **{
        k: "an encoder does not generate: FlagEmbedding scores retrieval (recall@k / MRR) before and after training "
        "(backend.eval)"
        for k in ("generate_eval", "generate_eval_rows", "max_new_tokens", "generate_batch_size")
    },
}
MODULES = {
    "embedder": "FlagEmbedding.finetune.embedder.encoder_only.base",
    "reranker": "FlagEmbedding.finetune.reranker.encoder_only.base",
}
# the reference's task defaults for the max lengths (LazyLLM: embed 512, rerank 256)
DEFAULT_LEN = {"embedder": 512, "reranker": 256}
POOLING = choices(FlagembeddingBackend, "sentence_pooling_method")
KD_LOSS = choices(FlagembeddingBackend, "kd_loss_type")
EMBEDDER_ONLY = (
    "temperature",
    "sentence_pooling_method",
    "normalize_embeddings",
    "kd_loss_type",
    "negatives_cross_device",
    "query_instruction_for_retrieval",
)


def query_max_len(cfg) -> int:
    b = cfg.backend
    return int(b.query_max_len) if b.query_max_len is not None else DEFAULT_LEN[str(b.task)]


def passage_max_len(cfg) -> int:
    b = cfg.backend
    return int(b.passage_max_len) if b.passage_max_len is not None else DEFAULT_LEN[str(b.task)]


def output_dir(cfg, run_dir) -> Path:
    """Where the trained model goes: target_path, else <run>/<task> (a full model, no adapter, no merge)."""
    return (
        Path(str(cfg.target_path)).expanduser().absolute() if cfg.target_path else Path(run_dir) / str(cfg.backend.task)
    )


def _abs(path) -> str:
    """Workers run in the run folder: pass paths absolute (relative ones are taken from the driver's folder)."""
    return str(Path(str(path)).expanduser().absolute())


# ------------------------------------------------------------------------------------------------ check


def _check_rows(path: str, key: str, task: str, kd: bool, need_neg: bool) -> None:
    """FlagEmbedding's own needs on top of finetune.data_check's embedding-row rules (row numbers from 1)."""
    from finetune.data_check import data_files, iter_rows

    for f in data_files(path, key):
        for n, row in iter_rows(f, key):
            where = f"{f.name} row {n}"
            if not isinstance(row, dict):
                raise ConfigError(key, str(path), f"{where}: expected an object {{query, pos, neg}}")
            if not isinstance(row.get("query"), str) or not row["query"].strip():
                raise ConfigError(key, str(path), f"{where}: field 'query' must be a non-empty string")
            pos = row.get("pos")
            if not isinstance(pos, list) or not pos or not all(isinstance(p, str) for p in pos):
                raise ConfigError(key, str(path), f"{where}: field 'pos' must be a non-empty list of strings")
            neg = row.get("neg")
            if need_neg and (not isinstance(neg, list) or not neg):
                raise ConfigError(
                    key,
                    str(path),
                    f"{where}: field 'neg' must be a non-empty list of strings "
                    "(FlagEmbedding samples train_group_size-1 negatives from it)",
                )
            if neg is not None and (not isinstance(neg, list) or not all(isinstance(p, str) for p in neg)):
                raise ConfigError(key, str(path), f"{where}: field 'neg' must be a list of strings")
            for sk, lk in (("pos_scores", "pos"), ("neg_scores", "neg")):
                if kd and sk not in row:
                    raise ConfigError(
                        key,
                        str(path),
                        f"{where}: backend.knowledge_distillation=true needs field "
                        f"{sk!r} (teacher scores, one per {lk!r} entry)",
                    )
                if sk in row:
                    sc = row[sk]
                    if (
                        not isinstance(sc, list)
                        or len(sc) != len(row.get(lk) or [])
                        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sc)
                    ):
                        raise ConfigError(
                            key, str(path), f"{where}: field {sk!r} must be a list of numbers, one per {lk!r} entry"
                        )
            for pk in ("prompt", "query_prompt", "passage_prompt"):
                if pk in row and not isinstance(row[pk], str):
                    raise ConfigError(key, str(path), f"{where}: field {pk!r} must be a string")


def _check_corpus(path: str) -> None:
    from finetune.data_check import data_files, iter_rows

    for f in data_files(path, "data.corpus_path"):
        for n, row in iter_rows(f, "data.corpus_path"):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "id" not in row:
                raise ConfigError("data.corpus_path", str(path), f"{f.name} row {n}: expected {{id, text}}")


def check(cfg) -> None:
    b = cfg.backend
    if b.task not in TASKS:
        from finetune.errors import suggest

        raise ConfigError("backend.task", b.task, one_of(TASKS), suggest(b.task, TASKS))
    if b.sentence_pooling_method not in POOLING:
        raise ConfigError("backend.sentence_pooling_method", b.sentence_pooling_method, one_of(POOLING))
    if b.kd_loss_type not in KD_LOSS:
        raise ConfigError("backend.kd_loss_type", b.kd_loss_type, one_of(KD_LOSS))
    min_group = 2 if b.task == "reranker" else 1
    if b.train_group_size < min_group:
        raise ConfigError(
            "backend.train_group_size",
            b.train_group_size,
            f"must be >= {min_group} (1 positive + negatives)" if min_group > 1 else "must be >= 1",
        )
    for key in ("query_max_len", "passage_max_len", "pad_to_multiple_of"):
        v = b.get(key)
        if v is not None and v <= 0:
            raise ConfigError(f"backend.{key}", v, "must be > 0 (or null)")
    if b.temperature <= 0:
        raise ConfigError("backend.temperature", b.temperature, "must be > 0")
    if str(b.query_instruction_format).count("{}") != 2:
        raise ConfigError(
            "backend.query_instruction_format",
            b.query_instruction_format,
            "must hold exactly two {} (instruction, then query), e.g. '{}{}' or '<instruct>{}\\n<query>{}'",
        )
    if not list(b.eval_k) or any(int(k) <= 0 for k in b.eval_k):
        raise ConfigError("backend.eval_k", list(b.eval_k), "must be a non-empty list of integers > 0")
    if b.eval_batch_size <= 0:
        raise ConfigError("backend.eval_batch_size", b.eval_batch_size, "must be > 0")
    if cfg.method.name != "full":
        raise ConfigError(
            "method", cfg.method.name, "backend flagembedding trains encoder models in full (method=full)"
        )
    _check_rows(str(cfg.data.path), "data.path", str(b.task), bool(b.knowledge_distillation), need_neg=True)
    if cfg.data.eval_path:
        _check_rows(str(cfg.data.eval_path), "data.eval_path", str(b.task), False, need_neg=False)
    if cfg.data.corpus_path:
        _check_corpus(str(cfg.data.corpus_path))


# ------------------------------------------------------------------------------------------------ plan


def deepspeed_config(cfg) -> dict:
    """ZeRO config in the shape of FlagEmbedding's examples/finetune/ds_stage0.json. The bucket sizes are numbers,
    not "auto": HF fills "auto" sizes from model.config, which FlagEmbedding's model wrapper does not have
    (ValueError "The model's config file has neither hidden_size nor hidden_sizes"); they are HF's own formulas on
    the encoder's hidden size (config.json), or DeepSpeed's defaults when it cannot be read yet."""
    from finetune.config.model_facts import hidden_size

    hw = cfg.hardware
    stage = int(hw.deepspeed_stage)
    hidden = hidden_size(cfg.model)
    zero = {"stage": stage}
    if stage > 0:
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": hidden * hidden if hidden else int(5e8),
            }
        )
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden) if hidden else int(5e7),
                "stage3_param_persistence_threshold": 10 * hidden if hidden else int(1e5),
                # the Trainer gathers the full weights for the final save (our train step saves them)
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    zero.update(deepspeed_offload(hw, pin_memory=False))
    return {
        "zero_optimization": zero,
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 12},
        "bf16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def _flags(**values) -> List[str]:
    """``--name value`` pairs in the order given: floats as repr (exact), everything else as str (bools True/False)."""
    out: List[str] = []
    for name, value in values.items():
        out += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    return out


def train_args(cfg, run_dir: Path) -> List[str]:
    """The FlagEmbedding/HF flags, in a fixed order (the command is byte-stable across processes): a table of
    FlagEmbedding's arguments against our keys."""
    b, ws = cfg.backend, world_size(cfg)
    run_dir = Path(run_dir)
    a = _flags(
        model_name_or_path=_abs(cfg.model.path),
        output_dir=output_dir(cfg, run_dir),
        train_data=_abs(cfg.data.path),
        cache_path=run_dir / "cache" / "data",
        train_group_size=int(b.train_group_size),
        query_max_len=query_max_len(cfg),
        passage_max_len=passage_max_len(cfg),
        query_instruction_format=b.query_instruction_format,
    )
    if b.pad_to_multiple_of is not None:
        a += _flags(pad_to_multiple_of=int(b.pad_to_multiple_of))
    if cfg.max_samples:
        a += _flags(max_example_num_per_dataset=int(cfg.max_samples))
    if b.knowledge_distillation:
        a += _flags(knowledge_distillation=True)
    if b.task == "embedder":
        if b.query_instruction_for_retrieval is not None:
            a += _flags(query_instruction_for_retrieval=b.query_instruction_for_retrieval)
        a += _flags(
            temperature=float(b.temperature),
            sentence_pooling_method=b.sentence_pooling_method,
            normalize_embeddings=bool(b.normalize_embeddings),
            kd_loss_type=b.kd_loss_type,
        )
        if b.negatives_cross_device and ws > 1:
            a += _flags(negatives_cross_device=True)
    elif b.query_instruction_for_rerank is not None:
        a += _flags(query_instruction_for_rerank=b.query_instruction_for_rerank)
    a += _flags(
        learning_rate=float(cfg.learning_rate),
        num_train_epochs=float(cfg.num_epochs),
        per_device_train_batch_size=int(cfg.micro_batch_size),
        gradient_accumulation_steps=grad_accum(cfg),
        dataloader_drop_last=bool(b.dataloader_drop_last),
        warmup_ratio=float(cfg.warmup_ratio),
        weight_decay=float(cfg.weight_decay),
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=float(cfg.max_grad_norm),
        optim=cfg.optim,
        logging_steps=int(cfg.logging_steps),
        seed=int(cfg.seed),
        report_to="tensorboard" if wants(cfg.report_to, "tensorboard") else "none",  # mlflow/wandb: the driver
        disable_tqdm=True,
    )
    if int(cfg.max_steps) > 0:
        a += _flags(max_steps=int(cfg.max_steps))
    if int(cfg.save_steps) > 0:
        a += _flags(save_strategy="steps", save_steps=int(cfg.save_steps), save_total_limit=int(cfg.save_total_limit))
    else:
        a += _flags(save_strategy="no")
    if cfg.gradient_checkpointing:
        a += _flags(gradient_checkpointing=True)
    prec = str(cfg.hardware.precision)
    if prec in ("bf16", "fp16"):
        a += _flags(**{prec: True})
    if cfg.hardware.deepspeed_stage is not None:
        a += _flags(deepspeed=run_dir / "ds_config.json")
    elif cfg.hardware.device == "cpu":
        a += _flags(use_cpu=True)  # DeepSpeed picks its CPU accelerator itself (use_cpu off)
    if cfg.trust_remote_code:
        a += _flags(trust_remote_code=cfg.trust_remote_code)  # only when the user turned it on
    return a


def plan(cfg, run_dir, ctx) -> Plan:
    """The steps in the order they run: the retrieval evaluation before training, the training through
    FlagEmbedding's own entry point under our wrapper, the evaluation after."""
    run_dir = Path(run_dir)
    b = cfg.backend
    py = sys.executable
    conf = str(run_dir / RESOLVED_CONFIG)
    out = output_dir(cfg, run_dir)
    env = {
        "WANDB_MODE": "disabled",
        "TENSORBOARD_LOGGING_DIR": str(run_dir / "tensorboard"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    files, notes, steps = {}, [], []
    if cfg.hardware.deepspeed_stage is not None:
        files["ds_config.json"] = json.dumps(deepspeed_config(cfg), indent=2) + "\n"
    ws = world_size(cfg)
    if b.task == "embedder" and b.negatives_cross_device and ws == 1:
        notes.append("negatives_cross_device not passed: one process (FlagEmbedding needs torch.distributed for it)")
    if b.task == "reranker":
        notes.append(
            "reranker: temperature, sentence_pooling_method, normalize_embeddings, kd_loss_type, "
            "negatives_cross_device and query_instruction_for_retrieval are embedder-only; not passed"
        )
    notes.append("overwrite_output_dir not passed: transformers 5 has no such argument (each run has a fresh folder)")
    do_eval = bool(b.eval) and bool(cfg.data.eval_path)
    data_args = ["--train-data", _abs(cfg.data.path)]
    if do_eval:
        data_args += ["--eval-data", _abs(cfg.data.eval_path)]
        if cfg.data.corpus_path:
            data_args += ["--corpus", _abs(cfg.data.corpus_path)]

    def eval_step(stage: str, model: str, *extra: str) -> Step:
        """recall@k / MRR of a model on the held-out queries, before or after training (rank 0 only)."""
        argv = [py, "-m", "finetune.recipes.flagembedding_eval", "--config", conf, "--stage", stage, "--model", model]
        return Step(
            name=f"eval_{stage}", argv=[*argv, *data_args, *extra], env=env, rank0_only=True, preload=["FlagEmbedding"]
        )

    if do_eval:
        steps.append(eval_step("before", _abs(cfg.model.path)))
    elif b.eval:
        notes.append("no held-out set (data.eval_path is null): recall@k / MRR are not computed")
    # FlagEmbedding's own runner (MODULES[task] builds the same), wrapped for history.jsonl, tokens/s, complete-
    # checkpoint markers and resume (finetune/recipes/flagembedding.py)
    steps.append(
        Step(
            name="train",
            argv=[
                py,
                "-m",
                "finetune.recipes.flagembedding",
                "--task",
                str(b.task),
                "--run-dir",
                str(run_dir),
                "--device",
                str(cfg.hardware.device),
                *(["--resume"] if cfg.resume else []),
                "--",
                *train_args(cfg, run_dir),
            ],
            env=env,
            distributed="torchrun",
            progress=HISTORY,
            pausable=True,
            preload=["FlagEmbedding"],
        )
    )
    steps.append(eval_step("after", str(out), *([] if do_eval else ["--no-eval"])))
    return Plan(
        backend="flagembedding",
        steps=steps,
        files=files,
        notes=notes,
        outputs={"model": str(out), "eval": str(run_dir / "eval")},
    )


# ------------------------------------------------------------------------------------------------ collect


def collect(cfg, run_dir, ctx) -> dict:
    from finetune.history import read_history

    run_dir = Path(run_dir)
    out: dict = {"task": str(cfg.backend.task)}
    rows = read_history(run_dir)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    if losses:
        out.update(first_train_loss=losses[0], train_loss=losses[-1])
    after = run_dir / "eval" / "after.json"
    if not after.exists():
        raise RuntimeError(f"{after} is missing: the eval_after step did not write its results")
    a = json.loads(after.read_text())
    for k in (
        "total_params",
        "trainable_params",
        "train_runtime_s",
        "tokens_per_s",
        "train_samples_per_s",
        "train_loss_avg",
    ):
        if a.get(k) is not None:
            out[k] = a[k]
    before_p = run_dir / "eval" / "before.json"
    before = json.loads(before_p.read_text()) if before_p.exists() else {}
    for k, v in (a.get("metrics") or {}).items():
        out[f"eval_{k}"] = v
    for k, v in (before.get("metrics") or {}).items():
        out[f"base_eval_{k}"] = v
    if a.get("metrics") and before.get("metrics") and "mrr" in a["metrics"]:
        out["eval_mrr_gain"] = a["metrics"]["mrr"] - before["metrics"]["mrr"]
    return out
