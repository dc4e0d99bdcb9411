"""A plain hand-written LoRA SFT script of the kind users write (HF datasets + Trainer + PEFT, alpaca prompt,
DataCollatorForSeq2Seq with dynamic padding, library defaults otherwise). The baseline for bench/throughput.py.

    python bench/baseline_hf_sft.py --model M --data D.json --out O --max-steps 10 --batch 16 --micro 4

Prints one JSON line: real (unmasked target) tokens/s, eval loss, peak RSS, runtime.
"""

import argparse
import json
import time

import torch
import transformers
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--max-steps", type=int, default=10)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--micro", type=int, default=4)
ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--cutoff", type=int, default=256)
ap.add_argument("--val", type=int, default=64)
ap.add_argument("--max-samples", type=int, default=None)
ap.add_argument("--seed", type=int, default=42)
a = ap.parse_args()

transformers.set_seed(a.seed)
tok = AutoTokenizer.from_pretrained(a.model)
data = load_dataset("json", data_files=a.data)["train"]
if a.max_samples:
    data = data.select(range(a.max_samples))


def tokenize(row):
    p = (PROMPT if row["input"] else PROMPT_NO_INPUT).format(**row) + row["output"]
    ids = tok(p, truncation=True, max_length=a.cutoff)["input_ids"]
    if len(ids) < a.cutoff:
        ids = ids + [tok.eos_token_id]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


split = data.train_test_split(test_size=a.val, shuffle=True, seed=42)
# the training rows in the split's order, as our recipe keeps them: the Trainer's sampler (seeded) shuffles both
# sides the same way, so the two see the same batches and their losses compare (alpaca-lora shuffles once more here)
train = split["train"].map(tokenize, remove_columns=data.column_names)
val = split["test"].map(tokenize, remove_columns=data.column_names)

model = AutoModelForCausalLM.from_pretrained(a.model)
model = get_peft_model(
    model,
    LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules="all-linear",  # every linear layer of the decoder (PEFT leaves the output layer out)
        task_type="CAUSAL_LM",
    ),
)
tokens = {"n": 0}


class T(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens["n"] += int((inputs["labels"][:, 1:] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)


class FromFirstStep(transformers.TrainerCallback):
    """Time from the first step, as our recipe does (optimizer and engine set-up left out on both sides)."""

    def on_train_begin(self, args, state, control, **kw):
        tokens["t_begin"] = time.perf_counter()


args = TrainingArguments(
    output_dir=a.out,
    per_device_train_batch_size=a.micro,
    per_device_eval_batch_size=a.micro,
    gradient_accumulation_steps=a.batch // a.micro,
    max_steps=a.max_steps,
    learning_rate=a.lr,
    warmup_steps=0.1,
    lr_scheduler_type="cosine",
    logging_steps=1,
    eval_strategy="no",
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=a.seed,
    disable_tqdm=True,
)
trainer = T(
    model=model,
    args=args,
    train_dataset=train,
    eval_dataset=val,
    data_collator=DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    callbacks=[FromFirstStep()],
)
t0 = time.perf_counter()
out = trainer.train()
runtime = time.perf_counter() - tokens.get("t_begin", t0)
ev = trainer.evaluate()


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would include the parent's peak: Linux keeps it across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


print(
    json.dumps(
        {
            "tokens_per_s": tokens["n"] / runtime,
            "train_tokens": tokens["n"],
            "train_runtime_s": runtime,
            "eval_loss": ev["eval_loss"],
            "train_loss": out.training_loss,
            "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
        }
    )
)
