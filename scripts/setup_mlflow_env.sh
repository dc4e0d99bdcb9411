#!/usr/bin/env bash
# Create the MLflow tracking server's own virtual environment, .venv-mlflow at the repo root.
#
#   bash scripts/setup_mlflow_env.sh            # or: finetune mlflow-server start (builds it on first use)
#   bash scripts/setup_mlflow_env.sh --force    # rebuild it
#
# Runs only log to MLflow through the client (mlflow-skinny, in requirements.lock). The server (full mlflow 3.17.2:
# Flask, uvicorn, SQLAlchemy 2, pyarrow < 26, ...) cannot share the main environment (pyarrow 26.0.1 there, and
# SQLAlchemy 1.4 for the Optuna sweeper), so it lives here. Every package is pinned in requirements-mlflow.lock
# (a full freeze, installed with --no-deps: pip never resolves or backtracks). Safe to run again: it does nothing
# when the environment matches the lock. Like scripts/setup_collie_env.sh, it is built once per lock hash under
# ${FINETUNE_CACHE:-~/.cache/finetune} and .venv-mlflow links to it; FINETUNE_NO_CACHE=1 builds .venv-mlflow in
# place; FINETUNE_MLFLOW_VENV=<dir> puts it elsewhere. Needs Python 3.11. About 2 minutes and 850 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-mlflow.lock
source scripts/env_cache.sh
env_prepare setup-mlflow "$LOCK" "${FINETUNE_MLFLOW_VENV:-.venv-mlflow}" mlflow-venv
[ "${1:-}" = "--force" ] && rm -rf "$TARGET"

if env_ready bin/mlflow; then
  echo "setup-mlflow: environment for $LOCK ($HASH) is ready ($TARGET)"
else
  start=$(date +%s)
  echo "setup-mlflow: building the MLflow server's environment in $TARGET (first time: about 2 minutes)"
  rm -rf "$TARGET"
  "$PY" -m venv "$TARGET"
  "$TARGET/bin/python" -m pip install -q --no-deps --progress-bar off -r "$LOCK"
  "$TARGET/bin/python" -m pip check
  "$TARGET/bin/mlflow" --version
  env_stamp
  echo "setup-mlflow: built in $(( $(date +%s) - start )) s"
fi

env_link setup-mlflow
echo "setup-mlflow: ready: $LINK -> $TARGET. Try: finetune mlflow-server start"
