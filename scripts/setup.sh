#!/usr/bin/env bash
# Set up finetune on a fresh machine: a virtual environment with the pinned versions (requirements.lock),
# the project installed in it (editable), and the tiny default model built. Safe to run again: it does nothing
# when the environment already matches the lock file.
#
#   bash scripts/setup.sh            # .venv (about 4 minutes and 8 GB the first time; torch 2.9.1 + LLaMA-Factory)
#
# The environment lives under ${FINETUNE_CACHE:-~/.cache/finetune}/venv-py<version> and .venv links to it, so a
# clean clone on a machine that already built it (CI) starts in seconds. When requirements.lock changes, the
# environment is synced to it (pip installs what differs and removes what the lock no longer lists) instead of
# being rebuilt from nothing. FINETUNE_NO_CACHE=1 builds .venv in place instead.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
LOCK=requirements.lock
HASH=$(sha256sum "$LOCK" | cut -c1-16)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

if [ "${FINETUNE_NO_CACHE:-0}" = 1 ]; then
  TARGET="$ROOT/.venv"
else
  CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune}
  TARGET="$CACHE/venv-py$PYVER"
fi

if [ -x "$TARGET/bin/python" ] && [ -f "$TARGET/.finetune-lock-hash" ] && [ "$(cat "$TARGET/.finetune-lock-hash")" = "$HASH" ]; then
  echo "setup: environment matches requirements.lock ($HASH): $TARGET"
else
  if [ ! -x "$TARGET/bin/python" ] || [ ! -f "$TARGET/.finetune-torch-ok" ]; then
    echo "setup: building the environment in $TARGET (first time: a few minutes and about 8 GB)"
    rm -rf "$TARGET"
    "$PY" -m venv "$TARGET"
    "$TARGET/bin/python" -m pip install -q --upgrade "pip>=24,<26"
    # torch first, from the same lock (LLaMA-Factory imports torchaudio: the trio must match)
    grep -E '^(torch|torchvision|torchaudio)==' "$LOCK" > "$TARGET/torch-lock.txt"
    "$TARGET/bin/python" -m pip install -q -r "$TARGET/torch-lock.txt"
    touch "$TARGET/.finetune-torch-ok"
  else
    echo "setup: syncing $TARGET to requirements.lock ($HASH)"
  fi
  rm -f "$TARGET/.finetune-lock-hash"           # written last: an interrupted sync is never taken as done
  "$TARGET/bin/python" -m pip install -q -r "$LOCK"
  # remove what the lock no longer lists (the project itself stays: it is installed below)
  extra=$("$TARGET/bin/python" - "$LOCK" <<'PYEOF'
import sys, re
from importlib import metadata
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(l.split("==")[0]) for l in open(sys.argv[1]) if "==" in l}
keep = locked | {"pip", "setuptools", "wheel", "finetune"}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in metadata.distributions()} - keep)))
PYEOF
)
  if [ -n "$extra" ]; then "$TARGET/bin/python" -m pip uninstall -q -y $extra; fi
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
