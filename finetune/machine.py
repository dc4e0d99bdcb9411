"""Probes of this machine that the config's own checks need (standard library only, below config): the visible
CUDA GPUs, through nvidia-smi (torch is never imported to count them). finetune/auto/hardware.py describes the
rest of the machine for hardware=auto."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, List


def gpus() -> List[Dict]:
    """[{name, memory_gb, compute_cap}] of the visible CUDA GPUs, via nvidia-smi; [] when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            found.append(
                {
                    "index": int(parts[0]),
                    "name": parts[1],
                    "memory_gb": float(parts[2]) / 1024.0,
                    "compute_cap": float(parts[3]) if len(parts) > 3 and parts[3] else 0.0,
                }
            )
        except ValueError:
            continue
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        keep = [v.strip() for v in vis.split(",") if v.strip()]
        found = [g for g in found if str(g["index"]) in keep] if all(k.isdigit() for k in keep) else found[: len(keep)]
    return found
