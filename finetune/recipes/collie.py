"""The collie backend's worker: runs INSIDE Collie's own environment (.venv-collie), one process per rank.

    <venv-collie>/bin/python -m finetune.recipes.collie prepare --config <run>/resolved_config.json
    <venv-collie>/bin/python [-m torch.distributed.run ...] -m finetune.recipes.collie train --config ...

Imports only what that environment has (torch, transformers 4.50, peft, deepspeed, megatron-core, collie,
safetensors): no hydra, no omegaconf, nothing else from this repository but finetune/compat/collie.py. The resolved
config is read with json.

prepare  Collie's Llama loader reads only ``*.bin`` weights: when the model folder holds safetensors only (what
         transformers 5 writes), write a ``.bin`` copy to <run>/collie_base (config.json made readable by
         transformers 4.50, tokenizer files copied). Records the folder to load in <run>/collie_model.json.
train    Collie's own model class, CollieDatasetForTraining, Trainer (DeepSpeed engine), dp/tp/pp from the config.
         On a machine without a GPU, finetune/compat/collie.py patches are applied first (gloo, no .cuda()).
         Writes <run>/history.jsonl (rank 0: loss, learning_rate, grad_norm, tokens_per_s, eval_loss per epoch),
         the adapter in HF layout (target_path) or the full model (merge_path), <run>/collie_probe.json (Collie's
         own logits on fixed inputs, used to verify the exported weights) and <run>/collie_summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.config.derived import adapter_dir, grad_accum, merged_dir
from finetune.osutil import free_port, peak_rss_bytes
from finetune.recipes.common import read_config
from finetune.recipes.data import TOKENIZER_FILES as DATA_TOKENIZER_FILES
from finetune.run_files import HISTORY, RUN_DIR_KEY

PROMPTS = {
    # alpaca-lora's templates/alpaca.json and alpaca_short.json
    "alpaca": {
        "prompt_input": "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    },
    "alpaca_short": {
        "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    },
}
# model.family -> Collie's model class (chatglm3 has ChatGLM2's architecture)
MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "internlm": "InternLMForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "chatglm2": "ChatGLM2ForCausalLM",
    "chatglm3": "ChatGLM2ForCausalLM",
    "moss": "MossForCausalLM",
}
# the tokenizer files every recipe copies (finetune/recipes/data.py), and the generation config Collie's save lacks
TOKENIZER_FILES = DATA_TOKENIZER_FILES + ("generation_config.json",)
PROBE_ROWS = 2


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[collie] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- prepare


def prepare(cfg: dict, run_dir: Path) -> int:
    src = Path(cfg["model"]["path"])
    meta = json.loads((src / "config.json").read_text())
    out = {"source": str(src), "path": str(src), "converted": False}
    if not list(src.glob("*.bin")):
        import torch
        from safetensors.torch import load_file

        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            print(f"collie: {src} has neither *.bin nor *.safetensors weights", file=sys.stderr)
            return 1
        dst = run_dir / "collie_base"
        dst.mkdir(parents=True, exist_ok=True)
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        torch.save(state, dst / "pytorch_model.bin")
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)
        tc = dst / "tokenizer_config.json"
        if tc.exists():  # transformers 5 names its fast tokenizer "TokenizersBackend"; 4.50 knows it as
            t = json.loads(tc.read_text())  # PreTrainedTokenizerFast (same tokenizer.json)
            if t.get("tokenizer_class") == "TokenizersBackend":
                t["tokenizer_class"] = "PreTrainedTokenizerFast"
                tc.write_text(json.dumps(t, indent=2))
        out.update(path=str(dst), converted=True, tensors=len(state))
    else:
        dst = None
    # transformers >= 5 writes "dtype" and "rope_parameters"; 4.50 reads "torch_dtype" and "rope_theta".
    rope = meta.get("rope_parameters") or {}
    theta = meta.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    if meta.get("model_type") == "llama" and (
        float(theta) != 10000.0 or rope_type != "default" or meta.get("rope_scaling")
    ):
        # collie/models/llama/model.py RotaryPositionEmbedding hard-codes base 10000 and no scaling
        print(
            f"collie: model {src.name} uses rope_theta={theta} rope_type={rope_type}; Collie 1.0.7's Llama "
            "hard-codes rope base 10000 without scaling and would train a different model",
            file=sys.stderr,
        )
        return 1
    if dst is not None:
        meta = dict(meta)
        meta.setdefault("rope_theta", float(theta))
        if "dtype" in meta:
            meta.setdefault("torch_dtype", meta["dtype"])
        meta.pop("rope_parameters", None)
        (dst / "config.json").write_text(json.dumps(meta, indent=2))
    write_json(run_dir / "collie_model.json", out)
    log(f"model for Collie: {out['path']} (converted from safetensors: {out['converted']})")
    return 0


# ----------------------------------------------------------------------------------------------- data


def load_rows(cfg: dict) -> list:
    """The training rows, read as validation read them (finetune/sources.py: data.path's first max_samples rows, or
    the alpaca datasets of a dataset_info.json, mixed)."""
    from finetune.sources import train_rows

    return train_rows(cfg)


def split_rows(cfg: dict, rows: list):
    v = float(cfg.get("val_set_size") or 0)
    n_eval = int(v) if v >= 1 else int(round(v * len(rows)))
    n_eval = min(n_eval, len(rows) // 2)
    order = list(range(len(rows)))
    random.Random(int(cfg["seed"])).shuffle(order)
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    return train_rows, eval_rows


def to_collie(rows: list, template: dict, eos: str, train_on_inputs: bool) -> list:
    """Alpaca rows -> CollieDatasetForTraining rows: {"text"} (loss on all tokens) or {"input", "output"}."""
    out = []
    for r in rows:
        key = "prompt_input" if r.get("input") else "prompt_no_input"
        prompt = template[key].format(instruction=r.get("instruction", ""), input=r.get("input", ""))
        answer = str(r.get("output", "")) + eos
        out.append({"text": prompt + answer} if train_on_inputs else {"input": prompt, "output": answer})
    return out


# ----------------------------------------------------------------------------------------------- train


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))  # cosine

    return f


def _collie_to_hf_rows(w, heads: int):
    """Undo Collie's load-time q/k row permutation: Collie stores rows as (h t two), HF Llama as (h two t)."""
    from einops import rearrange

    return rearrange(w, "(h t two) r -> (h two t) r", h=heads, two=2).contiguous()


def reduce_device(dist) -> str:
    """Where a tensor for a collective must live: NCCL reduces only CUDA tensors ("No backend type associated with
    device type cpu"), gloo CPU ones."""
    import torch

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def set_distributed_env() -> None:
    """A single process started without torchrun: the variables torch.distributed and DeepSpeed read."""
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


@dataclass(frozen=True)
class Parallel:
    """Data / tensor / pipeline parallel sizes, the micro batch and the gradient accumulation that makes up
    batch_size over the data-parallel ranks."""

    dp: int
    tp: int
    pp: int
    micro: int
    accum: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Parallel":
        b = cfg["backend"]
        dp, micro = int(b["dp_size"]), int(cfg["micro_batch_size"])
        return cls(
            dp=dp, tp=int(b["tp_size"]), pp=int(b["pp_size"]), micro=micro, accum=grad_accum(cfg, data_parallel=dp)
        )


def deepspeed_config(cfg: dict) -> dict:
    hw = cfg["hardware"]
    ds = {"steps_per_print": 10**9, "zero_optimization": {"stage": int(hw.get("deepspeed_stage") or 0)}}
    if float(cfg.get("max_grad_norm") or 0) > 0:
        ds["gradient_clipping"] = float(cfg["max_grad_norm"])
    if hw.get("precision") == "bf16":
        ds["bf16"] = {"enabled": True}
    elif hw.get("precision") == "fp16":
        ds["fp16"] = {"enabled": True}
    return ds


def _name_list(value):
    """A comma-separated string or a list -> a list of names."""
    return [t for t in value.split(",") if t] if isinstance(value, str) else list(value)


def lora_config(cfg: dict):
    """PEFT's LoraConfig for Collie (target "all": the model's linear modules)."""
    from peft import LoraConfig, TaskType

    meth = cfg["method"]
    targets = _name_list(meth["lora_target_modules"])
    if targets == ["all"]:
        targets = list(cfg["model"].get("all_linear_modules") or [])
    mts = meth.get("modules_to_save")
    mts = _name_list(mts) if isinstance(mts, str) or mts else None
    return LoraConfig(
        r=int(meth["lora_r"]),
        lora_alpha=meth["lora_alpha"],
        lora_dropout=float(meth["lora_dropout"]),
        target_modules=targets,
        modules_to_save=mts,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def build_collie_config(cfg: dict, model_path: str, par: Parallel):
    """CollieConfig: parallel sizes, batch, epochs, checkpointing, seed, the DeepSpeed config and LoRA."""
    from collie import CollieConfig

    config = CollieConfig.from_pretrained(model_path, trust_remote_code=bool(cfg.get("trust_remote_code")))
    config.dp_size, config.tp_size, config.pp_size = par.dp, par.tp, par.pp
    config.train_epochs = int(cfg["num_epochs"])
    config.train_micro_batch_size = par.micro
    config.gradient_accumulation_steps = par.accum
    config.eval_batch_size = par.micro
    config.checkpointing = bool(cfg.get("gradient_checkpointing"))
    config.use_flash = False  # flash_attn is not in requirements-collie.lock
    config.seed = int(cfg["seed"])
    config.ds_config = deepspeed_config(cfg)
    if cfg["method"]["uses_lora"]:
        config.peft_config = lora_config(cfg)
    return config


def load_tokenizer(cfg: dict, model_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=bool(cfg.get("trust_remote_code")))
    except ValueError as e:  # a transformers-5 tokenizer_config.json next to *.bin weights
        if "TokenizersBackend" not in str(e):
            raise
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_path)


@dataclass
class Data:
    template: dict
    train_rows: list
    eval_rows: list
    train_ds: object  # CollieDatasetForTraining
    eval_ds: object  # CollieDatasetForTraining, or None without held-out rows


def setup_data(cfg: dict, tokenizer) -> Data:
    """Alpaca rows split into train / held out (seeded), prompted with the template, as Collie datasets."""
    from collie import CollieDatasetForTraining

    template = PROMPTS[cfg.get("prompt_template_name") or "alpaca"]
    train_rows, eval_rows = split_rows(cfg, load_rows(cfg))
    eos = tokenizer.eos_token or ""
    cutoff = int(cfg.get("cutoff_len") or -1)
    on_inputs = bool(cfg.get("train_on_inputs", True))
    train_ds = CollieDatasetForTraining(to_collie(train_rows, template, eos, on_inputs), tokenizer, max_length=cutoff)
    eval_ds = (
        CollieDatasetForTraining(to_collie(eval_rows, template, eos, on_inputs), tokenizer, max_length=cutoff)
        if eval_rows
        else None
    )
    return Data(template, train_rows, eval_rows, train_ds, eval_ds)


def setup_model(cfg: dict, model_path: str, config, par: Parallel):
    """Collie's own model class for model.family; returns (model, total parameters, trainable parameters)."""
    import collie

    model_cls = getattr(collie, MODEL_CLASSES[cfg["model"].get("family", "llama")])
    model = model_cls.from_pretrained(model_path, config=config)
    if hasattr(model, "set_cache"):
        model.set_cache(False)
    if cfg["method"]["uses_lora"] and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(
        f"model {type(model).__name__}: {total} parameters on this rank, {trainable} trainable; "
        f"dp={par.dp} tp={par.tp} pp={par.pp} micro_batch={par.micro} accumulation={par.accum}"
    )
    return model, total, trainable


def optimizer_steps(train_rows: int, par: Parallel, epochs: int) -> int:
    micro_per_epoch = math.ceil(train_rows / (par.micro * par.dp))
    if par.pp == 1:  # DeepSpeed counts micro-batches across epochs and steps every `accum` of them
        return max(1, micro_per_epoch * epochs // par.accum)
    # under pipeline parallelism one Collie batch is a whole optimizer step
    return max(1, math.ceil(train_rows / (par.micro * par.accum * par.dp)) * epochs)


def build_optimizer(cfg: dict, model, total_steps: int):
    """AdamW over the trainable parameters and the LR schedule (warmup, then constant / linear / cosine)."""
    import torch

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=float(cfg["learning_rate"]),
        weight_decay=float(cfg.get("weight_decay") or 0.0),
    )
    warmup = int(float(cfg.get("warmup_ratio") or 0) * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg["lr_scheduler_type"], warmup, total_steps))
    return optimizer, scheduler


def fresh_history(run_dir: Path, rank: int) -> Path:
    """<run>/history.jsonl, emptied: Collie always trains from step 0 (a rerun of a requeued job): no duplicate rows."""
    history = run_dir / HISTORY
    if rank == 0 and history.exists():
        history.write_text("")
    return history


def logits_probe(trainer, tokenizer, data: Data) -> dict:
    """Collie's own logits on fixed inputs: the exported adapter / model must reproduce them. Computed in fp32 on
    the engine's device (its weights cast up for the probe, then back): collie_merge recomputes them in fp32 from
    the same 16-bit-rounded weights, so the 1e-3 check stays meaningful under bf16/fp16 training (bf16 compute
    alone moves logits by ~6e-3) and still catches a wrong q/k layout (~0.3)."""
    import torch

    rows = (data.eval_rows or data.train_rows)[:PROBE_ROWS]
    texts = [to_collie([r], data.template, "", True)[0]["text"] for r in rows]
    trainer.engine.eval()
    module = trainer.engine.module
    train_dtype = next(module.parameters()).dtype
    dev = next(module.parameters()).device
    module.float()
    logits = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt")["input_ids"].to(dev)
            out = module(input_ids=ids)["logits"][0].float().cpu().tolist()
            logits.append((ids[0].tolist(), out))
    module.to(train_dtype)
    return {
        "input_ids": [x[0] for x in logits],
        "logits": [x[1] for x in logits],
        "train_dtype": str(train_dtype).replace("torch.", ""),
    }


def save_outputs(cfg: dict, run_dir: Path, trainer, config, source: str, rank: int) -> None:
    """The adapter in HF layout (target_path) or the full model with its config and tokenizer (merge_path).
    Collie's saves are collectives: every rank takes part, rank 0 writes the export."""
    target, merge = adapter_dir(cfg, run_dir), merged_dir(cfg, run_dir)
    if cfg["method"]["uses_lora"]:
        raw = run_dir / "collie_adapter"
        trainer.save_peft(str(raw))
        if rank == 0:
            export_adapter(raw, target, config, source)
    else:
        trainer.save_model(str(merge))  # writes HF-layout *.bin
        if rank == 0:
            src = Path(source)
            for name in ("config.json",) + TOKENIZER_FILES:
                if (src / name).exists() and not (merge / name).exists():
                    shutil.copy2(src / name, merge / name)


def tokens_over_ranks(history) -> tuple:
    """(input tokens, target tokens) summed over every rank."""
    import torch
    import torch.distributed as dist

    tokens = torch.tensor([float(history.tokens), float(history.targets)], device=reduce_device(dist))
    if dist.is_initialized():
        dist.all_reduce(tokens)
    tokens = tokens.cpu()
    return float(tokens[0]), float(tokens[1])


def write_summary(
    run_dir: Path,
    *,
    total: int,
    trainable: int,
    par: Parallel,
    runtime: float,
    tokens: tuple,
    data: Data,
    steps: int,
    patches: list,
) -> None:
    """<run>/collie_summary.json (rank 0). Tokens/s counts each sample once: tp x pp ranks share a batch."""
    import collie
    import torch

    shared = par.tp * par.pp
    write_json(
        run_dir / "collie_summary.json",
        {
            "total_params": total,
            "trainable_params": trainable,
            "params_counted_per_rank": shared > 1,
            "train_runtime_s": runtime,
            "tokens_per_s": tokens[0] / shared / max(1e-9, runtime),
            "target_tokens_per_s": tokens[1] / shared / max(1e-9, runtime),
            "peak_rss_mb": peak_rss_bytes() / 2**20,
            "train_rows": len(data.train_rows),
            "eval_rows": len(data.eval_rows),
            "optimizer_steps": steps,
            "gradient_accumulation_steps": par.accum,
            "dp_size": par.dp,
            "tp_size": par.tp,
            "pp_size": par.pp,
            "cpu_patches": patches,
            "collie_version": getattr(collie, "__version__", "1.0.7"),
            "torch_version": torch.__version__,
            "world_size": int(os.environ["WORLD_SIZE"]),
        },
    )


def train(cfg: dict, run_dir: Path) -> int:
    set_distributed_env()
    from finetune.compat import collie as collie_compat

    patches = collie_compat.apply((cfg.get("hardware") or {}).get("device", "cpu"))  # before importing collie
    import torch.distributed as dist
    from collie import Trainer

    speedup = collie_compat.speed_up_rotary()

    from finetune.recipes.collie_history import History

    rank = int(os.environ["RANK"])
    if patches:
        log(f"no GPU: applied CPU patches {patches}")
    log(f"applied {speedup} (Collie's rotary table, the rows each call uses only)")
    model_info = json.loads((run_dir / "collie_model.json").read_text())
    par = Parallel.from_config(cfg)
    config = build_collie_config(cfg, model_info["path"], par)
    tokenizer = load_tokenizer(cfg, model_info["path"])
    data = setup_data(cfg, tokenizer)
    model, total, trainable = setup_model(cfg, model_info["path"], config, par)
    total_steps = optimizer_steps(len(data.train_ds), par, config.train_epochs)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    history = History(
        path=fresh_history(run_dir, rank),
        rank=rank,
        dp=par.dp,
        pp=par.pp,
        total_steps=total_steps,
        logging_steps=max(1, int(cfg.get("logging_steps") or 1)),
        tokenizer=tokenizer,
        eval_ds=data.eval_ds,
        micro_batch_size=par.micro,
    )
    trainer = Trainer(
        model=model,
        config=config,
        tokenizer=tokenizer,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        train_dataset=data.train_ds,
        callbacks=[history],
    )
    t0 = time.time()
    trainer.train()
    runtime = time.time() - t0

    probe = logits_probe(trainer, tokenizer, data) if par.pp == 1 else None
    save_outputs(cfg, run_dir, trainer, config, model_info["source"], rank)
    tokens = tokens_over_ranks(history)
    if rank == 0:
        if probe is not None:
            write_json(run_dir / "collie_probe.json", probe)
        steps = int(trainer.engine.global_steps)
        write_summary(
            run_dir,
            total=total,
            trainable=trainable,
            par=par,
            runtime=runtime,
            tokens=tokens,
            data=data,
            steps=steps,
            patches=patches,
        )
        log(f"done: {steps} optimizer steps in {runtime:.1f}s")
    if dist.is_initialized():
        dist.barrier()
    return 0


def export_adapter(raw: Path, target: Path, config, base_path: str) -> None:
    """Collie's save_peft output -> a PEFT adapter for the HF model: q/k lora_B rows back to HF's layout."""
    import torch
    from safetensors.torch import save_file

    files = sorted(raw.glob("adapter_model*.bin"))
    if not files:
        raise FileNotFoundError(f"Collie's save_peft wrote no adapter_model*.bin in {raw}: {sorted(os.listdir(raw))}")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    fixed = 0
    for key in list(state):
        if key.endswith("q_proj.lora_B.weight") or key.endswith("k_proj.lora_B.weight"):
            state[key] = _collie_to_hf_rows(state[key], heads if "q_proj" in key else kv_heads)
            fixed += 1
        else:
            state[key] = state[key].contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    acfg = json.loads((raw / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = base_path
    (target / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    log(f"adapter: {len(state)} tensors ({fixed} q/k lora_B converted to HF row layout) -> {target}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["prepare", "train"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True, help="model folder (absolute)")
    ap.add_argument("--data", required=True, help="data file or folder (absolute); '' for data=llamafactory")
    ap.add_argument("--target", required=True, help="adapter folder (absolute)")
    ap.add_argument("--merge", required=True, help="merged / full model folder (absolute)")
    args = ap.parse_args()
    cfg = read_config(args.config)
    cfg = cfg.with_values(
        {"model.path": args.model, "data.path": args.data or None, "target_path": args.target, "merge_path": args.merge}
    )
    run_dir = Path(cfg[RUN_DIR_KEY])
    return prepare(cfg, run_dir) if args.action == "prepare" else train(cfg, run_dir)


if __name__ == "__main__":
    sys.exit(main())
