# Sourced by scripts/setup_collie_env.sh and scripts/setup_mlflow_env.sh: how a tool's own virtual environment is
# cached once per lock hash under ${FINETUNE_CACHE:-~/.cache/finetune} and linked into the clone (scripts/setup.sh
# uses require_python311 only).
#
#   env_prepare <tag> <lock file> <link> <cache name>   unsets PYTHONPATH; sets LOCK_SHA, HASH, LINK (absolute)
#                                                       and TARGET, checks Python 3.11, and holds the build lock
#                                                       (fd 9) until exit
#   env_ready <file in the environment>                 true when TARGET has that file and was built from this
#                                                       lock (its stamp, written last by env_stamp, matches)
#   env_stamp                                           marks TARGET as built from this lock
#   env_link <tag>                                      points LINK at TARGET (unless they are the same folder)
#   require_python311 <tag>                             stops with one line unless PY is Python 3.11 (what the
#                                                       locks pin for; scripts/setup.sh uses it too)
#
# FINETUNE_NO_CACHE=1 builds in place (TARGET = LINK). Sets ROOT (the repo: the caller's working folder) and PY
# (PYTHON, else python3).
ROOT=$(pwd)
PY=${PYTHON:-python3}

require_python311() {
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "$1: needs Python 3.11 (set PYTHON=python3.11); $PY is $("$PY" -V 2>&1)" >&2; exit 1; }
}

env_prepare() {
  local tag=$1 lock=$2 link=$3 name=$4
  # a build never sees the caller's PYTHONPATH: a run's steps have the repository on it, whose finetune.egg-info
  # made `pip check` in the new environment fail (finetune's own requirements are not Collie's or MLflow's)
  unset PYTHONPATH
  LOCK_SHA=$(sha256sum "$lock" | cut -d' ' -f1)
  HASH=$( (cat "$lock"; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
  case "$link" in /*) LINK=$link ;; *) LINK="$ROOT/$link" ;; esac
  require_python311 "$tag"
  if [ "${FINETUNE_NO_CACHE:-0}" = 1 ]; then
    TARGET="$LINK"
  else
    TARGET="${FINETUNE_CACHE:-$HOME/.cache/finetune}/$name-$HASH"
  fi
  mkdir -p "$(dirname "$TARGET")"
  # one build at a time (two runs or sweep jobs may ask for it at once); the others wait, then find it ready
  exec 9>"$TARGET.lock"
  flock 9
}

env_ready() {
  [ -e "$TARGET/$1" ] && [ "$(cat "$TARGET/.finetune-lock.sha256" 2>/dev/null)" = "$LOCK_SHA" ]
}

env_stamp() {
  echo "$LOCK_SHA" > "$TARGET/.finetune-lock.sha256"  # written last: an interrupted build is never taken as ready
}

env_link() {
  local tag=$1
  if [ "$TARGET" != "$LINK" ]; then
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
      echo "$tag: $LINK exists and is not our link; leaving it (remove it, or set FINETUNE_NO_CACHE=1)" >&2
      exit 1
    fi
    ln -sfn "$TARGET" "$LINK"
  fi
}
