"""`mlxtune doctor`: what mlxtune will compute on, and with which versions."""

from __future__ import annotations

import importlib.metadata
import platform


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict:
    import mlx.core as mx

    from mlxtune import _malloc, backend, models, native

    info = backend.device_info()
    out = {
        "mlxtune": importlib.metadata.version("mlxtune") if _version("mlxtune") != "not installed"
        else "source tree",
        "python": platform.python_version(),
        "platform": info["machine"],
        "backend": info["backend"],
        "device": info.get("device_name", info["device"]),
        "blas": info["blas"],
        "host malloc": ("freed buffers kept for reuse (MLXTUNE_MALLOC=0: glibc's defaults)"
                        if _malloc.state["tuned"] else f"defaults ({_malloc.state['reason']})"),
        "CPU kernels": native.describe() if info["backend"] == "cpu" else "MLX's fused kernels",
        "compute dtype": str(backend.compute_dtype()).replace("mlx.core.", ""),
        "system memory": f"{info['system_memory_gb']:.1f} GB",
    }
    if "max_recommended_working_set_size" in info:
        out["GPU working set"] = f"{info['max_recommended_working_set_size'] / 1e9:.1f} GB"
    out["memory limit"] = (f"{mx.get_memory_limit() / 1e9:.1f} GB"
                           if hasattr(mx, "get_memory_limit") else "n/a")
    for dist in ("mlx", "mlx-lm", "numpy", "gguf", "tokenizers", "transformers", "textual"):
        out[dist] = _version(dist)
    try:
        out["packaged model"] = str(models.packaged_path("smollm2-135m-instruct"))
    except Exception as e:  # the optional package may be missing; say so
        out["packaged model"] = f"unavailable ({e})"
    return out
