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
    uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else the local store outputs/mlflow/mlflow.db
    experiment: Optional[str] = None  # null: $MLFLOW_EXPERIMENT_NAME, else the config name (`name`)
    log_adapter: bool = False  # also upload the trained adapter as the run's artifact


@dataclass
class WandbTracking:
    project: Optional[str] = None  # null: $WANDB_PROJECT, else the config name (`name`)
    entity: Optional[str] = None  # null: your default entity
    mode: str = arg(
        "auto", "auto: online with an API key and W&B reachable, else offline", choices=("auto", "offline", "online")
    )


@dataclass
class TrackingConfig:
    """report_to=mlflow / wandb (finetune/tracking/): where runs are logged. Read by the driver only."""

    mlflow: MlflowTracking = field(default_factory=MlflowTracking)
    wandb: WandbTracking = field(default_factory=WandbTracking)
    flush_s: float = 2.0  # seconds between two reads of history.jsonl while a step runs


# --------------------------------------------------------------------------------------------------- root


@dataclass
class RootConfig:
    """Top-level keys. The defaults below are the alpacalora backend's (the reference's AlpacaloraFinetune);
    other backends set their own for these (conf/backend/*.yaml, package _global_)."""

    name: str = "run"
    seed: int = 42
    # --- optimisation
    learning_rate: float = 5e-4
    num_epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 64  # global batch (all ranks, after accumulation)
    micro_batch_size: int = 4  # per rank, per forward pass
    cutoff_len: int = 1030
    val_set_size: float = 200  # >= 1: number of held-out rows; in (0, 1): fraction; 0: none
    warmup_ratio: float = 0.1
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
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
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
    gradient_checkpointing: bool = False
    # --- LoRA family (used by method=lora/loraplus/rslora/dora/pissa)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Any = "${model.lora_target_modules}"
    modules_to_save: Any = None
    # --- data / prompt
    prompt_template_name: str = "alpaca"
    train_on_inputs: bool = True
    max_samples: Optional[int] = None
    # --- evaluation by generation (alpacalora, llamafactory, collie): held-out rows answered before and after
    generate_eval: bool = False  # answer and score the held-out rows before and after training
    generate_eval_rows: int = 40  # how many held-out rows (0: all of them)
    max_new_tokens: int = 32  # per answer (greedy)
    generate_batch_size: int = 8  # prompts per batch (left-padded)
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
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate once per epoch
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int = 2
    report_to: Any = arg(
        "tensorboard",
        "where metrics go: one target, or a list ([tensorboard,mlflow])",
        ("tensorboard", "mlflow", "wandb", "none"),
    )
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # --- outputs and run control
    output_dir: Optional[str] = None  # run folder; default outputs/runs/<date>/<time>-<name>
    target_path: Optional[str] = None  # adapter folder; default <run>/lazyllm_lora
    merge_path: Optional[str] = None  # merged model folder; default <run>/lazyllm_merge
    allow_outside_outputs: bool = True  # false: refuse run folders outside outputs/
    merge: bool = True
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
    resume: bool = False
    dry_run: bool = False
    explain: bool = False
    trust_remote_code: bool = False
    timeout_min: float = 0.0  # 0: no limit; else a step running longer is killed and fails
    verbose: bool = arg(False, "print every line of every step to the terminal (default: ours; the rest is in logs/)")
    metric: str = "eval_loss"  # what train.py returns to a sweeper
    fail_fast: bool = False  # in a sweep: stop at the first failed job

    backend: Any = MISSING
    model: Any = MISSING
    method: Any = MISSING
    hardware: Any = MISSING
    data: Any = MISSING
    launcher: Any = MISSING


# --------------------------------------------------------------------------------------------------- backend


@dataclass
class BackendBase:
    name: str = MISSING
    methods: List[str] = field(default_factory=list)  # method names this backend can run
    model_kinds: List[str] = field(default_factory=lambda: ["causal_lm"])
    data_formats: List[str] = field(default_factory=lambda: ["alpaca", "sharegpt"])


@dataclass
class DummyBackend(BackendBase):
    steps: int = 3  # how many fake training steps the placeholder process logs
    fail: bool = False  # make the placeholder process exit non-zero (plumbing tests)
    sleep_s: float = 0.0  # per step


@dataclass
class AlpacaloraBackend(BackendBase):
    python: str = "python"  # interpreter for the recipe process ("python" = this interpreter)
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON; default: generated from hardware.deepspeed_stage
    group_by_length: bool = False  # the reference default ("faster, but produces an odd training loss curve")
    packing: bool = False
    dataloader_num_workers: int = 0
    show_prompt: bool = False
    torch_threads: int = 0  # threads of the recipe process; 0: the launcher decides (launcher.omp_num_threads)
    attn_implementation: str = arg(
        "auto", "auto: see finetune/recipes/alpacalora.py", choices=("auto", "eager", "sdpa", "flash_attention_2")
    )


@dataclass
class LlamafactoryBackend(BackendBase):
    stage: str = arg("sft", "LLaMA-Factory's training stage", choices=("pt", "sft", "rm", "dpo", "kto"))
    template: Optional[str] = "${model.template}"
    preprocessing_num_workers: int = 1
    overwrite_cache: bool = True
    plot_loss: bool = True
    per_device_eval_batch_size: int = 1
    eval_strategy: str = arg(
        "steps", "steps: every eval_steps (0: once per epoch); no: no evaluation", choices=("steps", "epoch", "no")
    )
    ddp_timeout: int = 180000000
    pref_beta: float = 0.1
    pref_loss: str = "sigmoid"
    extra: Any = field(default_factory=dict)  # more LLaMA-Factory keys, checked against a known list


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
    train_group_size: int = 8  # 1 positive + (n-1) negatives per query
    query_max_len: Optional[int] = None  # null: task default (reference: embedder 512, reranker 256)
    passage_max_len: Optional[int] = None  # null: task default (reference: embedder 512, reranker 256)
    pad_to_multiple_of: Optional[int] = 8
    query_instruction_for_retrieval: Optional[str] = "Represent this sentence for searching relevant passages: "
    query_instruction_for_rerank: Optional[str] = None
    query_instruction_format: str = "{}{}"
    knowledge_distillation: bool = False  # needs pos_scores / neg_scores in every row
    dataloader_drop_last: bool = True
    temperature: float = 0.02
    sentence_pooling_method: str = arg("cls", "embedder only", choices=("cls", "mean", "last_token"))
    normalize_embeddings: bool = True
    kd_loss_type: str = arg("kl_div", "embedder only; knowledge_distillation=true", choices=("kl_div", "m3_kd_loss"))
    negatives_cross_device: bool = True
    eval_k: List[int] = field(default_factory=lambda: [1, 5, 10])
    eval: bool = True  # recall@k / MRR on data.eval_path before and after training
    eval_batch_size: int = 64
    eval_max_corpus: int = 5000  # reranker: score every corpus passage up to this size, else pos+neg


@dataclass
class CollieBackend(BackendBase):
    venv: str = "${oc.env:FINETUNE_COLLIE_VENV,${repo_root:}/.venv-collie}"  # Collie's own environment
    dp_size: int = 1
    pp_size: int = 1
    tp_size: int = 1


@dataclass
class AutoBackend(BackendBase):
    # backends to consider, in order of preference for near-ties (finetune/auto/planner.py)
    candidates: List[str] = field(default_factory=lambda: ["alpacalora", "llamafactory", "collie", "flagembedding"])
    prefer: str = arg("fastest", "fastest: estimated wall time", choices=("fastest", "least_memory"))


# --------------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # folder with config.json (+ tokenizer, weights)
    family: str = "llama"  # llama | qwen2 | internlm2 | chatglm3 | bert
    kind: str = arg(
        "causal_lm",
        "what the model is; each backend trains some kinds (backend.model_kinds)",
        choices=("causal_lm", "encoder"),
    )
    builder: Optional[str] = None  # built on first use by finetune.tools.tiny_models (tiny, GGUF)
    gguf_file: Optional[str] = None  # model=gguf: the GGUF file converted into the models cache
    lora_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    all_linear_modules: List[str] = field(default_factory=list)
    embedding_modules: List[str] = field(default_factory=list)  # what "modules_to_save" means for this family
    template: Optional[str] = "default"  # LLaMA-Factory chat template name
    needs_remote_code: bool = False
    num_params: Optional[float] = None  # informative; the estimator reads config.json


# --------------------------------------------------------------------------------------------------- method


@dataclass
class MethodBase:
    name: str = arg(
        MISSING,
        "the method option",
        ("full", "freeze", "lora", "loraplus", "rslora", "dora", "pissa", "qlora", "galore", "badam", "auto"),
    )
    finetuning_type: str = MISSING  # full | freeze | lora
    uses_lora: bool = False


@dataclass
class FullMethod(MethodBase):
    name: str = "full"
    finetuning_type: str = "full"


@dataclass
class FreezeMethod(MethodBase):
    name: str = "freeze"
    finetuning_type: str = "freeze"
    freeze_trainable_layers: int = 2  # > 0: last n layers trainable; < 0: first n
    freeze_trainable_modules: str = "all"  # comma-separated module names inside a layer, or all
    freeze_extra_modules: Optional[str] = None  # comma-separated modules outside the layers (e.g. embed_tokens)


@dataclass
class LoraMethod(MethodBase):
    name: str = "lora"
    finetuning_type: str = "lora"
    uses_lora: bool = True
    lora_r: int = "${lora_r}"  # type: ignore[assignment]
    lora_alpha: int = "${lora_alpha}"  # type: ignore[assignment]
    lora_dropout: float = "${lora_dropout}"  # type: ignore[assignment]
    lora_target_modules: Any = "${lora_target_modules}"
    modules_to_save: Any = "${modules_to_save}"
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: Optional[float] = None
    loraplus_lr_embedding: float = 1e-6
    pissa_init: bool = False
    pissa_iter: int = 16
    pissa_convert: bool = False
    create_new_adapter: bool = False
    # QLoRA (method=qlora): the frozen base loaded quantised by bitsandbytes, LoRA trained on top in 16/32 bits; the
    # merge goes into the full-precision base
    quantization_bit: Optional[int] = arg(None, "4 (NF4/FP4) | 8 (LLM.int8) | null: no quantisation", (4, 8))
    quantization_type: str = arg("nf4", "4-bit only", choices=("nf4", "fp4"))
    double_quantization: bool = True  # quantise the 4-bit quantisation constants too (4-bit only)


@dataclass
class GaloreMethod(MethodBase):
    name: str = "galore"
    finetuning_type: str = "full"
    use_galore: bool = True
    galore_target: str = "all"
    galore_rank: int = 16
    galore_update_interval: int = 200
    galore_scale: float = 0.25
    galore_proj_type: str = arg("std", "GaLore's projection", choices=("std", "reverse_std", "right", "left", "full"))
    galore_layerwise: bool = False


@dataclass
class BadamMethod(MethodBase):
    name: str = "badam"
    finetuning_type: str = "full"
    use_badam: bool = True
    badam_mode: str = arg(
        "layer", "layer: one block at a time; ratio: a fraction of each matrix", choices=("layer", "ratio")
    )
    badam_start_block: Optional[int] = None
    badam_switch_mode: str = arg(
        "ascending", "order of the layer blocks", choices=("ascending", "descending", "random", "fixed")
    )
    badam_switch_interval: int = 50
    badam_update_ratio: float = 0.05
    badam_mask_mode: str = arg("adjacent", "ratio mode's mask", choices=("adjacent", "scatter"))
    badam_verbose: int = 0


@dataclass
class AutoMethod(MethodBase):
    name: str = "auto"
    finetuning_type: str = "auto"


# --------------------------------------------------------------------------------------------------- hardware


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = arg("cpu", "auto: detected (finetune/auto/hardware.py)", choices=("cpu", "cuda", "auto"))
    gpu_type: Optional[str] = None
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0  # GiB per GPU
    nnodes: int = 1
    cpus: int = 0  # 0: detect (finetune/auto/hardware.py)
    memory_gb: float = 0.0  # host RAM per node, GiB; 0: detect
    precision: str = arg(
        "fp32",
        "also auto with hardware=auto (detected, then one of these); fp16 needs a GPU",
        choices=("fp32", "bf16", "fp16"),
    )
    deepspeed_stage: Optional[int] = None  # None: no DeepSpeed; 0, 1, 2 or 3
    offload_optimizer: bool = False
    offload_param: bool = False
    gpu_tflops: float = 0.0  # for the auto planner's speed estimate


# --------------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    name: str = MISSING
    path: Optional[str] = arg(MISSING, "file (.json/.jsonl) or folder of them (null with data=llamafactory)")
    format: str = arg(
        "auto",
        "the rows' format (auto: detected)",
        ("auto", "alpaca", "sharegpt", "preference", "kto", "text", "embedding"),
    )
    eval_path: Optional[str] = None  # held-out file for embedding evaluation / explicit eval set
    corpus_path: Optional[str] = None  # retrieval corpus (embedding evaluation)
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
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free port
    rdzv_backend: str = "c10d"
    rdzv_id: Optional[str] = None
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
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: float = 4.0
    additional_parameters: Any = field(default_factory=dict)  # more sbatch options: {key: value} (no "--")
    setup: List[str] = field(default_factory=list)  # shell lines run in the job before the step (module load ...)
    cluster: Optional[str] = None  # submitit cluster: null = slurm; "local"/"debug" run without Slurm
    job_name: Optional[str] = None  # default: finetune-<run name>-<step>
    poll_s: float = 2.0
    max_requeues: int = 3  # slurm: reruns after preemption / time limit before the job fails
    signal_delay_s: int = 120  # slurm: USR2 this long before the time limit (the job requeues itself)
    # k8s (manifest generation: a batch/v1 Job, or a Kubeflow PyTorchJob when nnodes > 1)
    image: str = "finetune:latest"
    namespace: str = "default"
    pvc: Optional[str] = None  # PersistentVolumeClaim mounted at mount_path (run folder, models, data)
    mount_path: str = "/workspace"
    service_account: Optional[str] = None
    apply: bool = False  # true: kubectl apply the manifest and wait; false: write it only


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
