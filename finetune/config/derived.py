"""Values derived from the config, computed in one place (like LLaMA-Factory's ``__post_init__``).

Every function takes a mapping: the driver's DictConfig and a worker's resolved_config.json dict
(finetune.recipes.common.read_config) read the same keys the same way. Standard library only, so the Collie
worker, which runs in its own environment, can import it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from finetune.run_files import CHECKPOINTS  # noqa: F401 - <run>/checkpoints/checkpoint-N, every backend's Trainer

# Output folder names inside a run folder: the LazyLLM convention (the system this project replaces); a user
# who wants other names sets target_path / merge_path.
ADAPTER_DIR = "lazyllm_lora"
MERGED_DIR = "lazyllm_merge"


def world_size(cfg: Mapping) -> int:
    """Processes in the run: launcher.nproc_per_node x launcher.nnodes."""
    return ranks(cfg["launcher"])


def ranks(layout: Mapping) -> int:
    """Processes in a torchrun layout ({"nproc_per_node", "nnodes"}: the launcher's, or what a node was given)."""
    return int(layout["nproc_per_node"]) * int(layout["nnodes"])


def torchrun_head(layout: Mapping) -> List[str]:
    """How every launcher starts torchrun for a layout; the rendezvous flags after it are each launcher's own."""
    return [
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={layout['nproc_per_node']}",
        f"--nnodes={layout['nnodes']}",
    ]


def process_layout(cfg: Mapping) -> Dict[str, int]:
    """The torchrun layout the launchers pass on: processes per node and nodes."""
    launcher = cfg["launcher"]
    return {"nproc_per_node": int(launcher["nproc_per_node"]), "nnodes": int(launcher["nnodes"])}


def grad_accum(cfg: Mapping, data_parallel: Optional[int] = None) -> int:
    """Gradient accumulation steps: global batch_size / (micro_batch_size x data-parallel ranks), at least 1.
    data_parallel defaults to the world size (Collie divides it by tensor x pipeline parallel ranks)."""
    dp = world_size(cfg) if data_parallel is None else int(data_parallel)
    return max(1, int(cfg["batch_size"]) // max(1, int(cfg["micro_batch_size"]) * dp))


def _user_or_default(value: Any, run_dir, name: str) -> Path:
    return Path(str(value)).expanduser().absolute() if value else Path(run_dir) / name


def adapter_dir(cfg: Mapping, run_dir) -> Path:
    """Where the trained adapter (or a full model, for backends that merge it later) goes: target_path, else
    <run>/lazyllm_lora."""
    return _user_or_default(cfg.get("target_path"), run_dir, ADAPTER_DIR)


def merged_dir(cfg: Mapping, run_dir) -> Path:
    """Where the merged (or fully trained) model goes: merge_path, else <run>/lazyllm_merge."""
    return _user_or_default(cfg.get("merge_path"), run_dir, MERGED_DIR)


# ------------------------------------------------------------------------------------------------ DeepSpeed


def deepspeed_offload(hw: Mapping, pin_memory: bool) -> Dict[str, dict]:
    """The ZeRO offload entries hardware.offload_optimizer / offload_param ask for (CPU offload)."""
    out = {}
    if hw["offload_optimizer"]:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if hw["offload_param"]:
        out["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    return out


def hf_deepspeed_config(zero: dict) -> dict:
    """A DeepSpeed config HF Trainer completes itself: every "auto" value is filled from TrainingArguments."""
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def node_argv(step, w: Dict[str, int], node: int, master_addr: str, master_port: int) -> List[str]:
    """The command node ``node`` of a Slurm job runs for a step (a dict: argv, distributed), torchrun arguments
    filled in for distributed steps (finetune/launchers/slurm_job.py runs it; the dry run shows node 0's)."""
    if step["distributed"] != "torchrun" or ranks(w) == 1:
        return list(step["argv"])  # one rank: no torchrun needed
    args = torchrun_head(w)
    if w["nnodes"] == 1:
        args.append("--standalone")
    else:
        args += [f"--node_rank={node}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
    return [step["argv"][0], *args, *step["argv"][1:]]
