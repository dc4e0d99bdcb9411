"""The hardware group: detect this machine, or describe one you plan for. Standard library only (fast).

hardware=auto   detects CPU cores and memory (sched_getaffinity, /proc/meminfo), CUDA GPUs and their memory
                (nvidia-smi, when it is on PATH; torch is never imported at plan time) and the node count (the
                launcher's nnodes, or SLURM_NNODES inside a Slurm allocation).
hardware=<name> describes a machine (a100_80g_x8, h100_x8, rtx4090, cpu, ...): plan for it from anywhere.
                Fields left at 0 (cpus, memory_gb) are filled from this machine; gpu_tflops left at 0 comes from a
                table of known GPUs.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Optional

from finetune.machine import gpus  # noqa: F401 - the visible GPUs, probed below config

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets); fp32-only GPUs use their fp32 peak.
GPU_TFLOPS = {
    "H100": 989.0,
    "H800": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
    "A6000": 155.0,
}
CPU_TFLOPS_PER_CORE = 0.07  # fp32 GEMM, measured here: about 145 GFLOP/s on 2 cores


# bf16 mixed precision on a CPU pays only where the CPU has bf16 dot-product instructions and the matmuls are big
# enough. Measured on this 2-core AMD EPYC (avx512_bf16), LoRA forward+backward, 4 x 128 tokens: hidden 512 (the
# 30M bench model) bf16 autocast 1.35x fp32; hidden 64 (tiny_llama) 0.73x. The matmul peak is 357 vs 127 GFLOP/s.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_BF16_MIN_HIDDEN = 256
# the backends whose CPU runs take it: both keep the trainable weights fp32 under the Trainer's autocast. Measured
# for LLaMA-Factory (SmolLM2 DPO showcase, 16 steps, 2 threads): training 64.3 s fp32 -> 46.8 s bf16, preference
# accuracy 82.8% both, exact match 20/32 -> 22/32
CPU_BF16_BACKENDS = ("alpacalora", "llamafactory")


def cpu_bf16() -> bool:
    """The CPU computes bf16 natively (from /proc/cpuinfo; False where that is unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def cpu_precision(model) -> str:
    """precision=auto on a CPU: bf16 mixed precision (fp32 trainable weights, bf16 matmuls) where it pays, else fp32.
    The hidden size comes from the model's config.json or, before a model built on first use exists, from its
    builder's plan (finetune/config/model_facts.py): the first run and later runs choose the same."""
    from finetune.config.model_facts import hidden_size

    if cpu_bf16() and hidden_size(model) >= CPU_BF16_MIN_HIDDEN:
        return "bf16"
    return "fp32"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _meminfo() -> Dict[str, float]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k] = float(v.split()[0]) / (1 << 20)  # kB -> GiB (memory_gb fields are GiB)
    except OSError:
        pass
    return out


def _cgroup_limit_gb() -> Optional[float]:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(p).read().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < 1 << 60:
            return int(v) / float(1 << 30)
    return None


def memory_gb() -> float:
    total = _meminfo().get("MemTotal", 0.0)
    lim = _cgroup_limit_gb()
    return min(total, lim) if lim else total


def available_memory_gb() -> float:
    return _meminfo().get("MemAvailable", memory_gb())


def gpu_tflops(gpu_type: Optional[str]) -> float:
    name = str(gpu_type or "").upper()
    for key, tf in sorted(GPU_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tf
    return 100.0 if name else 0.0


def nodes(default: int = 1) -> int:
    v = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    return int(v) if v and v.isdigit() else int(default)


def detect(nnodes: int = 1) -> Dict:
    g = gpus()
    facts = {
        "cpus": cpu_cores(),
        "memory_gb": round(memory_gb(), 2),
        "available_memory_gb": round(available_memory_gb(), 2),
        "gpus": g,
        "nnodes": nodes(nnodes),
    }
    return facts


def resolve_hardware(cfg) -> Optional[Dict]:
    """Fill hardware.* from this machine where the config asks for it (device/precision auto, cpus/memory 0).

    Called once at the start of validation, for every backend. Returns the detected facts (or None when nothing
    needed detecting)."""
    hw = cfg.hardware
    need = hw.device == "auto" or hw.precision == "auto" or not hw.cpus or not hw.memory_gb
    if not need and (hw.device != "cuda" or hw.gpu_tflops):
        return None
    facts = detect(int(cfg.launcher.nnodes)) if need else {}
    if not hw.cpus:
        hw.cpus = int(facts["cpus"])
    if not hw.memory_gb:
        hw.memory_gb = float(facts["memory_gb"])
    if hw.device == "auto":
        g = facts.get("gpus") or []
        if g:
            hw.device = "cuda"
            hw.gpus_per_node = len(g)
            hw.gpu_memory_gb = round(min(x["memory_gb"] for x in g), 2)
            hw.gpu_type = re.sub(r"^NVIDIA\s+", "", g[0]["name"])
        else:
            hw.device = "cpu"
            hw.gpus_per_node = 0
            hw.gpu_memory_gb = 0.0
        if hw.name == "auto" and facts.get("nnodes", 1) > 1:
            hw.nnodes = int(facts["nnodes"])
    if hw.precision == "auto":
        if hw.device == "cuda":
            caps = [x.get("compute_cap", 0.0) for x in (facts.get("gpus") or [])]
            hw.precision = "bf16" if (not caps or min(caps) >= 8.0) else "fp16"
        else:
            hw.precision = cpu_precision(cfg.model) if cfg.backend.name in CPU_BF16_BACKENDS else "fp32"
    if hw.device == "cuda" and not hw.gpu_tflops:
        hw.gpu_tflops = gpu_tflops(hw.gpu_type)
    return facts or None


FLASH_ATTN_MIN = (2, 3, 3)  # transformers' is_flash_attn_2_available()


def flash_attention_unavailable(hw) -> Optional[str]:
    """Why FlashAttention-2 cannot run with this hardware config here, or None. It needs a CUDA GPU, 16-bit
    precision and the flash-attn package (>= 2.3.3; not in requirements.lock: it is built against the GPU
    machine's CUDA); checked without importing it, so that a run refuses before anything is written instead of
    failing after (transformers) or silently falling back to sdpa (LLaMA-Factory 0.9.5)."""
    import importlib.util
    from importlib import metadata

    if hw.device != "cuda":
        return "flash attention needs a CUDA GPU; on CPU use auto, eager or sdpa"
    if hw.precision not in ("bf16", "fp16"):
        return f"flash attention runs in bf16 or fp16, not hardware.precision={hw.precision}"
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "the flash-attn package is not installed in this environment (not in requirements.lock: install it "
            "on the GPU machine with `pip install flash-attn --no-build-isolation`), or use sdpa"
        )
    try:
        version = tuple(int(x) for x in re.findall(r"\d+", metadata.version("flash-attn"))[:3])
    except metadata.PackageNotFoundError:
        version = ()
    if version < FLASH_ATTN_MIN:
        return f"flash-attn {'.'.join(map(str, version)) or '?'} is older than 2.3.3 (transformers needs 2.3.3+)"
    return None


def device_flops(hw) -> float:
    """Peak FLOP/s of one training process's device (one GPU, or the CPU cores one process gets)."""
    if hw.device == "cuda":
        return float(hw.gpu_tflops or gpu_tflops(hw.gpu_type) or 100.0) * 1e12
    return max(1, int(hw.cpus or cpu_cores())) * CPU_TFLOPS_PER_CORE * 1e12
