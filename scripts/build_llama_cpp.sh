#!/usr/bin/env bash
# Build the reference llama.cpp (the copy vendored in llama-cpp-python==0.3.36)
# and set up a Python venv whose `llama_cpp` ctypes bindings load the shared
# libllama.so built here.  One C++ compile only: the pip install below is done
# with -DLLAMA_BUILD=OFF so it compiles nothing, and the bindings are pointed
# at our library with LLAMA_CPP_LIB_PATH (honoured by llama_cpp/llama_cpp.py).
#
# Usage:
#   scripts/build_llama_cpp.sh            # build (idempotent; ~15 min on 2 cores)
#   FORCE=1 scripts/build_llama_cpp.sh    # rebuild from scratch
#
# Environment:
#   LMAP_LLAMA_CPP_DIR   install/cache dir  (default ~/.cache/lmap/llama.cpp-0.3.36)
#   LMAP_LLAMA_SDIST     path to llama_cpp_python-0.3.36.tar.gz
#                        (default /work/cache/dl/...; downloaded with pip if missing)
#   LMAP_LLAMA_VENV      venv for the Python bindings (default $LMAP_LLAMA_CPP_DIR/venv)
#   LMAP_LLAMA_TARGETS   cmake targets (default: llama-bench llama-tokenize
#                        llama-perplexity llama-completion llama-simple)
#   JOBS                 parallel jobs (default nproc)
#   LMAP_LLAMA_AMX       1 keeps ggml's AMX kernels where -march=native enables them
#                        (default 0: on the Sapphire Rapids VMs used here ggml's AMX
#                        prompt path dies with SIGILL in tileloadd, although a plain
#                        AMX program runs; without AMX ggml uses its AVX-512/VNNI kernels)
#
# Result:
#   $LMAP_LLAMA_CPP_DIR/build/bin/{llama-bench,llama-tokenize,...,libllama.so}
#   $LMAP_LLAMA_VENV/bin/python   (import llama_cpp works after
#                                  `export LLAMA_CPP_LIB_PATH=$LMAP_LLAMA_CPP_DIR/build/bin`)
#   $LMAP_LLAMA_CPP_DIR/env.sh    (source it to get LLAMA_CPP_LIB_PATH etc.)
#
# Examples:
#   D=~/.cache/lmap/llama.cpp-0.3.36
#   $D/build/bin/llama-bench -m model.gguf -t 2 -p 512 -n 128 -r 3
#   $D/build/bin/llama-tokenize -m model.gguf -p "Hello world" --ids --log-disable
#   source $D/env.sh && $LMAP_LLAMA_PY scripts/make_fixtures.py
set -euo pipefail

VERSION=0.3.36
LLAMA_CPP_COMMIT=0c1e57098   # from the sdist's CHANGELOG.md ("update llama.cpp to ggml-org/llama.cpp@0c1e57098")
DIR="${LMAP_LLAMA_CPP_DIR:-$HOME/.cache/lmap/llama.cpp-$VERSION}"
SDIST="${LMAP_LLAMA_SDIST:-/work/cache/dl/llama_cpp_python-$VERSION.tar.gz}"
VENV="${LMAP_LLAMA_VENV:-$DIR/venv}"
TARGETS="${LMAP_LLAMA_TARGETS:-llama-bench llama-tokenize llama-perplexity llama-completion llama-simple}"
AMX="${LMAP_LLAMA_AMX:-0}"
ISA_FLAGS=""
if [[ "$AMX" != 1 ]]; then
  # GCC's explicit -mno-* flags win over -march=native whatever their order on the command line.
  ISA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
JOBS="${JOBS:-$(nproc)}"
SRC="$DIR/llama_cpp_python-$VERSION"
BUILD="$DIR/build"

mkdir -p "$DIR"
if [[ "${FORCE:-0}" == 1 ]]; then
  rm -rf "$SRC" "$BUILD" "$DIR/.built" "$VENV"
fi

# 1. sdist -------------------------------------------------------------------
if [[ ! -f "$SDIST" ]]; then
  SDIST_DIR="$DIR/dl"
  mkdir -p "$SDIST_DIR"
  SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
  if [[ ! -f "$SDIST" ]]; then
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
  fi
fi
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
  echo "[build_llama_cpp] extracting $SDIST"
  tar -xzf "$SDIST" -C "$DIR"
fi

# 2. llama.cpp binaries + shared libs ----------------------------------------
stamp="$DIR/.built"
want="targets=$TARGETS amx=$AMX"
built_ok=1
[[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] || built_ok=0
for t in $TARGETS; do [[ -x "$BUILD/bin/$t" ]] || built_ok=0; done
[[ -f "$BUILD/bin/libllama.so" ]] || built_ok=0
if [[ $built_ok == 1 ]]; then
  echo "[build_llama_cpp] already built in $BUILD (FORCE=1 to rebuild)"
else
  echo "[build_llama_cpp] configuring in $BUILD"
  cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$ISA_FLAGS" \
    -DCMAKE_CXX_FLAGS="$ISA_FLAGS" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT" \
    -Wno-dev
  echo "[build_llama_cpp] building: $TARGETS (jobs=$JOBS)"
  # shellcheck disable=SC2086
  cmake --build "$BUILD" --config Release -j "$JOBS" --target llama $TARGETS
  echo "$want" > "$stamp"
fi

# 3. Python bindings (no compile) ---------------------------------------------
if [[ ! -x "$VENV/bin/python" ]] || ! LLAMA_CPP_LIB_PATH="$BUILD/bin" "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "[build_llama_cpp] creating venv $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # LLAMA_BUILD=OFF / LLAVA_BUILD=OFF: install only the Python package; the
  # bindings load $BUILD/bin/libllama.so through LLAMA_CPP_LIB_PATH.
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "$VENV/bin/python" -m pip install -q "$SDIST"
  LLAMA_CPP_LIB_PATH="$BUILD/bin" "$VENV/bin/python" -c \
    "import llama_cpp; print('[build_llama_cpp] llama_cpp', llama_cpp.__version__, 'OK')"
fi

cat > "$DIR/env.sh" <<EOF
# source this file to use the reference llama.cpp build
export LMAP_LLAMA_CPP_DIR="$DIR"
export LMAP_LLAMA_BIN="$BUILD/bin"
export LMAP_LLAMA_PY="$VENV/bin/python"
export LLAMA_CPP_LIB_PATH="$BUILD/bin"
export LMAP_LLAMA_CPP_COMMIT="$LLAMA_CPP_COMMIT"
EOF
echo "[build_llama_cpp] done: binaries in $BUILD/bin, python $VENV/bin/python, env $DIR/env.sh"
