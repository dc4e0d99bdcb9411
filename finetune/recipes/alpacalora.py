"""The alpaca-lora recipe on HF Trainer + PEFT, every tuning method. main() at the bottom reads as the recipe, one
step per line; each step is a plain function above it, with explicit arguments and return values:

    config -> setup_process -> setup_tokenizer -> setup_data (prompt template, label masking, held-out split)
           -> TrainingArguments -> setup_model (model + method) -> build_trainer (optimizer per method, checkpoints)
           -> resume_point -> train (+ a final evaluation) -> save_artefact -> write_summary

Run by the alpacalora backend as its own process (no Hydra here):

    python -m finetune.recipes.alpacalora --config <run>/resolved_config.json            # one process
    python -m torch.distributed.run --nproc_per_node 2 -m finetune.recipes.alpacalora ...  # data parallel (gloo)

Writes into the run folder: history.jsonl (one row per log event), tensorboard/, checkpoints/checkpoint-N
(complete ones carry a FINETUNE_COMPLETE marker written last), the adapter in target_path (LoRA methods) or
the whole model in merge_path (full, freeze, GaLore, BAdam), and train_summary.json (parameter counts, real
tokens/s, peak RSS, runtime). The merge of a LoRA adapter is a separate plan step (finetune.recipes.merge).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Optional

# Heavy libraries at the top: this module is only ever run as the worker process (python -m ...). What main() puts
# in the environment first (DeepSpeed's rank variables, OMP_NUM_THREADS, TensorBoard's folder) is read later, when
# TrainingArguments and DeepSpeed are set up.
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from finetune.compat.transformers import SaveCheckpointHook, attn_implementation, set_attn_implementation
from finetune.config.derived import CHECKPOINTS, adapter_dir, grad_accum, merged_dir
from finetune.recipes import padding_free
from finetune.recipes.common import (
    COMPLETE,
    PAUSED_EXIT,
    TokenMeter,
    atomic_write_bytes,
    atomic_write_text,
    deepspeed_env,
    history_callback,
    last_complete_checkpoint,
    log,
    pause_callback,
    peak_rss_mb,
    quiet_false_tying_warning,
    read_config,
    require_device,
    truncate_history,
)
from finetune.recipes.data import Collator, pack_examples, split_train_val, tokenized_data
from finetune.recipes.lora_speed import apply as apply_lora_speed
from finetune.run_files import RUN_DIR_KEY, TRAIN_SUMMARY

EAGER_MAX_LEN = padding_free.EAGER_MAX_LEN  # attention auto on CPU: eager up to this length, SDPA above (measured)


# ---------------------------------------------------------------------------------------------- method set-up


def all_linear_modules(model) -> list:
    """LLaMA-Factory's find_all_linear_modules: last name segment of every *Linear* module except lm_head.
    Not PEFT's target_modules="all-linear": on Llama and SmolLM2, tied or not, it wraps the same layers, but it
    writes every full module path into adapter_config.json on small models (<= 20 of them) instead of these
    names, it also takes Conv1D layers, and it leaves out the output layer only as get_output_embeddings() reports
    it (None for remote-code models without an lm_head attribute, e.g. ChatGLM3's output_layer). GaLore's "all"
    uses this list too."""
    names = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        last = name.split(".")[-1]
        if "Linear" in cls and "Embedding" not in cls and last not in ("lm_head", "output_layer", "output"):
            names.add(last)
    return sorted(names)


def as_list(v):
    if v is None:
        return None
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return list(v)


def setup_freeze(model, m: dict) -> None:
    """LLaMA-Factory's freeze tuning, but matched on module-path segments (so 'norm' is the final norm only,
    not every input_layernorm): the last n (n > 0) or first |n| (n < 0) decoder layers, optionally only some of
    their sub-modules, plus extra modules outside the layers."""
    n_layers = model.config.num_hidden_layers
    n = int(m["freeze_trainable_layers"])
    layer_ids = set(range(max(0, n_layers - n), n_layers)) if n > 0 else set(range(min(-n, n_layers)))
    in_layer, outside = set(), set()
    for name, _ in model.named_parameters():
        seg = name.split(".")
        idx = next((i for i, s in enumerate(seg) if s.isdigit()), None)
        if idx is None:
            outside.update(seg[:-1])
        elif idx + 1 < len(seg) - 1:
            in_layer.add(seg[idx + 1])
    modules = None if m["freeze_trainable_modules"] in ("all", None) else as_list(m["freeze_trainable_modules"])
    for mod in modules or []:
        if mod not in in_layer:
            raise ValueError(
                f"method.freeze_trainable_modules: module {mod!r} not found; choose from {sorted(in_layer)}"
            )
    extras = as_list(m.get("freeze_extra_modules")) or []
    for mod in extras:
        if mod not in outside:
            raise ValueError(f"method.freeze_extra_modules: module {mod!r} not found; choose from {sorted(outside)}")
    for name, p in model.named_parameters():
        seg = name.split(".")
        idx = next((i for i, s in enumerate(seg) if s.isdigit()), None)
        if idx is None:
            p.requires_grad_(any(s in extras for s in seg[:-1]))
        else:
            p.requires_grad_(int(seg[idx]) in layer_ids and (modules is None or seg[idx + 1] in modules))
    log(f"freeze: trainable layers {sorted(layer_ids)}, modules {modules or 'all'}, extra {extras}")


def tied_embedding_names(model):
    """(input embedding name, output layer name) when the model shares one matrix between them, else None."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or not getattr(model.config, "tie_word_embeddings", False) or out.weight is not inp.weight:
        return None
    names = {id(mod): name.split(".")[-1] for name, mod in model.named_modules()}
    return names[id(inp)], names[id(out)]


def modules_to_save_for(model, wanted):
    """(modules_to_save, ensure_weight_tying). On a tied model, naming the embedding and/or the output layer means
    the one shared matrix: it is trained once, as the input embedding, with PEFT's ensure_weight_tying, so that the
    output layer stays the same matrix in the adapter and in the merge. (PEFT 0.18.1 with both names trains two
    independent copies and the merged model comes out untied; with lm_head alone and ensure_weight_tying it fails.
    ensure_weight_tying is never set on an untied model: 0.18.1 would overwrite its lm_head with the embedding.)"""
    tied = tied_embedding_names(model)
    if not wanted or tied is None or not set(wanted) & set(tied):
        return wanted or None, False
    normalised = [w for w in wanted if w not in tied] + [tied[0]]
    log(
        f"tied embeddings: modules_to_save {wanted} -> {normalised} with ensure_weight_tying (the shared "
        f"{tied[0]}/{tied[1]} matrix is trained once and stays tied in the adapter and the merged model)"
    )
    return normalised, True


def setup_lora(model, m: dict):
    from peft import LoraConfig, get_peft_model

    targets = as_list(m["lora_target_modules"])
    if targets == ["all"]:
        targets = all_linear_modules(model)
    tied = tied_embedding_names(model)
    if tied and set(targets) & set(tied):
        raise ValueError(
            f"lora_target_modules: {sorted(set(targets) & set(tied))} is tied to "
            f"{'/'.join(tied)}: LoRA on it would be merged into the shared matrix; use modules_to_save"
        )
    init = True
    if m.get("pissa_init"):
        init = "pissa" if int(m["pissa_iter"]) == -1 else f"pissa_niter_{int(m['pissa_iter'])}"
    to_save, tie = modules_to_save_for(model, as_list(m.get("modules_to_save")))
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=int(m["lora_r"]),
        lora_alpha=m["lora_alpha"],
        lora_dropout=float(m["lora_dropout"]),
        target_modules=targets,
        bias="none",
        modules_to_save=to_save,
        use_rslora=bool(m.get("use_rslora")),
        use_dora=bool(m.get("use_dora")),
        init_lora_weights=init,
        **({"ensure_weight_tying": True} if tie else {}),
    )
    log(
        f"LoRA: r={config.r} alpha={config.lora_alpha} targets={targets} modules_to_save={config.modules_to_save} "
        f"rslora={config.use_rslora} dora={config.use_dora} init={init}"
    )
    quiet_false_tying_warning(model)
    return get_peft_model(model, config)


def keep_modules_to_save(model, adapter_dir: Path) -> None:
    """PEFT's PiSSA conversion (save_pretrained with path_initial_model_for_weight_conversion) keeps only the
    lora_A/lora_B tensors (LoraModel.subtract_mutated_init; unchanged up to PEFT 0.21), so the trained
    modules_to_save copies (embed_tokens, lm_head) are dropped while adapter_config.json still lists them, and
    loading the adapter fails (KeyError '...embed_tokens.weight'). They need no conversion (PiSSA changes only the
    LoRA target layers): write them back into the converted adapter, unchanged."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save

    # cloned: a tied model's embed_tokens and lm_head entries are one tensor (ensure_weight_tying), which
    # safetensors refuses to write twice ("Some tensors share memory"); PEFT's own save writes them as copies too
    extra = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items() if "lora_" not in k}
    if not extra:
        return
    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors.update({k: v for k, v in extra.items() if k not in tensors})
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    log(f"PiSSA conversion: kept the trained {', '.join(sorted({k.split('.')[-2] for k in extra}))} in the adapter")


def decay_parameter_names(model) -> set:
    """The parameters that get weight decay: LLaMA-Factory's rule (every parameter outside torch LayerNorm layers,
    biases excluded; RMSNorm weights do decay). HF Trainer's own default also exempts *norm* names, so the groups
    are built here, for every optimizer we build."""
    from transformers.trainer_pt_utils import get_parameter_names

    try:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    except ImportError:  # pragma: no cover
        ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    return {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}


def decay_groups(named, decay: set, weight_decay: float) -> list:
    """[no-decay group, decay group] of the trainable (name, parameter) pairs."""
    return [
        dict(params=[p for n, p in named if n not in decay], weight_decay=0.0),
        dict(params=[p for n, p in named if n in decay], weight_decay=weight_decay),
    ]


def loraplus_optimizer(model, args, m: dict):
    """LoRA+ (LLaMA-Factory's grouping): B matrices (and 1-d weights) at loraplus_lr_ratio x the learning rate,
    LoRA-on-embedding B matrices at loraplus_lr_embedding, the rest (A matrices, modules_to_save) at the learning
    rate. Not PEFT's create_loraplus_optimizer: in peft 0.18.1 its embedding group is always empty (it asks
    isinstance(param, lora.Embedding) of the parameter, not of its module; huggingface/peft#3499, fixed after
    0.18.1 by #3503), so lora_embedding_B would train at the plain learning rate instead of loraplus_lr_embedding.
    Without LoRA on an embedding the groups, learning rates and weight decay are the same (checked)."""
    optim_cls, kw = Trainer.get_optimizer_cls_and_kwargs(args)
    ratio, lr, decay = float(m["loraplus_lr_ratio"]), args.learning_rate, decay_parameter_names(model)
    groups = {"lora_a": [], "lora_b": [], "lora_b_nodecay": [], "embedding": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_embedding_B" in n:
            groups["embedding"].append(p)
        elif "lora_B" in n or p.ndim == 1:
            groups["lora_b" if n in decay else "lora_b_nodecay"].append(p)
        else:
            groups["lora_a"].append(p)
    param_groups = [
        dict(params=groups["lora_a"], lr=lr, weight_decay=args.weight_decay),
        dict(params=groups["lora_b"], lr=lr * ratio, weight_decay=args.weight_decay),
        dict(params=groups["lora_b_nodecay"], lr=lr * ratio, weight_decay=0.0),
        dict(
            params=groups["embedding"], lr=float(m.get("loraplus_lr_embedding", 1e-6)), weight_decay=args.weight_decay
        ),
    ]
    log(f"LoRA+: B learning rate x{ratio}")
    return optim_cls([g for g in param_groups if g["params"]], **kw)


def galore_optimizer(model, args, m: dict):
    """LLaMA-Factory's GaLore (galore-torch): the 2-d weights of the target Linear layers projected to rank
    galore_rank, the rest plain, weight decay as for every other method. Not transformers' optim="galore_adamw"
    (used for the layer-wise variant): in transformers 5.6.0 it builds GaLoreAdamW with lr only (eps 1e-6, its
    default, instead of adam_epsilon 1e-8) and groups without weight decay, and its "all-linear" also projects an
    untied lm_head; the loss curves would differ."""
    from galore_torch import GaLoreAdafactor, GaLoreAdamW

    targets = as_list(m["galore_target"])
    if targets == ["all"]:
        targets = all_linear_modules(model)
    galore = [
        p
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and any(t in name for t in targets)
        for p in mod.parameters()
        if p.requires_grad and p.ndim > 1
    ]
    ids = {id(p) for p in galore}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    _, kw = Trainer.get_optimizer_cls_and_kwargs(args)
    optim_cls = {"adamw_torch": GaLoreAdamW, "adafactor": GaLoreAdafactor}.get(args.optim)
    if optim_cls is None:
        raise ValueError(f"GaLore runs with optim adamw_torch or adafactor, not {args.optim}")
    gk = dict(
        rank=int(m["galore_rank"]),
        update_proj_gap=int(m["galore_update_interval"]),
        scale=float(m["galore_scale"]),
        proj_type=m["galore_proj_type"],
    )
    log(f"GaLore: {len(galore)} projected matrices, {gk}")
    return optim_cls(
        [
            *decay_groups(rest, decay_parameter_names(model), args.weight_decay),
            dict(params=galore, weight_decay=args.weight_decay, **gk),
        ],
        **kw,
    )


def badam_optimizer(model, args, m: dict):
    """LLaMA-Factory's BAdam: one block of layers trained at a time (layer mode, switched every
    badam_switch_interval steps) or a random share of each weight (ratio mode, embeddings excluded)."""
    optim_cls, kw = Trainer.get_optimizer_cls_and_kwargs(args)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = decay_groups(named, decay_parameter_names(model), args.weight_decay)
    if m["badam_mode"] == "layer":
        from badam import BlockOptimizer

        log(f"BAdam layer mode: switch every {m['badam_switch_interval']} steps, {m['badam_switch_mode']}")
        return BlockOptimizer(
            base_optimizer=optim_cls(groups, **kw),
            named_parameters_list=list(model.named_parameters()),
            block_prefix_list=None,
            switch_block_every=int(m["badam_switch_interval"]),
            start_block=m.get("badam_start_block"),
            switch_mode=m["badam_switch_mode"],
            verbose=int(m["badam_verbose"]),
        )
    from badam import BlockOptimizerRatio

    log(f"BAdam ratio mode: update ratio {m['badam_update_ratio']}, mask {m['badam_mask_mode']}")
    kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}
    return BlockOptimizerRatio(
        param_groups=groups,
        named_parameters_list=list(model.named_parameters()),
        update_ratio=float(m["badam_update_ratio"]),
        mask_mode=m["badam_mask_mode"],
        verbose=int(m["badam_verbose"]),
        include_embedding=False,
        **kw,
    )


def custom_optimizer(model, args, m: dict):
    """LLaMA-Factory's create_custom_optimizer: LoRA+, GaLore, BAdam; None = the HF default (every other method,
    and layer-wise GaLore, which TrainingArguments.optim=galore_*_layerwise builds)."""
    if m.get("loraplus_lr_ratio"):
        return loraplus_optimizer(model, args, m)
    if m.get("use_galore"):
        return None if m.get("galore_layerwise") else galore_optimizer(model, args, m)
    if m.get("use_badam"):
        return badam_optimizer(model, args, m)
    return None


def save_generation_files(cfg: dict, tokenizer, folder: Path) -> None:
    """Beside the adapter (or the trained model): the tokenizer, a generation config whose EOS/pad are the
    tokenizer's, and how prompts were built (finetune_prompt.json), so that `finetune generate <folder>` and the
    merged model (finetune.recipes.merge copies them) ask the model the way it was trained."""
    from transformers import GenerationConfig

    from finetune.recipes.prompting import PromptFormat

    tokenizer.save_pretrained(str(folder))
    base = Path(cfg["model"]["path"])
    gen = (
        GenerationConfig.from_pretrained(str(base))
        if (base / "generation_config.json").exists()
        else GenerationConfig()
    )
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen.save_pretrained(str(folder))
    PromptFormat.from_run_config(cfg).to_file(folder)


def numel(p) -> int:
    """A parameter's size, also when ZeRO-3 partitioned it at load (its local tensor is then empty) or bitsandbytes
    packed it in 4 bits (two weights a byte: the quantisation state knows the real shape)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return int(shape.numel())
    return int(getattr(p, "ds_numel", 0) or p.numel())


def quantization_kwargs(m: dict, hw: dict, dtype) -> dict:
    """QLoRA: the from_pretrained arguments that load the frozen base quantised by bitsandbytes (4-bit NF4/FP4 with
    its compute in the run's precision, or 8-bit), on this process's device; {} for every other method."""
    bits = m.get("quantization_bit")
    if not bits:
        return {}
    from transformers import BitsAndBytesConfig

    if int(bits) == 4:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=m.get("quantization_type") or "nf4",
            bnb_4bit_use_double_quant=bool(m.get("double_quantization", True)),
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    device = int(os.environ.get("LOCAL_RANK", "0")) if hw["device"] == "cuda" else "cpu"
    return {"quantization_config": q, "device_map": {"": device}}


def prepare_quantized(model, gradient_checkpointing: bool):
    """PEFT's preparation of a quantised model for training (norms and other 16-bit layers in fp32, input grads for
    checkpointing). On a CPU with avx512_bf16, bitsandbytes 0.50.2 repacks 4-bit weights in place for its CPU
    inference kernel whenever a layer runs without grad in eval mode (the held-out evaluation), which asserts on
    layers whose size is not a multiple of 32 and leaves the packed weights for the next training step: keep its
    training kernel for evaluation too (the same weights, the same numbers)."""
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def training_arguments(cfg: dict, world: int, ds_config, has_eval: bool) -> dict:
    """The HF TrainingArguments of a run, as keyword arguments (a plain dict: the GPU paths are checked on a CPU by
    building it for a GPU hardware config). Precision: bf16 or fp16 mixed precision (fp16 with the GradScaler's loss
    scaling) on trainable weights kept in fp32; under DeepSpeed the same flags fill its "auto" bf16/fp16 blocks."""
    m, b, hw = cfg["method"], cfg["backend"], cfg["hardware"]
    seed, eval_steps, save_steps = int(cfg["seed"]), int(cfg["eval_steps"]), int(cfg["save_steps"])
    optim_kw = {"optim": cfg["optim"]}
    if m.get("use_galore") and m.get("galore_layerwise"):
        # one optimizer per parameter, stepped from its post-accumulate-grad hook as soon as its gradient exists,
        # so that only one layer's gradients live at a time (transformers' implementation of LLaMA-Factory's
        # layer-wise GaLore; single process, no gradient accumulation: both checked at compose time)
        names = {"adamw_torch": "galore_adamw_layerwise", "adafactor": "galore_adafactor_layerwise"}
        targets = as_list(m["galore_target"])
        optim_kw = dict(
            optim=names[cfg["optim"]],
            optim_target_modules="all-linear" if targets == ["all"] else targets,
            optim_args=f"rank={int(m['galore_rank'])},update_proj_gap={int(m['galore_update_interval'])},"
            f"scale={float(m['galore_scale'])},proj_type={m['galore_proj_type']}",
        )
    report = cfg["report_to"] if isinstance(cfg["report_to"], list) else [cfg["report_to"]]
    return dict(
        output_dir=str(Path(cfg[RUN_DIR_KEY]) / CHECKPOINTS),
        per_device_train_batch_size=int(cfg["micro_batch_size"]),
        per_device_eval_batch_size=int(cfg["micro_batch_size"]),
        gradient_accumulation_steps=grad_accum(cfg, data_parallel=world),
        num_train_epochs=float(cfg["num_epochs"]),
        max_steps=int(cfg["max_steps"]),
        learning_rate=float(cfg["learning_rate"]),
        warmup_steps=float(cfg["warmup_ratio"]),  # < 1: a ratio of the total steps (transformers 5)
        lr_scheduler_type=cfg["lr_scheduler_type"],
        weight_decay=float(cfg["weight_decay"]),
        max_grad_norm=float(cfg["max_grad_norm"]),
        **optim_kw,
        logging_steps=int(cfg["logging_steps"]),
        eval_strategy=("steps" if eval_steps > 0 else "epoch") if has_eval else "no",
        eval_steps=eval_steps or None,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps or 500,
        save_total_limit=int(cfg["save_total_limit"]) or None,
        # tensorboard here; mlflow / wandb are logged by the driver from history.jsonl (finetune/tracking/)
        report_to=[r for r in report if r == "tensorboard"],
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length" if b.get("group_by_length") and not b.get("packing") else "random",
        dataloader_num_workers=int(b.get("dataloader_num_workers") or 0),
        bf16=hw["precision"] == "bf16",
        fp16=hw["precision"] == "fp16",
        use_cpu=hw["device"] == "cpu" and not ds_config,
        ddp_backend="gloo" if hw["device"] == "cpu" and world > 1 else None,
        ddp_find_unused_parameters=False if world > 1 else None,
        deepspeed=ds_config or None,
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),
    )


# ---------------------------------------------------------------------------------------------- the Trainer


@dataclass
class RunState:
    """What the Trainer and its callbacks share with the recipe: the trainable parameter count (counted at set-up,
    recounted once the optimizer exists), when training began, and the time spent outside training."""

    trainable: int
    t_begin: Optional[float] = None  # set-up done (optimizer, DeepSpeed's engine, JIT-built ops)
    other_s: float = 0.0  # evaluations and checkpoint saves: tokens/s leaves them out

    @contextlib.contextmanager
    def not_training(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.other_s += time.perf_counter() - t


class RecipeTrainer(SaveCheckpointHook, Trainer):
    """HF Trainer + our optimizer choice, per-batch attention choice, real-token counting, tokens/s and peak RSS in
    every log event, and complete-checkpoint markers."""

    def __init__(self, *a, method: dict, meter: TokenMeter, run_state: RunState, attention_config=None, **kw):
        self.method, self.meter, self.run_state = method, meter, run_state
        self.attention_config = attention_config  # the model config whose attention switches per batch
        super().__init__(*a, **kw)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = custom_optimizer(self.model, self.args, self.method)
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    def compute_loss(self, model, inputs, *a, **kw):
        if self.attention_config is not None:
            impl = "eager" if inputs["input_ids"].shape[-1] <= EAGER_MAX_LEN else "sdpa"
            set_attn_implementation(self.attention_config, impl)
        return super().compute_loss(model, inputs, *a, **kw)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.meter.count(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs, *a, **kw):
        if "loss" in logs:
            logs.update(self.meter.rates())  # input tokens/s and supervised target tokens/s, all ranks
            logs["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return super().log(logs, *a, **kw)

    def evaluate(self, *a, **kw):
        with self.run_state.not_training():
            return super().evaluate(*a, **kw)

    def around_save_checkpoint(self, save):
        with self.run_state.not_training():
            save()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            if self.args.should_save:  # written last, atomically: the checkpoint is complete
                step_dir = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                atomic_write_text(step_dir / COMPLETE, str(time.time()))


class TrainingBegins(TrainerCallback):
    """Once the optimizer exists: the trainable count (BAdam freezes all but the active block there), the optimizer
    in use, and the start of the training clock."""

    def __init__(self, trainer: Trainer, run_state: RunState):
        self.trainer, self.run_state = trainer, run_state

    def on_train_begin(self, args, state, control, model=None, **kw):
        n = sum(numel(p) for p in self.trainer.model.parameters() if p.requires_grad)
        if n != self.run_state.trainable:
            log(f"trainable parameters after the optimizer set-up: {n:,}")
        self.run_state.trainable = n
        inner = getattr(getattr(self.trainer, "deepspeed", None), "basic_optimizer", None)
        log(
            f"optimizer: {type(self.trainer.optimizer).__name__}"
            + (f" (DeepSpeed, over {type(inner).__name__})" if inner is not None else "")
        )
        self.run_state.t_begin = time.perf_counter()


# ---------------------------------------------------------------------------------------------- the recipe steps


def deepspeed_config(cfg: dict, run_dir: Path) -> Optional[str]:
    """The DeepSpeed JSON of the run (the plan's generated file), with DeepSpeed's one-process environment."""
    ds_config = cfg["backend"].get("deepspeed") or os.environ.get("FINETUNE_DEEPSPEED")
    if ds_config and not os.path.isabs(ds_config):
        ds_config = str(run_dir / ds_config)
    if ds_config:
        deepspeed_env()
    return ds_config or None


def setup_process(cfg: dict, world: int) -> float:
    """Device check (GPU hardware where this process sees no GPU: stop here), library log level; returns the peak
    RSS once the libraries are loaded (their share of the peak: the rest is model, data and training state). The
    thread count is the launcher's (OMP_NUM_THREADS, said in the step log's first lines)."""
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(cfg[RUN_DIR_KEY]) / "tensorboard"))
    require_device(cfg["hardware"])
    libs_rss = peak_rss_mb()
    log(f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    transformers.logging.set_verbosity_warning()
    return libs_rss


def setup_tokenizer(cfg: dict):
    """The model's tokenizer with a pad token distinct from EOS when the model has one (the reference uses id 0,
    unk)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["path"], trust_remote_code=cfg["trust_remote_code"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def setup_data(cfg: dict, tokenizer):
    """Template -> tokens + labels (train_on_inputs), cutoff_len + EOS, cached; held-out split (seed 42); packing."""
    b = cfg["backend"]
    examples = tokenized_data(cfg, tokenizer)
    held_out = cfg["data"].get("eval_dataset")
    if held_out:  # a dataset held out for evaluation: val_set_size is not used
        train_set, val_set = examples, tokenized_data(cfg, tokenizer, which="eval")
    else:
        train_set, val_set = split_train_val(examples, float(cfg["val_set_size"]), seed=42)
    log(
        f"data: {len(examples)} examples -> {len(train_set)} train, {len(val_set)} held out "
        + (f"(the dataset {held_out}) " if held_out else "")
        + f"(train_on_inputs={cfg['train_on_inputs']}, cutoff_len={cfg['cutoff_len']}, "
        f"template={cfg['prompt_template_name']})"
    )
    if b.get("packing"):
        n_examples = len(train_set)
        train_set = pack_examples(train_set, int(cfg["cutoff_len"]), seed=int(cfg["seed"]))
        log(
            f"packing: {n_examples} training examples -> {len(train_set)} rows of <= {cfg['cutoff_len']} tokens "
            f"(no attention across examples; the held-out set stays unpacked)"
        )
    if b.get("show_prompt") and int(os.environ.get("RANK", "0")) == 0:
        print(tokenizer.decode(train_set[0]["input_ids"]), flush=True)
    return train_set, val_set


def load_model(cfg: dict, dtype):
    """from_pretrained in the run's precision (under ZeRO-3 already partitioned: the TrainingArguments built before
    hold the DeepSpeed config it reads), quantised for QLoRA."""
    m, hw = cfg["method"], cfg["hardware"]
    attn = cfg["backend"].get("attn_implementation") or "auto"
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model"]["path"],
        dtype=dtype,
        trust_remote_code=cfg["trust_remote_code"],
        **({} if attn == "auto" else {"attn_implementation": attn}),
        **quantization_kwargs(m, hw, dtype),
    )
    model.config.use_cache = False
    partitioned = sum(1 for p in model.parameters() if hasattr(p, "ds_id"))
    if partitioned:
        log(f"ZeRO-3: weights loaded partitioned across the ranks ({partitioned} parameters, deepspeed.zero.Init)")
    return model


def attention_to_switch(cfg: dict, model):
    """Attention auto on CPU: per batch, eager up to EAGER_MAX_LEN tokens, SDPA above; returns the model config
    whose attention the Trainer switches, or None. Measured here (30M Llama, bf16, 4 sequences, forward+backward
    tokens/s, eager vs sdpa): 112 tokens 1748 vs 1581, 256: 1779 vs 1746, 512: 1280 vs 1459, 1024: 598 vs 1572.
    Both give the same loss (within 1e-6); the switch is a config attribute the attention layers read on every
    call."""
    attn = cfg["backend"].get("attn_implementation") or "auto"
    if attn != "auto" or cfg["hardware"]["device"] != "cpu" or attn_implementation(model.config) != "sdpa":
        return None
    log(f"attention: auto on CPU: eager for batches up to {EAGER_MAX_LEN} tokens, sdpa above")
    return model.config


def use_padding_free(cfg: dict, model) -> bool:
    """backend.padding_free: true/false as set; null (auto) on CPU, for the model types padding_free supports,
    with attention auto and no packing. true on a model it cannot train is refused."""
    b = cfg["backend"]
    want = b.get("padding_free")
    reason = padding_free.unsupported_reason(model.config, int(cfg["cutoff_len"]))
    if want is None:
        auto = cfg["hardware"]["device"] == "cpu" and (b.get("attn_implementation") or "auto") == "auto"
        return auto and not b.get("packing") and reason is None
    if want and reason:
        raise ValueError(f"backend.padding_free=true: {reason}; allowed: false or null (auto)")
    return bool(want) and not b.get("packing")


def setup_model(cfg: dict, ds_config) -> tuple:
    """(model with the method applied, the config whose attention switches per batch or None, the attention to
    restore after training when the batches are padding-free, else None). Seeded BEFORE loading and wrapping, so
    LoRA/PiSSA init and reruns are bitwise identical."""
    m, hw = cfg["method"], cfg["hardware"]
    transformers.set_seed(int(cfg["seed"]))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hw["precision"], torch.float32)
    model = load_model(cfg, dtype)
    restore_attention = None
    if use_padding_free(cfg, model):
        restore_attention = attn_implementation(model.config)
        set_attn_implementation(model.config, padding_free.register())
        log(
            "batches: padding-free (each micro-batch one row without padding, attention within each example: "
            f"{padding_free.ATTENTION}; backend.padding_free=false pads instead)"
        )
        attention_config = None
    else:
        attention_config = attention_to_switch(cfg, model)
    if dtype != torch.float32:
        log(f"precision: {hw['precision']} mixed (frozen weights {hw['precision']}, trainable weights fp32, autocast)")
    quantized = bool(m.get("quantization_bit"))
    if quantized:
        model = prepare_quantized(model, bool(cfg["gradient_checkpointing"]))
        log(
            f"QLoRA: base loaded in {m['quantization_bit']}-bit"
            + (
                f" {m.get('quantization_type')} (double quantisation {bool(m.get('double_quantization'))})"
                if int(m["quantization_bit"]) == 4
                else ""
            )
            + f", compute {dtype}; the merge uses the full-precision base"
        )
    if m.get("uses_lora"):
        model = setup_lora(model, m)
    elif m["finetuning_type"] == "freeze":
        setup_freeze(model, m)
    else:  # full, GaLore, BAdam: every weight is a candidate
        for p in model.parameters():
            p.requires_grad_(True)
    mixed = dtype != torch.float32 and not ds_config and not quantized
    if mixed:
        # mixed precision as LLaMA-Factory does it: frozen weights stay 16-bit (half the memory, no cast per
        # matmul), the weights the optimizer updates are fp32, the Trainer's autocast runs the matmuls in 16 bits
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if m.get("uses_lora"):
        apply_lora_speed(model, mixed_precision=mixed)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        if m.get("uses_lora"):
            model.enable_input_require_grads()
    return model, attention_config, restore_attention


def build_trainer(
    cfg: dict,
    model,
    args,
    tokenizer,
    train_set,
    val_set,
    *,
    attention_config,
    run_state: RunState,
    world: int,
    flatten: bool = False,
):
    """The Trainer: batch = micro x accumulation x world, cosine with warmup, checkpoints, tensorboard, our history
    callback (one plain line per event, instead of HF's printer), BAdam's callback and gradient clipping."""
    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=Collator(tokenizer.pad_token_id, flatten=flatten),
        callbacks=[history_callback(Path(cfg[RUN_DIR_KEY]))],
        method=cfg["method"],
        meter=TokenMeter(world, tokenizer.pad_token_id),
        run_state=run_state,
        attention_config=attention_config,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingBegins(trainer, run_state))
    trainer.pause = pause_callback()  # the driver's first Ctrl-C: a complete checkpoint, then stop
    trainer.add_callback(trainer.pause)
    if cfg["method"].get("use_badam"):  # as LLaMA-Factory: BAdam's sparse (ratio) gradients need its own clipping
        from badam import BAdamCallback, clip_grad_norm_old_version

        trainer.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, trainer.accelerator)
        trainer.add_callback(BAdamCallback)
    return trainer


def save_pissa_init(cfg: dict, trainer, model) -> Optional[Path]:
    """PiSSA with conversion: the initial adapter, kept so that the final one can be converted into a plain LoRA
    delta; its folder, or None for every other method."""
    m, pissa_init_dir = cfg["method"], Path(cfg[RUN_DIR_KEY]) / "pissa_init"
    if not (m.get("uses_lora") and m.get("pissa_init") and m.get("pissa_convert")):
        return None
    if trainer.args.should_save and not (pissa_init_dir / "adapter_config.json").exists():
        init = model.peft_config["default"].init_lora_weights
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(pissa_init_dir))
        model.peft_config["default"].init_lora_weights = init
    return pissa_init_dir


def resume_point(trainer, run_dir: Path) -> Optional[Path]:
    """The last complete checkpoint of this run folder (re-run or resume=true), history.jsonl cut back to it."""
    ckpt_dir = Path(trainer.args.output_dir)
    resume_from = last_complete_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if resume_from is not None:
        step = int(resume_from.name.split("-")[1])
        log(f"resuming from {resume_from} (step {step})")
        if trainer.args.should_save:
            truncate_history(run_dir, step)
    elif trainer.args.should_save:
        truncate_history(run_dir, 0)
    return resume_from


@dataclass
class Timing:
    output: Any  # the Trainer's TrainOutput
    runtime_s: float  # trainer.train() as a whole
    compute_s: float  # from the first step to the end, without the evaluations and checkpoint saves


def train(trainer, run_state: RunState, resume_from: Optional[Path], has_eval: bool) -> Timing:
    """Train (from the checkpoint, if any), then a final evaluation if the last step had none."""
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    t_end = time.perf_counter()
    begin = run_state.t_begin if run_state.t_begin is not None else t0
    timing = Timing(output=out, runtime_s=t_end - t0, compute_s=t_end - begin - run_state.other_s)
    hist = trainer.state.log_history
    if trainer.pause.paused_at is not None:
        return timing  # paused: no final evaluation (the resumed run makes it)
    if has_eval and not any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in hist):
        trainer.evaluate()
    return timing


def save_artefact(cfg: dict, trainer, model, tokenizer, pissa_init_dir: Optional[Path]) -> Path:
    """The adapter (LoRA methods; PiSSA converted to a plain LoRA) or the whole model, with the files `finetune
    generate` and the merge read; its folder."""
    run_dir, uses_lora = Path(cfg[RUN_DIR_KEY]), bool(cfg["method"].get("uses_lora"))
    target, merged = adapter_dir(cfg, run_dir), merged_dir(cfg, run_dir)
    artefact = target if uses_lora else merged
    if pissa_init_dir is not None:  # (PiSSA is refused under ZeRO-3, so rank 0 holds the whole adapter)
        if trainer.args.should_save:
            model.save_pretrained(str(target), path_initial_model_for_weight_conversion=str(pissa_init_dir))
            keep_modules_to_save(model, target)
    else:
        trainer.save_model(str(artefact))  # every rank calls it: under ZeRO-3 it gathers the shards; rank 0 writes
    if trainer.args.should_save:
        save_generation_files(cfg, tokenizer, artefact)
    return artefact


def write_summary(
    cfg: dict,
    trainer,
    run_state: RunState,
    timing: Timing,
    *,
    total: int,
    libs_rss: float,
    resume_from: Optional[Path],
    artefact: Path,
) -> None:
    """train_summary.json: parameter counts, losses, real tokens/s over the training time, peak RSS, runtime."""
    meter, world, train_s = trainer.meter, trainer.meter.world, timing.compute_s
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "method": cfg["method"]["name"],
        "total_params": int(total),
        "trainable_params": int(run_state.trainable),
        "train_loss": losses[-1] if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "global_step": trainer.state.global_step,
        "train_runtime_s": timing.runtime_s,
        "train_compute_s": train_s,
        "train_tokens": meter.input * world,
        "train_target_tokens": meter.target * world,
        "tokens_per_s": meter.input * world / train_s if train_s > 0 else None,
        "target_tokens_per_s": meter.target * world / train_s if train_s > 0 else None,
        "precision": cfg["hardware"]["precision"],
        "peak_rss_mb": peak_rss_mb(),
        "libraries_rss_mb": libs_rss,
        "training_rss_mb": peak_rss_mb() - libs_rss,
        "world_size": world,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "artefact": str(artefact),
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "train_examples": len(trainer.train_dataset),
        "eval_examples": len(trainer.eval_dataset or []),
        "mean_train_loss_hf": timing.output.training_loss,
    }
    atomic_write_text(Path(cfg[RUN_DIR_KEY]) / TRAIN_SUMMARY, json.dumps(summary, indent=1))
    shown = {k: summary[k] for k in ("train_loss", "eval_loss") if summary[k] is not None}
    if (
        summary["train_loss"] is None and summary["mean_train_loss_hf"] is not None
    ):  # said once, with the reason and the fix (the driver's completion line too)
        shown["mean_train_loss"] = summary["mean_train_loss_hf"]
    log(
        f"saved {artefact}; "
        + " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        + f" tokens/s={summary['tokens_per_s']:.1f} peak_rss={summary['peak_rss_mb']:.0f} MiB"
        + ("" if losses else f" (no loss logged: logging_steps={cfg['logging_steps']})")
    )


# ---------------------------------------------------------------------------------------------- the recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.recipes.alpacalora")
    ap.add_argument("--config", required=True, help="<run>/resolved_config.json written by the driver")
    cfg = read_config(ap.parse_args(argv).config)
    run_dir = Path(cfg[RUN_DIR_KEY])  # every path in the config is absolute (resolved at validation)
    m = cfg["method"]

    # 1. process: DeepSpeed's environment, device, threads
    ds_config = deepspeed_config(cfg, run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    libs_rss = setup_process(cfg, world)

    # 2. tokenizer and data
    tokenizer = setup_tokenizer(cfg)
    train_set, val_set = setup_data(cfg, tokenizer)

    # 3. Trainer arguments BEFORE the model: under ZeRO-3 they hold the DeepSpeed config that from_pretrained reads
    #    (is_deepspeed_zero3_enabled) to load the weights already partitioned (deepspeed.zero.Init), instead of every
    #    rank loading the whole model into host memory
    args = TrainingArguments(**training_arguments(cfg, world, ds_config, has_eval=bool(val_set)))
    if m.get("use_galore") and m.get("galore_layerwise"):
        log(
            f"GaLore layer-wise: {args.optim}, targets {args.optim_target_modules}, {args.optim_args} (the logged "
            "grad norm is 0: gradients are consumed by the per-layer steps; optimizer moments are not checkpointed, "
            "so a resumed run restarts them)"
        )

    # 4. model + method, 5. Trainer
    model, attention_config, restore_attention = setup_model(cfg, ds_config)
    total = sum(numel(p) for p in model.parameters())
    run_state = RunState(trainable=sum(numel(p) for p in model.parameters() if p.requires_grad))
    trainer = build_trainer(
        cfg,
        model,
        args,
        tokenizer,
        train_set,
        val_set,
        attention_config=attention_config,
        run_state=run_state,
        world=world,
        flatten=restore_attention is not None,
    )
    log(
        f"parameters: {run_state.trainable:,} trainable of {total:,} ({100 * run_state.trainable / total:.3f}%), "
        f"method={m['name']}, world={world}, accumulation={args.gradient_accumulation_steps}"
    )
    pissa_init_dir = save_pissa_init(cfg, trainer, model)

    # 6. train (resumed from the last complete checkpoint of this run folder), evaluate, save, summarise
    resume_from = resume_point(trainer, run_dir)
    timing = train(trainer, run_state, resume_from, has_eval=bool(val_set))
    if restore_attention is not None:  # the saved model and any later use attend as loaded
        set_attn_implementation(model.config, restore_attention)
    if trainer.pause.paused_at is not None:
        log(f"paused: checkpoint-{trainer.pause.paused_at} saved in {args.output_dir}")
        return PAUSED_EXIT
    artefact = save_artefact(cfg, trainer, model, tokenizer, pissa_init_dir)
    if trainer.args.should_save:
        write_summary(
            cfg, trainer, run_state, timing, total=total, libs_rss=libs_rss, resume_from=resume_from, artefact=artefact
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
