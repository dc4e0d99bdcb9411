#!/usr/bin/env bash
# Create Collie's own virtual environment, .venv-collie at the repo root (the collie backend's interpreter).
#
#   bash scripts/setup_collie_env.sh            # or: finetune setup-collie
#   bash scripts/setup_collie_env.sh --force    # rebuild it
#   bash scripts/setup_collie_env.sh --cuda     # for GPU runs: requirements-collie-cuda.lock (torch's CUDA runtime)
#   bash scripts/setup_collie_env.sh --print-lock [--cuda]   # the lock file it would install, and exit
#
# Collie (collie-lm 1.0.7) needs transformers <= 4.50, protobuf 3.20.1 and megatron-core 0.2.0, so it cannot share
# the main environment. Every package is pinned in requirements-collie.lock (a full freeze, installed with
# --no-deps: pip never resolves or backtracks). Safe to run again: it does nothing when the environment matches
# the lock. Like scripts/setup.sh, the environment is built once per lock hash under
# ${FINETUNE_CACHE:-~/.cache/finetune} and .venv-collie links to it (a clean clone on a machine that built it
# starts at once); FINETUNE_NO_CACHE=1 builds .venv-collie in place. FINETUNE_COLLIE_VENV=<dir> puts it elsewhere
# (the collie backend reads the same variable). Needs Python 3.11; g++ and ninja for DeepSpeed's CPU op (built
# on the first run, cached in ~/.cache/torch_extensions). About 1.7 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-collie.lock
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --cuda) LOCK=requirements-collie-cuda.lock ;;
    --force) FORCE=1 ;;
    --print-lock) PRINT=1 ;;
    *) echo "setup-collie: unknown option $arg (--cuda, --force, --print-lock)" >&2; exit 2 ;;
  esac
done
if [ "${PRINT:-0}" = 1 ]; then echo "$LOCK"; exit 0; fi
source scripts/env_cache.sh
env_prepare setup-collie "$LOCK" "${FINETUNE_COLLIE_VENV:-.venv-collie}" collie-venv
[ "$FORCE" = 1 ] && rm -rf "$TARGET"

if env_ready bin/python; then
  echo "setup-collie: environment for $LOCK ($HASH) is ready ($TARGET)"
else
  start=$(date +%s)
  echo "setup-collie: building Collie's environment in $TARGET (first time: a few minutes, mostly downloads)"
  # the stamp is written last, so an interrupted build is never taken as ready
  rm -rf "$TARGET"
  mkdir -p "$(dirname "$TARGET")"
  "$PY" -m venv "$TARGET"
  if [ "$LOCK" = requirements-collie-cuda.lock ]; then
    # PyPI's CUDA build of torch, never a local CPU wheel (find-links) of the same version
    PIP_FIND_LINKS= "$TARGET/bin/python" -m pip install --no-deps --progress-bar off --no-cache-dir \
      --index-url "${PIP_INDEX_URL:-https://pypi.org/simple}" -r "$LOCK"
  else
    "$TARGET/bin/python" -m pip install --no-deps --progress-bar off -r "$LOCK"   # one line per package: progress
  fi
  "$TARGET/bin/python" -m pip check
  # the worker's own import path: CPU patches (for a CPU environment), then collie
  DEVICE=cpu; [ "$LOCK" = requirements-collie-cuda.lock ] && DEVICE=cuda
  PYTHONPATH="$ROOT" "$TARGET/bin/python" -c \
    "from finetune.compat import collie as collie_compat; collie_compat.apply('$DEVICE'); import collie, peft, transformers; print('setup-collie: collie imports with transformers', transformers.__version__, 'peft', peft.__version__)" \
    2>&1 | grep -v "real_accelerator" || true
  PYTHONPATH="$ROOT" "$TARGET/bin/python" -c 'import collie' >/dev/null 2>&1 \
    || { echo "setup-collie: 'import collie' fails in $TARGET" >&2; exit 1; }
  # DeepSpeed's CPU comm op (deepspeed_shm_comm) is JIT-built with g++ on the first distributed run (30 s or
  # more); build it now, where the collie backend points TORCH_EXTENSIONS_DIR. Best effort: a failure here only
  # means the first run builds it.
  TORCH_EXTENSIONS_DIR="$TARGET/torch_extensions" "$TARGET/bin/python" -c \
    'from deepspeed.comm.torch import build_shm_op; build_shm_op()' \
    >/dev/null 2>&1 || echo "setup-collie: could not pre-build DeepSpeed's shm_comm op (the first run will)" >&2
  env_stamp
  echo "setup-collie: built in $(( $(date +%s) - start )) s"
fi

env_link setup-collie
echo "setup-collie: ready: $LINK -> $TARGET. Try: python train.py backend=collie"
