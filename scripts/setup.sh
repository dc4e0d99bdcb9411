#!/usr/bin/env bash
# Set up finetune on a fresh machine: a virtual environment with the pinned versions (requirements.lock),
# the project installed in it (editable), and the tiny default model built. Safe to run again: it does nothing
# when the environment already matches the lock file.
#
#   bash scripts/setup.sh            # .venv (about 4 minutes and 8 GB the first time; torch 2.9.1 + LLaMA-Factory)
#
# The environment is built once per lock-file hash under ${FINETUNE_CACHE:-~/.cache/finetune} and .venv links to
# it, so a clean clone on a machine that already built it (CI) starts in seconds. FINETUNE_NO_CACHE=1 builds
# .venv in place instead.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
LOCK=requirements.lock
HASH=$( (cat "$LOCK"; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)

if [ "${FINETUNE_NO_CACHE:-0}" = 1 ]; then
  TARGET="$ROOT/.venv"
else
  CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune}
  TARGET="$CACHE/venv-$HASH"
fi

if [ -x "$TARGET/bin/python" ] && [ -f "$TARGET/.finetune-lock-hash" ] && [ "$(cat "$TARGET/.finetune-lock-hash")" = "$HASH" ]; then
  echo "setup: environment for lock $HASH is ready ($TARGET)"
else
  echo "setup: building the environment for lock $HASH in $TARGET (first time: a few minutes)"
  # built in place; the hash file is written last, so an interrupted build is never taken as ready
  rm -rf "$TARGET"
  "$PY" -m venv "$TARGET"
  "$TARGET/bin/python" -m pip install -q --upgrade "pip>=24,<26"
  # torch first, from the same lock (LLaMA-Factory imports torchaudio: the trio must match)
  grep -E '^(torch|torchvision|torchaudio)==' "$LOCK" > "$TARGET/torch-lock.txt"
  "$TARGET/bin/python" -m pip install -q -r "$TARGET/torch-lock.txt"
  "$TARGET/bin/python" -m pip install -q -r "$LOCK"
  echo "$HASH" > "$TARGET/.finetune-lock-hash"
fi

if [ "$TARGET" != "$ROOT/.venv" ]; then
  if [ -e "$ROOT/.venv" ] && [ ! -L "$ROOT/.venv" ]; then
    echo "setup: $ROOT/.venv exists and is not our link; leaving it (set FINETUNE_NO_CACHE=1 to build in place)" >&2
  else
    ln -sfn "$TARGET" "$ROOT/.venv"
  fi
fi

# the project itself, editable, without touching the pinned dependencies
"$ROOT/.venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 \
  || "$ROOT/.venv/bin/python" -m pip install -q --no-deps -e "$ROOT"

# the embedded default model (random weights + a trained tokenizer; no hub)
"$ROOT/.venv/bin/python" -m finetune.tools.tiny_models tiny_llama "${FINETUNE_MODELS:-$ROOT/models}/tiny-llama" >/dev/null
echo "setup: ready. Try: .venv/bin/python train.py"
