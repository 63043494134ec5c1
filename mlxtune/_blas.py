"""Pick an optimized BLAS for MLX's CPU backend on Linux, before MLX is imported.

The mlx-cpu wheel bundles the reference (netlib) BLAS, about 30x slower than OpenBLAS for
float32 matmuls. Loading the system OpenBLAS with RTLD_GLOBAL before the first
``import mlx.core`` makes MLX's BLAS symbols resolve to it; no re-exec or LD_PRELOAD needed.
This module must not import mlx.
"""

import ctypes
import os
import sys

# Debian/Ubuntu's libopenblas0-pthread, then other common locations.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for `mlxtune doctor` and the run's start event.
state = {"loaded": None, "reason": ""}


def preload() -> None:
    if state["loaded"] is not None or state["reason"]:
        return
    if not sys.platform.startswith("linux"):
        state["reason"] = "not Linux (MLX uses Accelerate / Metal)"
        return
    if os.environ.get("MLXTUNE_BLAS", "").lower() in ("0", "off", "bundled"):
        state["reason"] = "disabled by MLXTUNE_BLAS"
        return
    if "mlx.core" in sys.modules:
        state["reason"] = "mlx.core was imported before mlxtune; bundled BLAS in use"
        return
    wanted = os.environ.get("MLXTUNE_BLAS")
    for path in ([wanted] if wanted else []) + list(CANDIDATES):
        if path and os.path.exists(path):
            try:
                lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError as e:
                state["reason"] = f"could not load {path}: {e}"
                continue
            state["loaded"] = path
            state["reason"] = ""
            # openblas_{get,set}_num_threads: for train.cpu_streams; absent in other BLASes.
            state["handle"] = lib if hasattr(lib, "openblas_set_num_threads") else None
            return
    state["reason"] = (
        "no system OpenBLAS found; install it (Debian/Ubuntu: apt-get install "
        "libopenblas0-pthread) for ~30x faster float32 matmuls on the CPU"
    )


def threads() -> int | None:
    """OpenBLAS's thread count per call; None when another BLAS is in use."""
    lib = state.get("handle")
    return int(lib.openblas_get_num_threads()) if lib is not None else None


def set_threads(n: int) -> None:
    """Threads per OpenBLAS call (no-op for another BLAS)."""
    lib = state.get("handle")
    if lib is not None:
        lib.openblas_set_num_threads(int(n))


def describe() -> str:
    if state["loaded"]:
        return f"OpenBLAS ({state['loaded']})"
    if sys.platform == "darwin":
        return "Accelerate"
    return f"bundled reference BLAS ({state['reason']})"
