#!/usr/bin/env bash
# One-shot GPU smoke matrix (finetune/tools/gpu_smoke.py): on a machine with GPUs, a short run of every GPU code path,
# one JSON line per case. Offline; nothing is left running.
#   bash scripts/gpu_smoke.sh [--only CASES] [--model tiny_llama_30m] [--out FILE] [--timeout S]
#   bash scripts/gpu_smoke.sh --dry-run        # the commands, on any machine
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m finetune.tools.gpu_smoke "$@"
