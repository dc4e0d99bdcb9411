"""alpacalora: our own alpaca-lora recipe on HF Trainer + PEFT (finetune/recipes/alpacalora.py), every method.

Plan:  [deepspeed.json]  ->  train (python -m finetune.recipes.alpacalora; torchrun when nproc_per_node > 1)
       ->  merge (python -m finetune.recipes.merge; LoRA methods, unless merge=false)
Standard library + omegaconf only at import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from finetune.backends import gen_eval
from finetune.config import derived
from finetune.config.schema import AlpacaloraBackend, choices
from finetune.errors import ConfigError, one_of
from finetune.plan import Plan, Step
from finetune.run_files import HISTORY, RESOLVED_CONFIG, TRAIN_SUMMARY

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
# keys this backend would ignore: refused when typed (finetune/run.py check_unused_keys)
NOT_USED = {
    "preference_eval": "the preference evaluation scores preference stages: backend=llamafactory backend.stage=dpo",
    "preference_eval_rows": "the preference evaluation scores preference stages: backend=llamafactory",
    "adapter": "starting from a trained adapter runs on backend=llamafactory (its adapter_name_or_path)",
    "method.create_new_adapter": "the alpacalora recipe trains one adapter on the base model (LLaMA-Factory's "
    "create_new_adapter stacks a new one on an existing adapter: use backend=llamafactory)",
}
DS_FILE = "deepspeed.json"
# What PEFT imports the first time it wraps a layer in LoRA: peft.tuners.lora.bnb, which imports bitsandbytes when it
# is installed (and with it torch._dynamo's backends and networkx: 1.6 s here). Preloaded once per run or sweep
# (launchers/zygote.py), the train step's LoRA setup and the merge step after it do not pay it again: the merge
# forked from the preloaded process falls from 1.7 s to 0.1 s on the tiny model.
LORA_PRELOAD = ["peft.tuners.lora.bnb"]


def _lora(cfg) -> bool:
    return bool(cfg.method.uses_lora)


def check(cfg) -> None:
    b, m = cfg.backend, cfg.method
    names = sorted(p.stem for p in TEMPLATES.glob("*.json"))
    if cfg.prompt_template_name not in names:
        raise ConfigError("prompt_template_name", cfg.prompt_template_name, one_of(names) + f" (files in {TEMPLATES})")
    if cfg.model.kind != "causal_lm":
        raise ConfigError("model", cfg.model.name, "the alpacalora backend trains causal language models only")
    if b.dataloader_num_workers < 0:
        raise ConfigError("backend.dataloader_num_workers", b.dataloader_num_workers, "must be >= 0")
    if b.torch_threads < 0:
        raise ConfigError("backend.torch_threads", b.torch_threads, "must be >= 0 (0: let torch decide)")
    if b.attn_implementation not in ATTENTION:
        raise ConfigError("backend.attn_implementation", b.attn_implementation, one_of(ATTENTION))
    if b.attn_implementation == "flash_attention_2":
        from finetune.auto.hardware import flash_attention_unavailable

        why = flash_attention_unavailable(cfg.hardware)
        if why:
            raise ConfigError("backend.attn_implementation", "flash_attention_2", why)
    if m.name == "galore":
        if cfg.optim not in ("adamw_torch", "adafactor"):
            raise ConfigError("optim", cfg.optim, "GaLore (galore-torch) runs with optim=adamw_torch or adafactor")
    if m.name == "badam" and cfg.hardware.deepspeed_stage is not None and m.badam_mode == "ratio":
        raise ConfigError("method.badam_mode", "ratio", "ratio-wise BAdam does not run under DeepSpeed")
    if _lora(cfg) and m.pissa_init and cfg.hardware.deepspeed_stage == 3:
        raise ConfigError("hardware.deepspeed_stage", 3, "PiSSA initialisation does not work under ZeRO-3")
    if b.deepspeed and not Path(str(b.deepspeed)).is_file():
        raise ConfigError("backend.deepspeed", b.deepspeed, "no such file (a DeepSpeed JSON config)")
    gen_eval.check(cfg)


ATTENTION = choices(AlpacaloraBackend, "attn_implementation")


def deepspeed_config(cfg) -> dict:
    """A DeepSpeed config HF Trainer accepts ("auto" values are filled from TrainingArguments)."""
    hw = cfg.hardware
    zero = {"stage": int(hw.deepspeed_stage), "overlap_comm": False, "contiguous_gradients": True}
    if hw.deepspeed_stage >= 2:
        zero.update(reduce_bucket_size="auto", allgather_bucket_size=5e8 if hw.deepspeed_stage == 2 else None)
    if hw.deepspeed_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    zero.update(derived.deepspeed_offload(hw, pin_memory=hw.device != "cpu"))
    zero = {k: v for k, v in zero.items() if v is not None}
    return derived.hf_deepspeed_config(zero)


def plan(cfg, run_dir, ctx) -> Plan:
    """The recipe's steps in the order they run (train, then the merge; evaluation by generation around them when
    asked) and the DeepSpeed JSON. Slightly over 80 lines on purpose: it reads as the run's script; each Step
    literal spreads over several lines once formatted."""
    run_dir = Path(run_dir)
    files, notes = {}, []
    py = sys.executable if cfg.backend.python in ("python", "", None) else str(cfg.backend.python)
    cfg_path = str(run_dir / RESOLVED_CONFIG)
    env = {}
    if cfg.hardware.deepspeed_stage is not None and not cfg.backend.deepspeed:
        files[DS_FILE] = json.dumps(deepspeed_config(cfg), indent=1) + "\n"
        env["FINETUNE_DEEPSPEED"] = DS_FILE
        notes.append(f"DeepSpeed ZeRO-{cfg.hardware.deepspeed_stage} config generated into {DS_FILE}")
    ws, accum = derived.world_size(cfg), derived.grad_accum(cfg)
    notes.append(
        f"method {cfg.method.name}; global batch {cfg.batch_size} = micro {cfg.micro_batch_size} x "
        f"accumulation {accum} x {ws} process(es)"
    )
    steps = [
        Step(
            name="train",
            argv=[py, "-m", "finetune.recipes.alpacalora", "--config", cfg_path],
            env=env,
            distributed="torchrun",
            progress=HISTORY,
            pausable=True,
            preload=LORA_PRELOAD if _lora(cfg) else [],
        )
    ]
    target = str(derived.adapter_dir(cfg, run_dir))
    merged = str(derived.merged_dir(cfg, run_dir))
    outputs = {"history": str(run_dir / HISTORY), "tensorboard": str(run_dir / "tensorboard")}
    if _lora(cfg):
        outputs["adapter"] = target
        if cfg.merge:
            steps.append(
                Step(
                    name="merge",
                    preload=LORA_PRELOAD,
                    argv=[
                        py,
                        "-m",
                        "finetune.recipes.merge",
                        "--base",
                        str(Path(str(cfg.model.path)).absolute()),
                        "--adapter",
                        target,
                        "--out",
                        merged,
                        "--dtype",
                        "bfloat16" if cfg.hardware.precision == "bf16" and cfg.hardware.device != "cpu" else "float32",
                        *(["--trust-remote-code"] if cfg.trust_remote_code else []),
                        *(["--replace"] if cfg.resume else []),
                    ],
                )
            )
            outputs["merged"] = merged
        else:
            notes.append("merge=false: the adapter is not merged")
    else:
        outputs["model"] = merged
        notes.append(f"method {cfg.method.name} trains the whole model: it is saved to {merged}, no merge step")
    if _lora(cfg) and cfg.method.modules_to_save:
        from finetune.config import model_facts

        wanted = (
            [str(x) for x in OmegaConf.to_container(cfg.method.modules_to_save)]
            if OmegaConf.is_config(cfg.method.modules_to_save)
            else str(cfg.method.modules_to_save).split(",")
        )
        if model_facts.tied_embeddings(cfg.model) and set(wanted) & model_facts.embedding_names(cfg.model):
            notes.append(
                f"tied embeddings: modules_to_save {wanted} trains the one shared embedding/output matrix "
                "once (PEFT ensure_weight_tying); the adapter and the merged model keep it tied"
            )
    after = merged if (cfg.merge or not _lora(cfg)) else str(Path(str(cfg.model.path)).absolute())
    first, last = gen_eval.steps(cfg, run_dir, after, adapter=None if (cfg.merge or not _lora(cfg)) else target)
    steps = first + steps + last
    notes += gen_eval.note(cfg)
    if cfg.method.name == "pissa" or (_lora(cfg) and cfg.method.pissa_init):
        notes.append(
            "PiSSA: the saved adapter is converted to a plain LoRA delta (rank 2r) against the original "
            "base, so merging is reproducible"
            if cfg.method.pissa_convert
            else "PiSSA without pissa_convert: merging re-runs the PiSSA initialisation (not reproducible "
            "unless pissa_iter=-1)"
        )
    return Plan(backend="alpacalora", steps=steps, files=files, outputs=outputs, notes=notes)


def collect(cfg, run_dir, ctx) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / TRAIN_SUMMARY
    if not path.exists():
        raise RuntimeError(f"{path} is missing: the train step wrote no summary")
    s = json.loads(path.read_text())
    keys = (
        "train_loss",
        "eval_loss",
        "first_train_loss",
        "total_params",
        "trainable_params",
        "tokens_per_s",
        "target_tokens_per_s",
        "train_target_tokens",
        "peak_rss_mb",
        "train_runtime_s",
        "train_compute_s",
        "train_tokens",
        "global_step",
        "world_size",
        "deepspeed",
        "gradient_accumulation_steps",
        "precision",
    )
    out = {k: s.get(k) for k in keys}
    out["trainable_pct"] = 100.0 * s["trainable_params"] / s["total_params"] if s.get("total_params") else None
    return out
