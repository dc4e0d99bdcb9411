"""Structured-config schemas: one dataclass per config-group option, registered in Hydra's ConfigStore.

Only the standard library and omegaconf/hydra are imported here, so composing and validating stay fast.

Layout of the composed config:
  top-level short keys (lora_r, learning_rate, ...)   -- the keys users type; groups read them by interpolation
  backend.*   model.*   method.*   hardware.*   data.*   launcher.*

Each group option's YAML file (conf/<group>/<option>.yaml) starts with a defaults entry naming its schema,
e.g. ``- /schema/method/lora@_here_``, so a typo or a wrong type in that file or in an override fails at
compose time.

A field's allowed values and help sit next to it, in the dataclass field's metadata (``arg(default, help,
choices)``, as LLaMA-Factory's ``field(metadata={"help": ...})``); validation and the backends read them back with
``choices(Schema, "field")``, so each list of allowed values is written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from omegaconf import MISSING


def arg(default: Any, help: str = "", choices: Optional[Sequence] = None) -> Any:  # noqa: A002 - LLaMA-Factory's name
    """A dataclass field whose help and allowed values live in its metadata (read by ``choices``)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):  # a fresh copy for each instance
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choices(schema, name: str) -> Tuple:
    """The allowed values declared on ``schema.name`` (arg(..., choices=...))."""
    for f in dataclasses.fields(schema):
        if f.name == name:
            return f.metadata["choices"]
    raise KeyError(f"{schema.__name__} has no field {name!r}")


# --------------------------------------------------------------------------------------------------- tracking


@dataclass
class MlflowTracking:
    uri: Optional[str] = arg(None, "null: $MLFLOW_TRACKING_URI, else the local store outputs/mlflow/mlflow.db")
    experiment: Optional[str] = arg(None, "null: $MLFLOW_EXPERIMENT_NAME, else the config name (`name`)")
    log_adapter: bool = arg(False, "also upload the trained adapter as the run's artifact")


@dataclass
class WandbTracking:
    project: Optional[str] = arg(None, "null: $WANDB_PROJECT, else the config name (`name`)")
    entity: Optional[str] = arg(None, "null: your default entity")
    mode: str = arg(
        "auto", "auto: online with an API key and W&B reachable, else offline", choices=("auto", "offline", "online")
    )


@dataclass
class TrackingConfig:
    """report_to=mlflow / wandb (finetune/tracking/): where runs are logged. Read by the driver only."""

    mlflow: MlflowTracking = field(
        default_factory=MlflowTracking,
        metadata={"help": "report_to=mlflow: the tracking URI, the experiment, and whether the adapter is uploaded"},
    )
    wandb: WandbTracking = field(
        default_factory=WandbTracking,
        metadata={"help": "report_to=wandb: the project, the entity and the mode (online / offline)"},
    )
    flush_s: float = arg(2.0, "seconds between two reads of history.jsonl while a step runs")


# --------------------------------------------------------------------------------------------------- root


@dataclass
class RootConfig:
    """Top-level keys. The defaults below are the alpacalora backend's (the reference's AlpacaloraFinetune);
    other backends set their own for these (conf/backend/*.yaml, package _global_)."""

    name: str = arg(
        "run",
        "run name: part of the run folder's name (outputs/runs/<date>/<time>-<name>), the default MLflow experiment, "
        "W&B project and Slurm job name",
    )
    seed: int = arg(42, "random seed of training (initialisation, shuffling, sampling) on every backend")
    # --- optimisation
    learning_rate: float = arg(5e-4, "peak learning rate of the optimizer, on every backend")
    num_epochs: float = arg(
        2.0, "training epochs, may be fractional (collie: whole epochs only); max_steps > 0 overrides it"
    )
    max_steps: int = arg(-1, "> 0 overrides num_epochs")
    batch_size: int = arg(64, "global batch (all ranks, after accumulation)")
    micro_batch_size: int = arg(4, "per rank, per forward pass")
    cutoff_len: int = arg(
        1030,
        "max tokens per training example, longer ones are truncated (flagembedding: backend.query_max_len / "
        "passage_max_len instead)",
    )
    val_set_size: float = arg(200, ">= 1: number of held-out rows; in (0, 1): fraction; 0: none")
    warmup_ratio: float = arg(0.1, "share of the training steps over which the learning rate warms up, in [0, 1)")
    lr_scheduler_type: str = arg(
        "cosine",
        "transformers' scheduler names",
        choices=(
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
            "inverse_sqrt",
            "reduce_lr_on_plateau",
            "cosine_with_min_lr",
            "warmup_stable_decay",
        ),
    )
    weight_decay: float = arg(0.0, "the optimizer's weight decay, on every backend")
    max_grad_norm: float = arg(1.0, "clip gradients to this global norm (0: no clipping)")
    optim: str = arg(
        "adamw_torch",
        "transformers' optimizer names",
        choices=(
            "adamw_torch",
            "adamw_torch_fused",
            "adamw_hf",
            "adafactor",
            "sgd",
            "adagrad",
            "rmsprop",
            "adamw_8bit",
        ),
    )
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass: less memory, slower steps")
    # --- LoRA family (used by method=lora/loraplus/rslora/dora/pissa)
    lora_r: int = arg(8, "LoRA rank, for every LoRA method on every backend (read by method.lora_r)")
    lora_alpha: int = arg(
        32, "LoRA scaling alpha: updates scaled by alpha/r (alpha/sqrt(r) with rsLoRA); read by method.lora_alpha"
    )
    lora_dropout: float = arg(0.05, "dropout on the LoRA layers' input, in [0, 1); read by method.lora_dropout")
    lora_target_modules: Any = arg(
        "${model.lora_target_modules}",
        "modules that get LoRA adapters: a list, comma-separated names, or all (every linear layer); default: the "
        "model's (model.lora_target_modules)",
    )
    modules_to_save: Any = arg(
        None,
        "modules trained in full and saved with the adapter (a list or comma-separated; null: none); alpacalora and "
        "collie default to model.embedding_modules",
    )
    # --- data / prompt
    prompt_template_name: str = arg(
        "alpaca",
        "alpaca-lora prompt template that turns rows into prompts (alpacalora: finetune/templates/<name>.json; collie: "
        "alpaca or alpaca_short); llamafactory uses backend.template",
    )
    train_on_inputs: bool = arg(
        True,
        "also train on the prompt tokens (false: the loss covers the responses only; LLaMA-Factory's train_on_prompt)",
    )
    max_samples: Optional[int] = arg(None, "use only the first n rows of each dataset (null: every row)")
    # --- evaluation by generation (alpacalora, llamafactory, collie): held-out rows answered before and after
    generate_eval: bool = arg(False, "answer and score the held-out rows before and after training")
    generate_eval_rows: int = arg(40, "how many held-out rows (0: all of them)")
    max_new_tokens: int = arg(32, "per answer (greedy)")
    generate_batch_size: int = arg(8, "prompts per batch (left-padded)")
    # --- preference evaluation (preference pairs or KTO rows): held-out pairs scored before and after training
    preference_eval: bool = arg(
        False,
        "score the held-out preference pairs before and after training: accuracy (log-likelihood of the chosen "
        "answer > the rejected one's) and mean margin (finetune/recipes/pref_eval.py)",
    )
    preference_eval_rows: int = arg(0, "how many held-out pairs (0: all of them)")
    # --- start from a trained adapter
    adapter: Optional[str] = arg(
        None,
        "start from a trained LoRA adapter: a run folder (its adapter) or an adapter folder; it is merged into the "
        "base and a new adapter trains on top (backend=llamafactory; method.create_new_adapter=false: go on "
        "training it instead)",
    )
    # --- logging / checkpoints
    logging_steps: int = arg(10, "log loss and learning rate every n optimizer steps")
    eval_steps: int = arg(0, "0: evaluate once per epoch")
    save_steps: int = arg(0, "0: no intermediate checkpoints")
    save_total_limit: int = arg(
        2, "with save_steps > 0: keep at most this many checkpoints, deleting the oldest (0: keep all)"
    )
    report_to: Any = arg(
        "tensorboard",
        "where metrics go: one target, or a list ([tensorboard,mlflow])",
        ("tensorboard", "mlflow", "wandb", "none"),
    )
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig,
        metadata={
            "help": "settings of report_to=mlflow / wandb (tracking.mlflow.*, tracking.wandb.*, tracking.flush_s)"
        },
    )
    # --- outputs and run control
    output_dir: Optional[str] = arg(None, "run folder; default outputs/runs/<date>/<time>-<name>")
    target_path: Optional[str] = arg(None, "adapter folder; default <run>/lazyllm_lora")
    merge_path: Optional[str] = arg(None, "merged model folder; default <run>/lazyllm_merge")
    allow_outside_outputs: bool = arg(True, "false: refuse run folders outside outputs/")
    merge: bool = arg(
        True, "after training, merge the LoRA adapter into the base model (merge_path); false: keep the adapter only"
    )
    # --- export (finetune/export.py): the trained model as a GGUF file for llama.cpp / Ollama, as the run's last step
    export: Optional[str] = arg(
        None,
        "gguf: the model as one GGUF file; gguf-lora: the adapter as a llama.cpp LoRA GGUF (and the base model); "
        "null: no export (finetune export <run> does it later)",
        choices=("gguf", "gguf-lora"),
    )
    export_type: str = arg(
        "f16",
        "the GGUF's tensor type (q8_0 and q4_k_m by llama.cpp's quantizer)",
        choices=("f16", "bf16", "q8_0", "q4_k_m"),
    )
    resume: bool = arg(
        False, "continue the run in output_dir from its last checkpoint, with the config it was started with"
    )
    dry_run: bool = arg(False, "print the plan (each step's command, environment and files) and write nothing")
    explain: bool = arg(False, "backend=auto: print the estimate for every candidate and why the choice was made")
    trust_remote_code: bool = arg(
        False,
        "allow the model folder's own Python code to run (needed when its config.json has auto_map, or "
        "model.needs_remote_code)",
    )
    timeout_min: float = arg(0.0, "0: no limit; else a step running longer is killed and fails")
    verbose: bool = arg(False, "print every line of every step to the terminal (default: ours; the rest is in logs/)")
    metric: str = arg("eval_loss", "what train.py returns to a sweeper")
    fail_fast: bool = arg(False, "in a sweep: stop at the first failed job")

    backend: Any = MISSING
    model: Any = MISSING
    method: Any = MISSING
    hardware: Any = MISSING
    data: Any = MISSING
    launcher: Any = MISSING


# --------------------------------------------------------------------------------------------------- backend


@dataclass
class BackendBase:
    name: str = arg(MISSING, "the backend option (conf/backend/<name>.yaml)")
    methods: List[str] = arg([], "method names this backend can run")
    model_kinds: List[str] = arg(["causal_lm"], "model kinds this backend trains (model.kind); another kind is refused")
    data_formats: List[str] = arg(
        ["alpaca", "sharegpt"], "data formats this backend takes (data.format); another format is refused"
    )


@dataclass
class DummyBackend(BackendBase):
    steps: int = arg(3, "how many fake training steps the placeholder process logs")
    fail: bool = arg(False, "make the placeholder process exit non-zero (plumbing tests)")
    sleep_s: float = arg(0.0, "per step")


@dataclass
class AlpacaloraBackend(BackendBase):
    python: str = arg("python", 'interpreter for the recipe process ("python" = this interpreter)')
    deepspeed: Optional[str] = arg(None, "path to a DeepSpeed JSON; default: generated from hardware.deepspeed_stage")
    group_by_length: bool = arg(False, 'the reference default ("faster, but produces an odd training loss curve")')
    packing: bool = arg(
        False, "pack training examples into rows of up to cutoff_len tokens, with no attention across examples"
    )
    dataloader_num_workers: int = arg(0, "DataLoader worker processes (0: load in the training process)")
    show_prompt: bool = arg(False, "print the first training example, decoded, before training")
    torch_threads: int = arg(0, "threads of the recipe process; 0: the launcher decides (launcher.omp_num_threads)")
    attn_implementation: str = arg(
        "auto", "auto: see finetune/recipes/alpacalora.py", choices=("auto", "eager", "sdpa", "flash_attention_2")
    )
    padding_free: Optional[bool] = arg(
        None,
        "one row per micro-batch, no padding, attention within each example (finetune/recipes/padding_free.py); "
        "null: on CPU for llama/mistral/qwen2/qwen3 models with attn_implementation auto and no packing",
    )


@dataclass
class LlamafactoryBackend(BackendBase):
    stage: str = arg("sft", "LLaMA-Factory's training stage", choices=("pt", "sft", "rm", "dpo", "kto"))
    template: Optional[str] = arg(
        "${model.template}",
        "LLaMA-Factory chat template used to build prompts in training and inference; default model.template (null: "
        "the tokenizer's chat template)",
    )
    preprocessing_num_workers: int = arg(1, "processes LLaMA-Factory uses to tokenise the data")
    overwrite_cache: bool = arg(True, "tokenise the data again instead of reusing LLaMA-Factory's cached datasets")
    plot_loss: bool = arg(True, "LLaMA-Factory also saves its own loss curve plots")
    per_device_eval_batch_size: int = arg(1, "evaluation batch size per process")
    eval_strategy: str = arg(
        "steps", "steps: every eval_steps (0: once per epoch); no: no evaluation", choices=("steps", "epoch", "no")
    )
    ddp_timeout: int = arg(180000000, "timeout of distributed operations, in seconds")
    pref_beta: float = arg(
        0.1, "beta of the preference loss (stages dpo and kto): larger keeps the model closer to the reference model"
    )
    pref_loss: str = arg("sigmoid", "the DPO loss (stage dpo): sigmoid (DPO), hinge, ipo, kto_pair, orpo or simpo")
    extra: Any = arg({}, "more LLaMA-Factory keys, checked against a known list")


@dataclass
class FlagembeddingBackend(BackendBase):
    """FlagEmbedding 1.4.2 encoder-only fine-tuning (conf/backend/flagembedding.yaml; reference defaults there).

    Reference flags NOT passed, and why (checked against FlagEmbedding 1.4.2 + transformers 5.6 on CPU):
      overwrite_output_dir  transformers 5 TrainingArguments has no such field: HfArgumentParser rejects it.
                            Not needed: the output folder is inside a fresh run folder.
      fp16                  follows hardware.precision; fp16 on hardware=cpu is refused at compose time.
      negatives_cross_device  passed only when world size > 1 (FlagEmbedding raises without torch.distributed);
                            the reranker has no such flag.
      deepspeed             generated from hardware.deepspeed_stage (null on cpu: no DeepSpeed).
      temperature, sentence_pooling_method, normalize_embeddings, kd_loss_type, query_instruction_for_retrieval:
                            embedder only (the reranker's parser rejects them; its instruction flag is
                            query_instruction_for_rerank).
    """

    task: str = arg("embedder", "what FlagEmbedding trains", choices=("embedder", "reranker"))
    train_group_size: int = arg(8, "1 positive + (n-1) negatives per query")
    query_max_len: Optional[int] = arg(None, "null: task default (reference: embedder 512, reranker 256)")
    passage_max_len: Optional[int] = arg(None, "null: task default (reference: embedder 512, reranker 256)")
    pad_to_multiple_of: Optional[int] = arg(
        8, "pad each batch's sequence length up to a multiple of this (null: no rounding)"
    )
    query_instruction_for_retrieval: Optional[str] = arg(
        "Represent this sentence for searching relevant passages: ",
        "embedder: instruction put before each query, in training and evaluation (null: none)",
    )
    query_instruction_for_rerank: Optional[str] = arg(None, "reranker: instruction put before each query (null: none)")
    query_instruction_format: str = arg(
        "{}{}", "how instruction and query are joined: a format string with two {} (instruction, then query)"
    )
    knowledge_distillation: bool = arg(False, "needs pos_scores / neg_scores in every row")
    dataloader_drop_last: bool = arg(True, "drop the last incomplete batch of each epoch")
    temperature: float = arg(
        0.02, "embedder: temperature dividing the similarity scores in the contrastive (InfoNCE) loss"
    )
    sentence_pooling_method: str = arg("cls", "embedder only", choices=("cls", "mean", "last_token"))
    normalize_embeddings: bool = arg(True, "embedder: L2-normalise the embeddings, so similarity is the cosine")
    kd_loss_type: str = arg("kl_div", "embedder only; knowledge_distillation=true", choices=("kl_div", "m3_kd_loss"))
    negatives_cross_device: bool = arg(
        True, "embedder: share in-batch negatives across processes (passed only when world size > 1)"
    )
    eval_k: List[int] = arg([1, 5, 10], "the k values of recall@k in the retrieval evaluation")
    eval: bool = arg(True, "recall@k / MRR on data.eval_path before and after training")
    eval_batch_size: int = arg(64, "batch size of the retrieval evaluation (encoding or scoring)")
    eval_max_corpus: int = arg(5000, "reranker: score every corpus passage up to this size, else pos+neg")


@dataclass
class CollieBackend(BackendBase):
    venv: str = arg("${oc.env:FINETUNE_COLLIE_VENV,${repo_root:}/.venv-collie}", "Collie's own environment")
    dp_size: int = arg(
        1,
        "data-parallel size; dp_size x tp_size x pp_size must equal the launcher's world size (default: that world "
        "size / (tp_size x pp_size))",
    )
    pp_size: int = arg(1, "pipeline-parallel stages (only 1 runs with the pinned DeepSpeed)")
    tp_size: int = arg(1, "tensor-parallel size: must divide the attention heads; 1 with LoRA methods")


@dataclass
class AutoBackend(BackendBase):
    candidates: List[str] = arg(
        ["alpacalora", "llamafactory", "collie", "flagembedding"],
        "backends to consider, in order of preference for near-ties (finetune/auto/planner.py)",
    )
    prefer: str = arg("fastest", "fastest: estimated wall time", choices=("fastest", "least_memory"))


# --------------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name: str = arg(MISSING, "the model option (conf/model/<name>.yaml)")
    path: str = arg(MISSING, "folder with config.json (+ tokenizer, weights)")
    family: str = arg("llama", "llama | qwen2 | internlm2 | chatglm3 | bert")
    kind: str = arg(
        "causal_lm",
        "what the model is; each backend trains some kinds (backend.model_kinds)",
        choices=("causal_lm", "encoder"),
    )
    builder: Optional[str] = arg(None, "built on first use by finetune.tools.tiny_models (tiny, GGUF)")
    gguf_file: Optional[str] = arg(None, "model=gguf: the GGUF file converted into the models cache")
    lora_target_modules: List[str] = arg(
        ["q_proj", "v_proj"], "this family's default LoRA targets (the default of the top-level lora_target_modules)"
    )
    all_linear_modules: List[str] = arg(
        [], "this family's linear modules: what lora_target_modules=all means on backend=collie"
    )
    embedding_modules: List[str] = arg([], 'what "modules_to_save" means for this family')
    template: Optional[str] = arg("default", "LLaMA-Factory chat template name")
    needs_remote_code: bool = arg(False, "the model runs code from its own folder: needs trust_remote_code=true")
    num_params: Optional[float] = arg(None, "informative; the estimator reads config.json")


# --------------------------------------------------------------------------------------------------- method


@dataclass
class MethodBase:
    name: str = arg(
        MISSING,
        "the method option",
        ("full", "freeze", "lora", "loraplus", "rslora", "dora", "pissa", "qlora", "galore", "badam", "auto"),
    )
    finetuning_type: str = arg(MISSING, "full | freeze | lora")
    uses_lora: bool = arg(
        False, "the method trains LoRA adapters (the LoRA keys apply; typed on another method they are refused)"
    )


@dataclass
class FullMethod(MethodBase):
    name: str = arg("full", "the method option: full (every weight trains)")
    finetuning_type: str = arg("full", "LLaMA-Factory's finetuning_type: full")


@dataclass
class FreezeMethod(MethodBase):
    name: str = arg("freeze", "the method option: freeze (only some layers train)")
    finetuning_type: str = arg("freeze", "LLaMA-Factory's finetuning_type: freeze")
    freeze_trainable_layers: int = arg(2, "> 0: last n layers trainable; < 0: first n")
    freeze_trainable_modules: str = arg("all", "comma-separated module names inside a layer, or all")
    freeze_extra_modules: Optional[str] = arg(None, "comma-separated modules outside the layers (e.g. embed_tokens)")


@dataclass
class LoraMethod(MethodBase):
    name: str = arg(
        "lora",
        "the method option: lora, or a variant set by its conf/method file (loraplus, rslora, dora, pissa, qlora)",
    )
    finetuning_type: str = arg("lora", "LLaMA-Factory's finetuning_type: lora")
    uses_lora: bool = arg(True, "true: LoRA adapters are trained (the LoRA keys apply)")
    lora_r: int = arg("${lora_r}", "LoRA rank, from the top-level lora_r")
    lora_alpha: int = arg("${lora_alpha}", "LoRA scaling alpha, from the top-level lora_alpha")
    lora_dropout: float = arg("${lora_dropout}", "LoRA dropout, from the top-level lora_dropout")
    lora_target_modules: Any = arg(
        "${lora_target_modules}", "modules that get LoRA adapters, from the top-level lora_target_modules"
    )
    modules_to_save: Any = arg(
        "${modules_to_save}", "modules trained in full and saved with the adapter, from the top-level modules_to_save"
    )
    use_rslora: bool = arg(
        False, "rank-stabilised LoRA: scale updates by alpha/sqrt(r) instead of alpha/r (method=rslora)"
    )
    use_dora: bool = arg(
        False, "DoRA: weight-decomposed LoRA, a magnitude vector plus LoRA on the direction (method=dora)"
    )
    loraplus_lr_ratio: Optional[float] = arg(
        None, "LoRA+: learning rate of the B matrices over that of the A matrices (method=loraplus: 16; null: off)"
    )
    loraplus_lr_embedding: float = arg(1e-6, "LoRA+: learning rate of the B matrices of LoRA on embedding layers")
    pissa_init: bool = arg(
        False, "PiSSA: initialise the adapters from the principal singular vectors of the weights (method=pissa)"
    )
    pissa_iter: int = arg(16, "PiSSA: iterations of the fast SVD; -1: an exact SVD")
    pissa_convert: bool = arg(
        False, "PiSSA: convert the adapter into a plain LoRA delta on the original model (needed to merge)"
    )
    create_new_adapter: bool = arg(
        False,
        "with adapter=...: train a new adapter on top of that one (set to true unless typed); false: go on training it",
    )
    # QLoRA (method=qlora): the frozen base loaded quantised by bitsandbytes, LoRA trained on top in 16/32 bits; the
    # merge goes into the full-precision base
    quantization_bit: Optional[int] = arg(None, "4 (NF4/FP4) | 8 (LLM.int8) | null: no quantisation", (4, 8))
    quantization_type: str = arg("nf4", "4-bit only", choices=("nf4", "fp4"))
    double_quantization: bool = arg(True, "quantise the 4-bit quantisation constants too (4-bit only)")


@dataclass
class GaloreMethod(MethodBase):
    name: str = arg("galore", "the method option: galore (every weight trains, gradients projected to a low rank)")
    finetuning_type: str = arg("full", "LLaMA-Factory's finetuning_type: full (GaLore trains every weight)")
    use_galore: bool = arg(True, "train with the GaLore optimizer")
    galore_target: str = arg(
        "all", "modules whose weights get GaLore projection (comma-separated names; all: every linear layer)"
    )
    galore_rank: int = arg(16, "rank of the projected gradients")
    galore_update_interval: int = arg(200, "optimizer steps between two updates of the projection")
    galore_scale: float = arg(0.25, "scale applied to the projected updates")
    galore_proj_type: str = arg("std", "GaLore's projection", choices=("std", "reverse_std", "right", "left", "full"))
    galore_layerwise: bool = arg(
        False, "update layer by layer in the backward pass to save memory (one process, no gradient accumulation)"
    )


@dataclass
class BadamMethod(MethodBase):
    name: str = arg("badam", "the method option: badam (block-coordinate Adam)")
    finetuning_type: str = arg(
        "full", "LLaMA-Factory's finetuning_type: full (BAdam updates all weights, a block at a time)"
    )
    use_badam: bool = arg(True, "train with the BAdam optimizer")
    badam_mode: str = arg(
        "layer", "layer: one block at a time; ratio: a fraction of each matrix", choices=("layer", "ratio")
    )
    badam_start_block: Optional[int] = arg(
        None, "layer mode: the block to start with (null: as badam_switch_mode decides)"
    )
    badam_switch_mode: str = arg(
        "ascending", "order of the layer blocks", choices=("ascending", "descending", "random", "fixed")
    )
    badam_switch_interval: int = arg(50, "layer mode: optimizer steps between two block switches")
    badam_update_ratio: float = arg(0.05, "ratio mode: share of each weight matrix updated, in (0, 1]")
    badam_mask_mode: str = arg("adjacent", "ratio mode's mask", choices=("adjacent", "scatter"))
    badam_verbose: int = arg(0, "BAdam's logging: 0 none, 1 the block switched to, 2 also the trainable parameters")


@dataclass
class AutoMethod(MethodBase):
    name: str = arg("auto", "the method option: auto (backend=auto chooses the method that fits)")
    finetuning_type: str = arg("auto", "auto: replaced by the chosen method's")


# --------------------------------------------------------------------------------------------------- hardware


@dataclass
class HardwareConfig:
    name: str = arg(MISSING, "the hardware option (conf/hardware/<name>.yaml)")
    device: str = arg("cpu", "auto: detected (finetune/auto/hardware.py)", choices=("cpu", "cuda", "auto"))
    gpu_type: Optional[str] = arg(
        None, "GPU model, e.g. A100-80G; gives the auto planner's speed estimate when gpu_tflops is 0"
    )
    gpus_per_node: int = arg(0, "GPUs per node; on cuda the launchers run one process per GPU")
    gpu_memory_gb: float = arg(0.0, "GiB per GPU")
    nnodes: int = arg(1, "nodes; the launcher's nnodes follows it")
    cpus: int = arg(0, "0: detect (finetune/auto/hardware.py)")
    memory_gb: float = arg(0.0, "host RAM per node, GiB; 0: detect")
    precision: str = arg(
        "fp32",
        "also auto with hardware=auto (detected, then one of these); fp16 needs a GPU",
        choices=("fp32", "bf16", "fp16"),
    )
    deepspeed_stage: Optional[int] = arg(None, "None: no DeepSpeed; 0, 1, 2 or 3")
    offload_optimizer: bool = arg(
        False, "DeepSpeed ZeRO: keep the optimizer states in CPU memory (deepspeed_stage 2 or 3)"
    )
    offload_param: bool = arg(False, "DeepSpeed ZeRO-3: keep the parameters in CPU memory (deepspeed_stage 3)")
    gpu_tflops: float = arg(0.0, "for the auto planner's speed estimate")


# --------------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    name: str = arg(MISSING, "the data option (conf/data/<name>.yaml)")
    path: Optional[str] = arg(MISSING, "file (.json/.jsonl) or folder of them (null with data=llamafactory)")
    format: str = arg(
        "auto",
        "the rows' format (auto: detected)",
        ("auto", "alpaca", "sharegpt", "preference", "kto", "text", "embedding"),
    )
    eval_path: Optional[str] = arg(None, "held-out file for embedding evaluation / explicit eval set")
    corpus_path: Optional[str] = arg(None, "retrieval corpus (embedding evaluation)")
    # data=llamafactory: datasets of a LLaMA-Factory dataset_info.json (finetune/lfdata.py, finetune/sources.py)
    dataset_dir: Optional[str] = arg(None, "the folder holding dataset_info.json (data=llamafactory)")
    dataset: Any = arg(None, "dataset name(s) of dataset_info.json: a, a,b or [a,b] (data=llamafactory)")
    eval_dataset: Optional[str] = arg(None, "a dataset held out for evaluation, not trained on (val_set_size unused)")
    mix: Any = arg(None, "{dataset: weight}: rows per dataset in proportion, drawn with the seed (null: each row once)")
    mix_rows: Optional[int] = arg(None, "rows of the mixture (null: as many as the weights allow without repeats)")
    mix_strategy: str = arg(
        "concat",
        "LLaMA-Factory's own mixing (backend=llamafactory): concat, or interleave with interleave_probs",
        ("concat", "interleave_under", "interleave_over", "interleave_once"),
    )
    interleave_probs: Any = arg(None, "LLaMA-Factory's interleave_probs: one probability per dataset, summing to 1")


# --------------------------------------------------------------------------------------------------- launcher


@dataclass
class LauncherConfig:
    name: str = arg(MISSING, "where the steps run", ("local", "torchrun", "slurm", "k8s"))
    nproc_per_node: int = arg(
        1, "processes (ranks) per node; default: one per GPU of the hardware group, 1 on CPU hardware"
    )
    nnodes: int = arg(1, "nodes the run spans; default: hardware.nnodes")
    node_rank: int = arg(
        0, "this node's rank; train.py runs node 0 (other nodes: python -m finetune.launchers.torchrun join)"
    )
    master_addr: str = arg("127.0.0.1", "host of the rendezvous (node 0)")
    master_port: int = arg(0, "0: pick a free port")
    rdzv_backend: str = arg("c10d", "torchrun rendezvous of a multi-node run: static (node N is node N) or c10d")
    rdzv_id: Optional[str] = arg(None, "torchrun rendezvous id (null: finetune)")
    omp_num_threads: int = arg(
        0,
        "threads per process; 0: OMP_NUM_THREADS from your environment, else the CPUs this process may use / "
        "processes per node / jobs a parallel sweep runs at once",
    )
    fork_steps: bool = arg(
        True,
        "start each single-process step by fork from one process that imported torch, transformers and PEFT once "
        "(false: a fresh interpreter per step)",
    )
    # slurm (submitit)
    partition: Optional[str] = arg(None, "slurm: partition (null: the cluster's default)")
    account: Optional[str] = arg(None, "slurm: account to charge (null: your default)")
    qos: Optional[str] = arg(None, "slurm: quality of service (null: the default)")
    time_min: int = arg(60, "time limit of each job, minutes (slurm --time; k8s activeDeadlineSeconds)")
    cpus_per_task: int = arg(2, "CPUs per node (slurm cpus_per_task; k8s the pod's CPUs)")
    gpus_per_node: int = arg(0, "GPUs per node (slurm gpus_per_node; k8s nvidia.com/gpu)")
    mem_gb: float = arg(4.0, "memory per node, GB (slurm --mem; k8s the pod's memory)")
    additional_parameters: Any = arg({}, 'more sbatch options: {key: value} (no "--")')
    setup: List[str] = arg([], "shell lines run in the job before the step (module load ...)")
    cluster: Optional[str] = arg(None, 'submitit cluster: null = slurm; "local"/"debug" run without Slurm')
    job_name: Optional[str] = arg(None, "default: finetune-<run name>-<step>")
    poll_s: float = arg(2.0, "seconds between two checks of the job's state (slurm, k8s)")
    max_requeues: int = arg(3, "slurm: reruns after preemption / time limit before the job fails")
    signal_delay_s: int = arg(120, "slurm: USR2 this long before the time limit (the job requeues itself)")
    # k8s (manifest generation: a batch/v1 Job, or a Kubeflow PyTorchJob when nnodes > 1)
    image: str = arg("finetune:latest", "k8s: container image holding this repository and its venv, at the same paths")
    namespace: str = arg("default", "k8s: namespace of the jobs")
    pvc: Optional[str] = arg(None, "PersistentVolumeClaim mounted at mount_path (run folder, models, data)")
    mount_path: str = arg(
        "/workspace", "k8s: where pvc is mounted in the pod; output_dir, model.path and data.path must be under it"
    )
    service_account: Optional[str] = arg(None, "k8s: service account of the pods (null: the namespace's default)")
    apply: bool = arg(False, "true: kubectl apply the manifest and wait; false: write it only")


SCHEMAS = {
    "backend": {
        "dummy": DummyBackend,
        "alpacalora": AlpacaloraBackend,
        "llamafactory": LlamafactoryBackend,
        "flagembedding": FlagembeddingBackend,
        "collie": CollieBackend,
        "auto": AutoBackend,
    },
    "method": {
        "full": FullMethod,
        "freeze": FreezeMethod,
        "lora": LoraMethod,
        "galore": GaloreMethod,
        "badam": BadamMethod,
        "auto": AutoMethod,
    },
    "model": {"model": ModelConfig},
    "hardware": {"hardware": HardwareConfig},
    "data": {"data": DataConfig},
    "launcher": {"launcher": LauncherConfig},
}


def known_keys() -> List[str]:
    """Every key the schemas define, dotted (for close-match suggestions)."""
    keys = [f.name for f in dataclasses.fields(RootConfig)]
    keys += [
        f"tracking.{t}.{f.name}"
        for t, node in (("mlflow", MlflowTracking), ("wandb", WandbTracking))
        for f in dataclasses.fields(node)
    ] + ["tracking.flush_s"]
    for group, options in SCHEMAS.items():
        for node in options.values():
            keys += [f"{group}.{f.name}" for f in dataclasses.fields(node)]
    return sorted(set(keys))


def register() -> None:
    """Register every schema under schema/<group>/<name> and the root under `base_config`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RootConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
