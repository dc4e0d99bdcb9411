#!/usr/bin/env bash
# Create llama.cpp's own virtual environment, .venv-llamacpp at the repo root: what `finetune export` converts and
# quantises with, and what `finetune generate` / `finetune chat` run a .gguf file with.
#
#   bash scripts/setup_llamacpp_env.sh            # or: finetune setup-llamacpp (finetune export builds it on first use)
#   bash scripts/setup_llamacpp_env.sh --force    # rebuild it
#
# Everything comes from llama.cpp itself, at one pinned version: the source distribution of llama-cpp-python 0.3.36
# (PyPI) vendors llama.cpp. Installing it compiles llama.cpp for this CPU (g++ and cmake) and gives the Python
# bindings (llama_cpp) that run GGUF files and quantise them (llama_model_quantize, the function llama.cpp's
# llama-quantize tool calls: finetune/tools/llama_quantize.py); the converters convert_hf_to_gguf.py /
# convert_lora_to_gguf.py with their gguf-py are kept from the same source (llama.cpp/). The converters need torch and transformers 4.57 (llama.cpp's pins),
# which the main environment cannot take (transformers 5.6 there): hence an environment of its own. Every package
# is pinned in requirements-llamacpp.lock (a full freeze, installed with --no-deps; the sdist's sha256 is checked).
# Like scripts/setup_collie_env.sh, it is built once per lock hash under ${FINETUNE_CACHE:-~/.cache/finetune} and
# .venv-llamacpp links to it; FINETUNE_NO_CACHE=1 builds .venv-llamacpp in place; FINETUNE_LLAMACPP_VENV=<dir>
# puts it elsewhere. Needs Python 3.11, g++ and cmake. About 1.3 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-llamacpp.lock
source scripts/env_cache.sh
env_prepare setup-llamacpp "$LOCK" "${FINETUNE_LLAMACPP_VENV:-.venv-llamacpp}" llamacpp-venv
[ "${1:-}" = "--force" ] && rm -rf "$TARGET"

if env_ready bin/python; then
  echo "setup-llamacpp: environment for $LOCK ($HASH) is ready ($TARGET)"
else
  start=$(date +%s)
  for tool in g++ cmake; do
    command -v "$tool" >/dev/null || { echo "setup-llamacpp: needs $tool to compile llama.cpp (Debian: apt-get install -y g++ cmake)" >&2; exit 1; }
  done
  echo "setup-llamacpp: building llama.cpp's environment in $TARGET (first time: packages, then llama.cpp compiles: about 8 CPU-minutes, 4-6 minutes on 2 cores)"
  rm -rf "$TARGET"                         # the stamp is written last: an interrupted build is never taken as ready
  "$PY" -m venv "$TARGET"
  VERSION=$(sed -n 's/^llama-cpp-python==//p' "$LOCK")
  SHA=$(sed -n 's/^# llama-cpp-python sdist sha256: //p' "$LOCK")
  echo "setup-llamacpp: [1/3] packages (torch, transformers, build tools)"
  grep -v '^llama-cpp-python==' "$LOCK" > "$TARGET/deps.lock"
  "$TARGET/bin/python" -m pip install --no-deps --progress-bar off -r "$TARGET/deps.lock" \
    | sed -un 's/ (from -r .*//; s/^\(Collecting\|Processing\) /  /p; s/^Successfully installed.*/  installed/p'
  echo "setup-llamacpp: [2/3] llama-cpp-python $VERSION source distribution (llama.cpp inside)"
  mkdir -p "$TARGET/src"
  "$TARGET/bin/python" -m pip download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    -d "$TARGET/src" "llama-cpp-python==$VERSION"
  sdist="$TARGET/src/llama_cpp_python-$VERSION.tar.gz"
  got=$(sha256sum "$sdist" | cut -d' ' -f1)
  [ "$got" = "$SHA" ] || { echo "setup-llamacpp: $sdist has sha256 $got, the lock says $SHA" >&2; exit 1; }
  tar -xzf "$sdist" -C "$TARGET/src"
  src="$TARGET/src/llama_cpp_python-$VERSION"
  # llama.cpp's converters, their model classes and gguf-py, from the same commit as the compiled library
  mkdir -p "$TARGET/llama.cpp"
  for f in convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py LICENSE; do
    cp -r "$src/vendor/llama.cpp/$f" "$TARGET/llama.cpp/"
  done
  echo "setup-llamacpp: [3/3] compiling llama.cpp (ggml and the llama library the bindings load); one line per 10 files"
  # The bindings' own build (scikit-build-core, no build isolation: the pinned build tools) of ggml and llama only:
  # no tools (llama-quantize would pull in llama.cpp's common library and, once tools are on, the multimodal mtmd
  # library: a third more to compile; the bindings quantise through the same C function), no server, tests or
  # examples; LLAVA_BUILD=OFF keeps the bindings from adding mtmd themselves (llama_cpp loads it only for image chat).
  # (--config-settings, not -C: pip before 23.1, Debian 12's python3, has only the long form)
  set +e
  PATH="$TARGET/bin:$PATH" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
    "$TARGET/bin/python" -m pip install -v --no-deps --no-build-isolation --progress-bar off \
      --config-settings build-dir="$TARGET/src/build" "$src" 2>&1 \
    | tee "$TARGET/src/build.log" \
    | awk '/^ *\[[0-9]+\/[0-9]+\] /{ split($1, a, /[\[\/\]]/); if (a[2] % 10 == 0 || a[2] == a[3]) { print "  " $1; fflush() } }
           /^Successfully installed/{ print "  " $0; fflush() }'
  status=${PIPESTATUS[0]}
  set -e  # (with it on, a failing pipeline would have ended the script before its log tail was shown)
  [ "$status" = 0 ] || { tail -30 "$TARGET/src/build.log" >&2; echo "setup-llamacpp: compiling llama.cpp failed (log above)" >&2; exit 1; }
  rm -rf "$TARGET/src" "$TARGET/deps.lock"
  "$TARGET/bin/python" -c 'import llama_cpp; print("setup-llamacpp: llama_cpp", llama_cpp.__version__, "loads; system:", llama_cpp.llama_print_system_info().decode().strip())'
  "$TARGET/bin/python" -c 'import llama_cpp; llama_cpp.llama_model_quantize_default_params()' \
    || { echo "setup-llamacpp: llama_cpp's quantiser (llama_model_quantize) cannot be called" >&2; exit 1; }
  "$TARGET/bin/python" "$TARGET/llama.cpp/convert_hf_to_gguf.py" --help >/dev/null \
    || { echo "setup-llamacpp: llama.cpp's convert_hf_to_gguf.py does not start" >&2; exit 1; }
  env_stamp
  echo "setup-llamacpp: built in $(( $(date +%s) - start )) s"
fi

env_link setup-llamacpp
echo "setup-llamacpp: ready: $LINK -> $TARGET. Try: finetune export <run folder> --to gguf"
