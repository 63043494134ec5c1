"""Device, dtype policy and memory facts for the backend MLX is running on."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

from mlxtune import _blas


PROFILES = ("cpu", "gpu")


def name() -> str:
    """'metal', 'cuda' or 'cpu': the backend the default device computes on. Use it for
    what the hardware is (memory, device info, which kernel API to launch through); use
    `profile()` for every choice of compute path."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def profile() -> str:
    """'gpu' or 'cpu': whose choices the compute path follows. A GPU backend is always
    'gpu' (`MLXTUNE_PROFILE=cpu` on a machine with a GPU makes `import mlxtune` put MLX's
    default device on the CPU, so the CPU path runs there). On the CPU backend
    `MLXTUNE_PROFILE=gpu` makes every backend-dependent choice
    as on Metal/CUDA (bfloat16 compute, MLX's attention, the quantized layers' own
    forward and backward, our kernels' dispatch served by their reference), computed on
    the CPU: the way the GPU path is tested on machines without one. Read on every call,
    so a test can switch it."""
    requested = os.environ.get("MLXTUNE_PROFILE", "").strip().lower()
    if requested and requested not in PROFILES:
        raise ValueError(f"MLXTUNE_PROFILE={requested!r}: expected one of "
                         f"{', '.join(PROFILES)}")
    if name() != "cpu":
        return "gpu"
    return requested or "cpu"


def gpu_profile() -> bool:
    """Whether the compute path is the GPU's (a GPU backend, or MLXTUNE_PROFILE=gpu)."""
    return profile() == "gpu"


def plan_backend() -> str:
    """The backend the memory planner plans this machine's steps for: the hardware's,
    except that the GPU profile on a CPU plans as on Metal (the same compute path)."""
    hardware = name()
    return "metal" if hardware == "cpu" and gpu_profile() else hardware


def compute_dtype(requested: str = "auto") -> mx.Dtype:
    """The dtype to train in. On the CPU backend bf16/fp16 have no BLAS path (~30x slower),
    so 'auto' means float32 there and bfloat16 on GPUs (and under the GPU profile)."""
    if requested != "auto":
        return getattr(mx, requested)
    return mx.bfloat16 if gpu_profile() else mx.float32


def dtype_name(dtype: mx.Dtype) -> str:
    """'bfloat16', 'float32', ...: a dtype as events and reports write it."""
    return str(dtype).replace("mlx.core.", "")


def blas() -> str:
    return _blas.describe()


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_info() -> dict:
    info = {"backend": name(), "profile": profile(), "device": str(mx.default_device()), "blas": blas(),
            "system_memory_gb": round(system_memory_bytes() / 1e9, 2),
            "machine": f"{platform.system()} {platform.machine()}"}
    try:
        di = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        for k in ("device_name", "architecture", "memory_size", "max_recommended_working_set_size"):
            if k in di:
                info[k] = di[k]
    except Exception:  # not every backend reports device info
        pass
    return info


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def reset_peak_memory() -> None:
    mx.reset_peak_memory()
