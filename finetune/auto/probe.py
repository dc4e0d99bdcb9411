"""Measure the peak memory of a few real training steps and compare it with the estimate.

    python -m finetune.auto.probe MODEL_DIR [--method full|lora|freeze] [--mbs 4] [--seq 256] [--steps 3]
                                            [--gc] [--lora-r 8] [--targets q_proj,v_proj] [--save embed_tokens,lm_head]

Runs HF Trainer (+ PEFT for LoRA) on random token ids, on the CPU (or the first GPU with --cuda), and prints
one JSON line: peak RSS (CPU) or peak allocated memory (GPU), the RSS after the imports (the runtime constant),
and the estimator's figures for the same setup. Used by tests/test_auto.py to check the estimator; useful by hand
to calibrate it on a new machine. Heavy imports happen here, never at plan time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from finetune.osutil import peak_rss_bytes


def _peak_rss() -> int:
    return peak_rss_bytes()


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    """A few measured training steps for the estimator's calibration: arguments, model, HF Trainer steps on random
    ids, the peak memory and the estimate as one JSON line. Longer than 80 lines on purpose: a flat measurement
    script (like nanoGPT's), most of it its argparse options, read top to bottom."""
    ap = argparse.ArgumentParser(prog="python -m finetune.auto.probe")
    ap.add_argument("model")
    ap.add_argument("--method", default="full", choices=["full", "lora", "freeze"])
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--save", default="")
    ap.add_argument("--freeze-layers", type=int, default=2)
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args(argv)

    import peft  # noqa: F401  (imported for the LoRA case and so the runtime constant includes it)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    base_rss = _current_rss()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        save = [m for m in args.save.split(",") if m] or None
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.0,
                target_modules=args.targets.split(","),
                modules_to_save=save,
                task_type="CAUSAL_LM",
            ),
        )
    elif args.method == "freeze":
        n = args.freeze_layers
        layers = model.model.layers
        keep = set(range(len(layers) - n, len(layers))) if n > 0 else set(range(-n))
        for name, p in model.named_parameters():
            p.requires_grad = any(f"layers.{i}." in name for i in keep)
    vocab = model.config.vocab_size

    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return args.mbs * args.steps

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(4, vocab, (args.seq,), generator=g)
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    import tempfile

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.mbs,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            learning_rate=1e-4,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            optim="adamw_torch",
            use_cpu=not args.cuda,
            gradient_checkpointing=args.gc,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        t0 = time.time()
        trainer = Trainer(model=model, args=targs, train_dataset=Random())
        result = trainer.train()
        runtime = time.time() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    out = {
        "peak_rss": _peak_rss(),
        "base_rss": base_rss,
        "train_runtime_s": runtime,
        "losses": losses,
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_loss": result.training_loss,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.cuda:
        out["peak_cuda"] = torch.cuda.max_memory_allocated()

    from finetune.auto.estimator import ModelShape, Setup, estimate

    shape = ModelShape.from_path(args.model)
    est = estimate(
        shape,
        Setup(
            method=args.method,
            precision="fp32",
            device="cuda" if args.cuda else "cpu",
            micro_batch_size=args.mbs,
            seq_len=args.seq,
            gradient_checkpointing=args.gc,
            lora_r=args.lora_r,
            lora_targets=args.targets.split(","),
            modules_to_save=[m for m in args.save.split(",") if m],
            freeze_trainable_layers=args.freeze_layers,
        ),
    )
    out["estimate"] = est.to_dict()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
