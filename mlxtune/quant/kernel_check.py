"""The first-use self-check of our quantized-matmul kernels (see kernels.py): each kernel
(format, op, dtype, LoRA, transpose) runs once on a small random problem against
dequantize + matmul, and is judged against `tolerance`; the records feed the run's start
event and `mlxtune doctor`."""

from __future__ import annotations

import functools
import logging
import math
import re
import threading

from mlxtune.quant.kernels import (FORMAT_INPUTS, Runner, active_runner, check_launch,
                                   dtype_str, prepare, spec)

log = logging.getLogger(__name__)

FORMATS = tuple(FORMAT_INPUTS)
DTYPES = ("float32", "float16", "bfloat16")
VARIANTS = (("qmv", False, False), ("qmv", True, False),     # (op, lora, transpose)
            ("qmm", False, False), ("qmm", True, False),
            ("qmm", False, True), ("qmm", True, True))
# Machine epsilon (spacing of 1) of each compute dtype: 2^-23, 2^-10, 2^-7.
EPS = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
CHECK_ROWS, CHECK_COLS, CHECK_RANK = 40, 256, 4   # W: 40 x 256 (q6_k needs 256 | K)


def tolerance(dtype: str, reduction: int, ref_max: float, abs_max: float) -> float:
    """The largest difference a correct kernel can show against `reference`.

    Both compute every output as a float32 sum of `reduction` products (K of x and W, R of
    the LoRA term) in some order, from the same inputs; a float32 sum of n terms is off by
    at most n * u * sum|terms| (u = 2^-24, Higham's bound to first order), so the two differ
    by at most 2 n u sum|terms|; +2 terms allow a decoded weight to differ by an ulp (a
    fused multiply-add in the decoder). Then each result is rounded to the output dtype,
    half an ulp: at most eps(dtype) * |y| between the two. Taken at the worst element:
    eps * max|y| + 2 (n + 2) u * max sum|terms|. bfloat16: ~0.8% of max|y|; float16:
    ~0.1%; float32: ~3e-5 of the largest sum of |terms| for K = 256. A wrong index, a
    wrong decode or a dropped term moves outputs by a sizeable fraction of |y| (one of
    K = 256 terms of similar size is ~6% of a typical |y|), far above it.
    """
    return EPS[dtype] * ref_max + 2 * (reduction + 2) * 2.0 ** -24 * abs_max


def kernel_name(fmt: str, op: str, dtype: str, lora: bool, transpose: bool) -> str:
    return (f"mlxtune_{op}_{fmt}" + ("_lora" if lora else "") + ("_t" if transpose else "")
            + f"[{dtype}]")


@functools.cache
def _check_weights(fmt: str):
    import numpy as np

    from mlxtune.quant import formats, layouts

    rng = np.random.default_rng(20)
    w = (rng.standard_normal((CHECK_ROWS, CHECK_COLS)) * 0.05).astype(np.float32)
    if fmt == "nf4":
        return layouts.nf4_from_dense(w)
    return layouts.gguf_q6_k(formats.quantize(w, "Q6_K"), w.shape)


def check_problem(fmt: str, op: str, dtype: str, lora: bool, transpose: bool):
    """(x, arrays, lora) of a self-check: W 40 x 256 (40 rows: not a multiple of the 32 x
    32 tile; an NF4 second-level scale array of one element, padded for the launch), 3 rows
    of x for qmv, 40 for qmm, LoRA rank 4; from a fixed seed."""
    import mlx.core as mx
    import numpy as np

    arrays = {k: mx.array(v) for k, v in _check_weights(fmt).items()}
    rng = np.random.default_rng(21)
    M = 3 if op == "qmv" else 40
    K, N = (CHECK_ROWS, CHECK_COLS) if transpose else (CHECK_COLS, CHECK_ROWS)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(getattr(mx, dtype))
    args = None
    if lora:
        args = (mx.array(rng.standard_normal((M, CHECK_RANK)).astype(np.float32)),
                mx.array((rng.standard_normal((CHECK_RANK, N)) * 0.1).astype(np.float32)),
                mx.array([1.5], mx.float32))
    return x, arrays, args


def _one_line(message: str) -> str:
    """A record's message as one short line: a compiler's first `error:` diagnostic (its
    file:line:col dropped) after the exception's name, else the first line."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return ""
    pick = lines[0]
    diagnostic = next((ln for ln in lines[1:] if re.search(r"\berror:", ln)), None)
    if diagnostic:
        pick = f"{pick.split(':')[0]}: " + re.sub(r"^\S*:\d+:\d+:\s*", "", diagnostic)
    return pick if len(pick) <= 240 else pick[:237] + "..."


def self_check(fmt: str, op: str, dtype: str, lora: bool, transpose: bool, backend: str,
               runner: Runner, runner_name: str = "") -> dict:
    """Run one kernel once on its check problem through `runner`; the record (not stored)."""
    import mlx.core as mx

    from mlxtune.quant import layouts

    record = {"kernel": kernel_name(fmt, op, dtype, lora, transpose), "backend": backend,
              "runner": runner_name, "format": fmt, "op": op, "dtype": dtype, "lora": lora,
              "transpose": transpose, "status": "not run", "max_error": None,
              "tolerance": None, "message": ""}
    x, arrays, args = check_problem(fmt, op, dtype, lora, transpose)
    p = prepare(fmt, x, arrays, transpose, args)
    assert p.op == op, (p.op, op)
    w = layouts.dequantize(fmt, arrays)
    wt = w if transpose else w.T
    xf = x.astype(mx.float32)
    want = xf @ wt                              # float32, before rounding to dtype
    size = mx.abs(xf) @ mx.abs(wt)              # sum of |terms| per output
    if args is not None:
        xa, lb = (a.astype(x.dtype).astype(mx.float32) for a in args[:2])
        scale = args[2].item()
        want = want + scale * (xa @ lb)
        size = size + abs(scale) * (mx.abs(xa) @ mx.abs(lb))
    reduction = x.shape[1] + (CHECK_RANK if args is not None else 0)
    record["tolerance"] = tol = tolerance(dtype, reduction, mx.abs(want).max().item(),
                                          size.max().item())
    try:
        s = spec(backend, fmt, op, lora, transpose)
        check_launch(s, p)
        y = runner(backend, s, p, x.dtype)
        mx.eval(y)
        if tuple(y.shape) != p.output_shape or y.dtype != x.dtype:
            raise ValueError(f"output {tuple(y.shape)} {y.dtype}, expected "
                             f"{p.output_shape} {x.dtype}")
        err = mx.abs(y.astype(mx.float32) - want).max().item()
    except Exception as e:  # a compile error, MLX refusing the launch, ...: recorded
        record.update(status="error", message=f"{type(e).__name__}: {e}"[:4000])
        return record
    if not math.isfinite(err):
        record.update(status="mismatch", message="non-finite output (unwritten or overflow)")
    else:
        record["max_error"] = err
        ok = err <= tol
        record.update(status="ok" if ok else "mismatch",
                      message="" if ok else f"max error {err:.3g} > tolerance {tol:.3g}")
    return record


_records: dict = {}      # (backend, runner name, fmt, op, dtype, lora, transpose) -> record
_lock = threading.RLock()


def checked(backend: str, runner: Runner, runner_name: str, fmt: str, op: str, dtype: str,
             lora: bool, transpose: bool) -> dict:
    """The record of this kernel, checking it first if this is its first use: the one
    place a kernel is judged, on a GPU and off it alike."""
    key = (backend, runner_name, fmt, op, dtype, lora, transpose)
    with _lock:
        record = _records.get(key)
        if record is None:
            record = self_check(fmt, op, dtype, lora, transpose, backend, runner, runner_name)
            _records[key] = record
            if record["status"] != "ok":
                log.warning("mlxtune: kernel %s (%s, %s) failed its self-check, %s: %s; "
                            "dequantize + matmul computes it for the rest of this process",
                            record["kernel"], backend, runner_name or "runner",
                            record["status"], _one_line(record["message"]))
        return record


def self_check_all(formats=FORMATS, dtypes=DTYPES, variants=VARIANTS) -> list:
    """Every kernel of `formats` x `dtypes` x `variants` through the first-use check (each
    is checked once per process); their records. With no runner (the CPU backend, none
    set), records 'not run'."""
    active = active_runner()
    out = []
    for fmt in formats:
        for dtype in dtypes:
            for op, lora, transpose in variants:
                if active is None:
                    out.append({"kernel": kernel_name(fmt, op, dtype, lora, transpose),
                                "backend": None, "runner": None, "format": fmt, "op": op,
                                "dtype": dtype, "lora": lora, "transpose": transpose,
                                "status": "not run", "max_error": None, "tolerance": None,
                                "message": "no GPU: MLX's backend is the CPU and no kernel "
                                           "runner is available"})
                else:
                    out.append(dict(checked(*active, fmt, op, dtype, lora, transpose)))
    return out


def self_check_results() -> list:
    """The records of every kernel checked in this process (copies), in a stable order."""
    with _lock:
        return [dict(_records[k]) for k in sorted(_records, key=str)]


def self_check_summary(formats=(), dtype=None) -> list:
    """JSON-able list for the run's start event and `mlxtune doctor`: one dict per kernel
    checked in this process, {kernel, backend, runner, format, op, dtype, lora, transpose,
    status ('ok' | 'mismatch' | 'error'), max_error, tolerance, message}. Given `formats`
    (e.g. the model's quantized formats) and `dtype` (the compute dtype), every kernel of
    those is checked first where a runner exists (on Metal / CUDA), so the record holds
    before the first step; on the CPU backend that adds nothing."""
    if formats and active_runner() is not None:
        self_check_all(tuple(formats), (dtype_str(dtype or "float32"),))
    return self_check_results()


def reset_self_checks() -> None:
    """Forget every record (tests)."""
    with _lock:
        _records.clear()
