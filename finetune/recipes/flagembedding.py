"""The flagembedding backend's train step: FlagEmbedding 1.4.2's own runner, as its entry modules build it
(``python -m FlagEmbedding.finetune.<embedder|reranker>.encoder_only.base <flags>``: the same argument parser,
runner and trainer), plus what every backend of this project gives:

- <run>/history.jsonl, live: one row per log event (step of total_steps, loss, learning rate, grad norm, input
  tokens/s counted from the batches' attention masks, peak RSS); the driver's progress line reads it;
- checkpoints in <run>/checkpoints/checkpoint-N (as every backend's; the trained model in its own folder, the
  flags' --output_dir) with complete-checkpoint markers (FINETUNE_COMPLETE, written after a checkpoint is saved, as
  the alpacalora recipe does); with ``--resume``, training continues from the newest complete checkpoint
  (incomplete ones, cut by a kill, are removed: they are this run's own);
- a pause on request (the driver's first Ctrl-C): a checkpoint at the end of the current step, exit 75;
- <run>/flagembedding_train.json: runtime, tokens, samples/s and the trainer's mean loss.

    python -m finetune.recipes.flagembedding --task embedder --run-dir R [--resume] [--device cuda] -- <flags>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from finetune.compat.flagembedding import save_processing_class
from finetune.compat.transformers import wrap_load_from_checkpoint, wrap_save
from finetune.config.derived import CHECKPOINTS
from finetune.recipes import common
from finetune.recipes.common import (
    COMPLETE,
    PAUSED_EXIT,
    TokenMeter,
    atomic_write_text,
    checkpoint_marker,
    log,
    require_device,
    truncate_history,
)


def _runner(task: str, flags):
    from transformers import HfArgumentParser

    if task == "embedder":
        from FlagEmbedding.finetune.embedder.encoder_only.base import (
            EncoderOnlyEmbedderDataArguments,
            EncoderOnlyEmbedderModelArguments,
            EncoderOnlyEmbedderRunner,
            EncoderOnlyEmbedderTrainingArguments,
        )

        classes = (
            EncoderOnlyEmbedderModelArguments,
            EncoderOnlyEmbedderDataArguments,
            EncoderOnlyEmbedderTrainingArguments,
        )
        runner_cls = EncoderOnlyEmbedderRunner
    else:
        from FlagEmbedding.abc.finetune.reranker import (
            AbsRerankerDataArguments,
            AbsRerankerModelArguments,
            AbsRerankerTrainingArguments,
        )
        from FlagEmbedding.finetune.reranker.encoder_only.base import EncoderOnlyRerankerRunner

        classes = (AbsRerankerModelArguments, AbsRerankerDataArguments, AbsRerankerTrainingArguments)
        runner_cls = EncoderOnlyRerankerRunner
    model_args, data_args, training_args = HfArgumentParser(classes).parse_args_into_dataclasses(args=list(flags))
    return runner_cls, model_args, data_args, training_args


def _save_gathered_weights(trainer) -> None:
    """Under ZeRO-3 the Trainer gathers the full 16-bit state dict on save (stage3_gather_16bit_weights_on_model_save)
    and passes it to _save, but FlagEmbedding's _save ignores it and saves self.model.state_dict(): the partitioned,
    empty parameters (a model.safetensors of 0-element tensors that looks complete). Save the gathered one, the rest
    as FlagEmbedding does (tokenizer, training_args.bin)."""
    ds = getattr(trainer.args, "hf_deepspeed_config", None)
    if ds is None or (ds.config.get("zero_optimization") or {}).get("stage") != 3:
        return

    def make(own_save):
        def save_gathered(output_dir=None, state_dict=None):
            if state_dict is None:
                return own_save(output_dir, state_dict)
            import torch

            output_dir = output_dir or trainer.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            encoder = trainer.model.model  # FlagEmbedding's wrapper holds the HF model as .model
            encoder.save_pretrained(
                output_dir,
                state_dict={k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")},
            )
            save_processing_class(trainer, output_dir)
            torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))
            log(f"ZeRO-3: saved the gathered weights ({len(state_dict)} tensors) to {output_dir}")

        return save_gathered

    wrap_save(trainer, make)


def _load_encoder_from_checkpoint(trainer) -> None:
    """Resume: FlagEmbedding saves a checkpoint's weights with the encoder's own save_pretrained (keys without the
    wrapper's "model." prefix), but transformers 5.6 loads them into the wrapper (every key missing, then
    AttributeError '..._keys_to_ignore_on_save'): load them into the encoder itself, strictly. The optimizer,
    scheduler and RNG states are restored by the Trainer as usual (DeepSpeed checkpoints load their own way)."""

    def make(own_load):
        def load_into_encoder(resume_from_checkpoint, model=None):
            weights = Path(resume_from_checkpoint) / "model.safetensors"
            if model is not None or getattr(trainer, "is_deepspeed_enabled", False) or not weights.is_file():
                return own_load(resume_from_checkpoint, model)
            from safetensors.torch import load_file

            trainer.model.model.load_state_dict(load_file(str(weights)), strict=True)
            log(f"resume: loaded the encoder's weights from {weights}")

        return load_into_encoder

    wrap_load_from_checkpoint(trainer, make)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.recipes.flagembedding")
    ap.add_argument("--task", choices=("embedder", "reranker"), required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the config's hardware.device")
    ap.add_argument("flags", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    run_dir = Path(args.run_dir)

    require_device({"device": args.device})  # GPU hardware: the job must see a GPU (not train on CPU)
    if "--deepspeed" in flags:
        common.deepspeed_env()  # one process under DeepSpeed: no MPI discovery
    runner_cls, model_args, data_args, training_args = _runner(args.task, flags)
    out = Path(training_args.output_dir)  # the trained model; checkpoints go where every backend's go
    ckpts = run_dir / CHECKPOINTS
    training_args.output_dir = str(ckpts)
    resume_from = None
    # --resume (resume=true), or FINETUNE_RESUME=1: a Slurm job rerun after preemption (finetune/launchers/slurm_job.py)
    if (args.resume or os.environ.get("FINETUNE_RESUME") == "1") and ckpts.is_dir():
        resume_from = common.last_complete_checkpoint(ckpts)
        for ckpt in ckpts.glob("checkpoint-*"):  # cut by a kill: never resumed from, this run's own
            if ckpt.is_dir() and ckpt != resume_from and not (ckpt / COMPLETE).exists():
                shutil.rmtree(ckpt)
        log(f"resuming from {resume_from}" if resume_from else "resume: no complete checkpoint; training from step 0")
    training_args.resume_from_checkpoint = str(resume_from) if resume_from else None
    if training_args.local_rank in (-1, 0):
        truncate_history(run_dir, int(resume_from.name.split("-")[1]) if resume_from else 0)

    runner = runner_cls(model_args=model_args, data_args=data_args, training_args=training_args)
    trainer = runner.trainer
    world = max(1, training_args.world_size)
    meter = TokenMeter(world)
    step, log_event = trainer.training_step, trainer.log

    def training_step(model, inputs, *a, **kw):
        meter.count(inputs)
        return step(model, inputs, *a, **kw)

    def log_with_throughput(logs, *a, **kw):
        if "loss" in logs:
            logs.update(meter.rates())
            logs["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
        return log_event(logs, *a, **kw)

    trainer.training_step, trainer.log = training_step, log_with_throughput
    _save_gathered_weights(trainer)
    _load_encoder_from_checkpoint(trainer)
    trainer.add_callback(common.history_callback(run_dir))
    trainer.add_callback(checkpoint_marker())
    pause = common.pause_callback()
    trainer.add_callback(pause)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the history callback prints one plain line per event
    t0 = time.perf_counter()
    # FlagEmbedding's runner.run(), with the final model saved to its own folder (not among the checkpoints)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if pause.paused_at is not None:
        log(f"paused: checkpoint-{pause.paused_at} saved in {ckpts}")
        return PAUSED_EXIT
    trainer.save_model(str(out))
    runtime = time.perf_counter() - t0
    if trainer.is_world_process_zero():
        final = next((h for h in reversed(trainer.state.log_history) if "train_loss" in h), {})
        runtime = final.get("train_runtime") or runtime  # the Trainer's own: training only, no saving
        summary = {
            "train_runtime_s": runtime,
            "train_tokens": meter.input * world,
            "tokens_per_s": meter.input * world / runtime if runtime > 0 else None,
            "train_samples_per_s": final.get("train_samples_per_second"),
            "train_loss_avg": final.get("train_loss"),
            "global_step": trainer.state.global_step,
            "resumed_from": str(resume_from) if resume_from else None,
            "peak_rss_mb": common.peak_rss_mb(),
        }
        atomic_write_text(run_dir / "flagembedding_train.json", json.dumps(summary, indent=1))
        log(f"saved {out}; {summary['global_step']} steps, tokens/s={summary['tokens_per_s'] or 0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
