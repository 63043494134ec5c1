"""Device, dtype policy and memory facts for the backend MLX is running on."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

from mlxtune import _blas


def name() -> str:
    """'metal', 'cuda' or 'cpu': the backend the default device computes on."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def compute_dtype(requested: str = "auto") -> mx.Dtype:
    """The dtype to train in. On the CPU backend bf16/fp16 have no BLAS path (~30x slower),
    so 'auto' means float32 there and bfloat16 on GPUs."""
    if requested != "auto":
        return getattr(mx, requested)
    return mx.float32 if name() == "cpu" else mx.bfloat16


def blas() -> str:
    return _blas.describe()


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_info() -> dict:
    info = {"backend": name(), "device": str(mx.default_device()), "blas": blas(),
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
