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

    from mlxtune import DISTRIBUTION, _malloc, _schedule, backend, models, native

    info = backend.device_info()
    installed = _version(DISTRIBUTION)   # the distribution's name, not the import package's
    out = {
        "mlxtune": installed if installed != "not installed" else "source tree",
        "python": platform.python_version(),
        "platform": info["machine"],
        "backend": info["backend"],
        "profile": info["profile"] + (" (MLXTUNE_PROFILE=gpu: a GPU's choices, computed here)"
                                      if info["profile"] == "gpu" and info["backend"] == "cpu"
                                      else ""),
        "device": info.get("device_name", info["device"]),
        "blas": info["blas"],
        "host malloc": ("freed buffers kept for reuse (MLXTUNE_MALLOC=0: glibc's defaults)"
                        if _malloc.state["tuned"] else f"defaults ({_malloc.state['reason']})"),
        "CPU kernels": native.status_line(build=False).removeprefix("CPU kernels: "),
        "evaluation order": _schedule.status_line(),
        "compute dtype": backend.dtype_name(backend.compute_dtype()),
        "system memory": f"{info['system_memory_gb']:.1f} GB",
    }
    if "max_recommended_working_set_size" in info:
        out["GPU working set"] = f"{info['max_recommended_working_set_size'] / 1e9:.1f} GB"
    out["memory limit"] = (f"{mx.get_memory_limit() / 1e9:.1f} GB"
                           if hasattr(mx, "get_memory_limit") else "n/a")
    out["kernel self-check"] = kernel_line()
    for dist in ("mlx", "mlx-lm", "numpy", "gguf", "tokenizers", "transformers", "textual"):
        out[dist] = _version(dist)
    try:
        out["packaged model"] = str(models.packaged_path("smollm2-135m-instruct"))
    except Exception as e:  # the optional package may be missing; say so
        out["packaged model"] = f"unavailable ({e})"
    return out


# -- kernels ------------------------------------------------------------------------------

def kernel_line() -> str:
    """One line on the kernel self-checks run in this process (`report`)."""
    from mlxtune.quant import kernel_check

    records = kernel_check.self_check_results()
    if not records:
        return "none run in this process (`mlxtune doctor --kernels` runs every one)"
    failed = [r["kernel"] for r in records if r["status"] != "ok"]
    line = f"{len(records) - len(failed)} ok"
    return line + (f", {len(failed)} failed, reference used: {', '.join(failed)}" if failed else "")


def shim_module():
    """The C++ shim (tests/kernel_shim.py) of a source checkout, or None: it runs the
    kernels' exact Metal / CUDA source text on the CPU; a wheel does not ship it."""
    import importlib.util

    from mlxtune.quant import kernels

    try:
        path = kernels.kernel_dir().parent / "tests" / "kernel_shim.py"
    except FileNotFoundError:
        return None
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("mlxtune_kernel_shim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _not_run(source: str, reason: str) -> list:
    from mlxtune.quant import kernel_check

    return [{"kernel": kernel_check.kernel_name(fmt, op, dtype, lora, transpose), "backend": source,
             "runner": None, "format": fmt, "op": op, "dtype": dtype, "lora": lora,
             "transpose": transpose, "status": "not run", "max_error": None,
             "tolerance": None, "message": reason}
            for fmt in kernel_check.FORMATS for dtype in kernel_check.DTYPES
            for op, lora, transpose in kernel_check.VARIANTS]


def check_kernels(shim=None, log=None) -> tuple[list, list]:
    """Every kernel's self-check (format x dtype x op / LoRA / transpose), through the same
    first-use machinery a run uses, with the runner this machine has: MLX's kernel call on
    Metal / CUDA; on the CPU the C++ shim of a source checkout for each backend's source,
    where its compiler is present. Returns (notes, records)."""
    from mlxtune import backend
    from mlxtune.quant import kernel_check, kernels

    be = backend.name()
    if be in ("metal", "cuda"):
        notes = [f"GPU ({be}): each kernel launched through MLX's {be} kernel API, against "
                 "dequantize + matmul"]
        return notes, kernel_check.self_check_all()
    notes = ["no GPU: MLX's backend is the CPU here, so no kernel ran on a GPU"]
    shim = shim if shim is not None else shim_module()
    records = []
    for source in ("metal", "cuda"):
        problem = ("the C++ shim ships with the source tree only (tests/kernel_shim.py)"
                   if shim is None else shim.problem(source))
        if problem:
            notes.append(f"{source} source: not run ({problem})")
            records += _not_run(source, f"no GPU: not run ({problem})")
            continue
        notes.append(f"{source} source: each kernel's exact text compiled by "
                     f"{shim.compiler(source)} through the C++ shim and run on the CPU"
                     + (" (Metal address spaces kept)" if source == "metal" else ""))
        if log:
            log(f"{source}: compiling and running {len(_not_run(source, ''))} kernels through "
                "the C++ shim (cached after the first time)")
        with kernels.use_runner(shim.run_launch, source, "shim"):
            records += kernel_check.self_check_all()
    return notes, records


def kernel_table(records: list) -> list[str]:
    """The records as text lines: one row per kernel."""
    head = ("kernel", "backend", "runner", "status", "max error", "tolerance", "message")

    def num(v):
        return "-" if v is None else f"{v:.2e}"

    rows = [(r["kernel"], r["backend"] or "-", r["runner"] or "-", r["status"],
             num(r["max_error"]), num(r["tolerance"]),
             (r["message"].splitlines() or [""])[0][:100]) for r in records]
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head) - 1)]
    return [("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + "  " + row[-1]).rstrip()
            for row in [head, *rows]]
