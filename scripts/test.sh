#!/usr/bin/env bash
# Set up everything the tests need and run them (the README's test command; .ci/run calls it).
#
#   bash scripts/test.sh                 # the whole suite
#   bash scripts/test.sh -m "not slow"   # config, validation and plan tests only (about 3 minutes on 2 cores)
#   bash scripts/test.sh tests/test_alpacalora.py -k merge
#
# Sets up .venv (scripts/setup.sh), Collie's own .venv-collie (scripts/setup_collie_env.sh), the MLflow
# tracking server's .venv-mlflow (scripts/setup_mlflow_env.sh: tests/test_tracking.py starts real servers) and
# llama.cpp's .venv-llamacpp (scripts/setup_llamacpp_env.sh, built while the first tests run); Slurm
# tests run when Debian's slurm-wlm is installed, the MLflow UI test when Debian's chromium is (.ci/run installs
# both), and are skipped with the reason otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Collie's and the MLflow server's environments build side by side (mostly downloads and unpacking).
pids=()
if [ "${FINETUNE_SKIP_COLLIE:-0}" != 1 ]; then
  bash scripts/setup_collie_env.sh 2>&1 | sed -u 's/^/[collie env] /' &
  pids+=($!)
fi
bash scripts/setup_mlflow_env.sh 2>&1 | sed -u 's/^/[mlflow env] /' &
pids+=($!)
# llama.cpp's environment (finetune export, tests/test_readme.py's GGUF checks) compiles ggml and llama: about 8
# CPU-minutes with its packages, once per machine and lock. For the whole suite it is built beside
# the tests, not before them: the first test that needs it waits for it (the build holds its lock), the others run
# meanwhile; its output is in outputs/setup_llamacpp.log. A selection of tests (arguments) builds it only if one of
# them needs it (the export's own planned step).
llamacpp_log=outputs/setup_llamacpp.log
if [ $# -eq 0 ]; then
  bash scripts/setup_llamacpp_env.sh > "$llamacpp_log" 2>&1 &
  llamacpp=$!
  # DeepSpeed's CPU ops, compiled into the torch extensions cache beside the first tests too (not before them: 142 s
  # of waiting when it was): CPU Adam, which the first ZeRO run that offloads its optimizer would JIT-build (g++,
  # about 3 minutes on 2 cores), and the shared-memory collectives every DeepSpeed run loads (deepspeed_shm_comm,
  # 48 CPU-s). A ZeRO test that starts first waits for the build's lock; the files that hold them start later.
  (t0=$(date +%s)
   if .venv/bin/python -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()' >/dev/null 2>&1
   then echo "test: DeepSpeed's CPU Adam and shared-memory ops are built ($(( $(date +%s) - t0 )) s)"
   else echo "test: could not pre-build DeepSpeed's CPU ops (the first ZeRO test builds them)"; fi) > outputs/prebuild_deepspeed.log &
  prebuild=$!
fi
for pid in "${pids[@]}"; do
  wait "$pid"
done
# Two workers (the machine has 2 cores; most tests wait on subprocesses); a test file stays on one worker so that
# its module fixtures (one trained run) are shared, not duplicated. The Slurm tests (a real cluster on this
# machine) run afterwards on their own, so that the jobs do not compete with the rest for the two cores.
# Files start longest first (tests/conftest.py LONGEST_FIRST), not in xdist's order by number of tests.
# The 20 slowest tests (wall time) and the 20 costliest (CPU time, tests/conftest.py) are printed at the end.
# Each worker's runs share the cores with the other worker's, so the suite sets what a user on a shared machine
# sets: one OpenMP thread per process (the product reads OMP_NUM_THREADS; it never looks at the load).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTEST=(.venv/bin/python -m pytest -q -n "${FINETUNE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder
        --durations=20)
background_builds_done() {
  local rc=0
  wait "$prebuild" || true
  cat outputs/prebuild_deepspeed.log
  wait "$llamacpp" || rc=$?
  sed 's/^/[llama.cpp env] /' "$llamacpp_log"
  return $rc
}
if [ $# -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi
rc=0
# the formatter and the linter (configured in pyproject.toml [tool.ruff]): a diff or a finding fails the run
.venv/bin/python -m ruff format --check . || rc=1
.venv/bin/python -m ruff check . || rc=1
"${PYTEST[@]}" -m "not slurm" || rc=$?
.venv/bin/python -m pytest -q -m slurm --durations=10 || { r=$?; [ $r -eq 5 ] || rc=$r; }
background_builds_done || rc=1
exit $rc
