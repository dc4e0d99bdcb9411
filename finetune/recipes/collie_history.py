"""The collie worker's Collie Trainer callback: <run>/history.jsonl rows and the per-epoch held-out loss.

Runs inside Collie's own environment (.venv-collie). A module of its own because it imports collie at the top:
finetune.recipes.collie's train() imports it only after finetune/compat/collie.py's patches are applied (the
patches must come before ``import collie``), and the main environment, which has no collie, still imports
finetune.recipes.collie.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from collie.callbacks.callback import Callback

from finetune.recipes.common import input_tokens, target_tokens


class History(Callback):
    """history.jsonl rows per optimizer step (loss averaged over its micro-batches) and per-epoch eval loss.
    Counts input tokens (every non-padding token: tokens/s as other tools count it) and supervised targets."""

    def __init__(
        self,
        *,
        path: Path,
        rank: int,
        dp: int,
        pp: int,
        total_steps: int,
        logging_steps: int,
        tokenizer,
        eval_ds,
        micro_batch_size: int,
    ):
        self.path, self.rank, self.dp, self.pp = path, rank, dp, pp
        self.total_steps, self.logging_steps, self.tokenizer = total_steps, logging_steps, tokenizer
        self.eval_ds, self.micro_batch_size = eval_ds, micro_batch_size
        self.window, self.tokens, self.win_tokens, self.last_step = [], 0, 0, 0
        self.targets = self.win_targets = 0
        self.t0 = self.t_last = time.time()
        self.rows = []

    def write(self, row):
        self.rows.append(row)
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_begin(self, trainer):
        self.t0 = self.t_last = time.time()

    def on_train_batch_begin(self, trainer, batch):
        n = input_tokens(batch, self.tokenizer.pad_token_id)
        t = target_tokens(batch["labels"]) if "labels" in batch else 0
        self.tokens += n
        self.win_tokens += n
        self.targets += t
        self.win_targets += t

    def on_train_batch_end(self, trainer, loss):
        self.window.append(float(loss))
        step = int(trainer.engine.global_steps)
        if step == self.last_step:
            return
        self.last_step = step
        now = time.time()
        row = self.step_row(trainer, step, now)
        self.window, self.win_tokens, self.win_targets, self.t_last = [], 0, 0, now
        if step % self.logging_steps == 0 or step == self.total_steps:
            self.write(row)
        if self.rank == 0:
            print(
                f"[collie] rank {self.rank} step {step} loss {row['loss']:.4f} lr {row['learning_rate']:.3g}",
                flush=True,
            )

    def step_row(self, trainer, step: int, now: float) -> dict:
        """The row of the optimizer step that just ended (its micro-batches are in the window)."""
        row = {
            "step": step,
            "total_steps": self.total_steps,
            "epoch": round(trainer.epoch_idx + (trainer.batch_idx + 1) / trainer.steps_per_epoch, 4),
            "loss": sum(self.window) / len(self.window),
            "learning_rate": float(trainer.lr),
            "tokens_per_s": self.win_tokens * self.dp / max(1e-9, now - self.t_last),
            "target_tokens_per_s": self.win_targets * self.dp / max(1e-9, now - self.t_last),
        }
        try:
            gn = trainer.engine.get_global_grad_norm()
            if gn is not None:
                row["grad_norm"] = float(gn)
        except Exception:  # noqa: BLE001 - not every engine computes it
            pass
        return row

    def on_train_epoch_end(self, trainer):
        if self.eval_ds is None or self.pp > 1:
            return
        value = eval_loss(trainer, self.eval_ds, self.micro_batch_size)
        self.write({"step": int(trainer.engine.global_steps), "epoch": trainer.epoch_idx + 1, "eval_loss": value})
        if self.rank == 0:
            print(f"[collie] epoch {trainer.epoch_idx + 1} eval_loss {value:.4f}", flush=True)


def eval_loss(trainer, eval_ds, micro: int) -> float:
    """Token-weighted loss over the whole held-out set, on every rank (tp ranks compute together)."""
    engine = trainer.engine
    engine.eval()
    tot, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_ds), micro):
            batch = trainer.train_dataset_collate_fn([eval_ds[j] for j in range(i, min(i + micro, len(eval_ds)))])
            out = engine(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            n = int((batch["labels"][..., 1:] != -100).sum())
            tot += float(trainer.loss_fn(out["logits"], batch["labels"])) * n
            count += n
    engine.train()
    return tot / max(1, count)
