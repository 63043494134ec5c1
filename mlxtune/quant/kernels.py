"""Our quantized-matmul kernels (kernels/metal/*.metal, kernels/cuda/*.cu) and their
dispatch through mx.fast.metal_kernel / mx.fast.cuda_kernel.

A kernel is built the first time it is used (some MLX builds raise when a Metal kernel is
merely constructed without Metal), once per (backend, format, op, LoRA, transpose); MLX
compiles one specialization per dtype. `spec` gives the exact header and body text handed
to MLX: tests/kernel_shim.py compiles and runs that same text on the CPU.

  qmv  y = x @ W.T for M <= 8 rows (generation, evaluation): one simdgroup / warp per
       output column, packed words decoded once for all rows.
  qmm  tiled y = x @ W.T, or x @ W with transpose (the backward pass), any M.
Both add `lora_scale * xa @ lb` in their epilogue when given the LoRA term.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

FORMAT_INPUTS = {"nf4": ("weight", "absmax_q", "absmax_scale"),
                 "q6_k": ("weight", "weight_high", "scales", "d")}
QMV_MAX_M = 8      # these four mirror the constants in kernels/*/qmm.*
QMV_ROWS = 4
QMM_TILE = 32
QMM_THREADS = 256
SIMD = 32

# How each backend's body builds the decoder (formats.metal / formats.cu).
_DECODER = {
    "metal": {"nf4": "mlxtune::Nf4Weights{weight, absmax_q, absmax_scale, as_type<float>(params[5]), KW}",
              "q6_k": "mlxtune::Q6kWeights{weight, weight_high, scales, d, KW}"},
    "cuda": {"nf4": "mlxtune::Nf4Weights{weight, absmax_q, absmax_scale, __uint_as_float(params[5]), KW}",
             "q6_k": "mlxtune::Q6kWeights{weight, weight_high, scales, d, KW}"},
}
_FILES = {"metal": ("metal/formats.metal", "metal/qmm.metal"),
          "cuda": ("cuda/formats.cu", "cuda/qmm.cu")}


def kernel_dir() -> Path:
    """kernels/ of a source checkout, else the copy shipped in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "kernels", here.parent / "kernels"):
        if (candidate / "metal").is_dir():
            return candidate
    raise FileNotFoundError(f"kernel sources not found next to {here}")


@functools.cache
def header(backend: str) -> str:
    return "\n".join((kernel_dir() / f).read_text() for f in _FILES[backend])


@dataclass(frozen=True)
class Spec:
    name: str
    input_names: tuple
    output_names: tuple
    header: str
    source: str


def spec(backend: str, fmt: str, op: str, lora: bool, transpose: bool = False) -> Spec:
    """The header and body handed to mx.fast.{metal,cuda}_kernel; template arguments:
    T (the dtype of x and y), LORA, and for qmm TRANS."""
    if op == "qmv" and transpose:
        raise ValueError("qmv has no transposed form")
    inputs = ("x", *FORMAT_INPUTS[fmt], "params") + (("xa", "lb") if lora else ())
    xa, lb = ("xa", "lb") if lora else ("x", "x")   # not read when LORA is false
    metal = backend == "metal"
    as_float = "as_type<float>" if metal else "__uint_as_float"
    lines = [
        "uint M = params[0], N = params[1], K = params[2], R = params[3];",
        f"float lora_scale = {as_float}(params[4]);",
        f"uint KW = {'TRANS ? N : K' if op == 'qmm' else 'K'};  // columns of W",
        f"auto w = {_DECODER[backend][fmt]};",
    ]
    if op == "qmv":
        if metal:
            n, lane = ("threadgroup_position_in_grid.x * mlxtune::QMV_ROWS + "
                       "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup")
        else:
            n, lane = "blockIdx.x * mlxtune::QMV_ROWS + threadIdx.x / 32", "threadIdx.x % 32"
        lines.append(f"mlxtune::qmv<T, decltype(w), LORA>(x, w, y, M, N, K, {xa}, {lb}, R, "
                     f"lora_scale, {n}, {lane});")
    else:
        shared = "threadgroup" if metal else "__shared__"
        lines[:0] = [f"{shared} float xs[mlxtune::QMM_TILE * mlxtune::QMM_STRIDE];",
                     f"{shared} float ws[mlxtune::QMM_TILE * mlxtune::QMM_STRIDE];"]
        group, lid = (("threadgroup_position_in_grid", "thread_index_in_threadgroup") if metal
                      else ("uint3{blockIdx.x, blockIdx.y, blockIdx.z}", "threadIdx.x"))
        lines.append(f"mlxtune::qmm<T, decltype(w), TRANS, LORA>(x, w, y, M, N, K, {xa}, {lb}, R, "
                     f"lora_scale, xs, ws, {group}, {lid});")
    name = f"mlxtune_{op}_{fmt}" + ("_lora" if lora else "") + ("_t" if transpose else "")
    return Spec(name, inputs, ("y",), header(backend), "\n".join(lines))


def template(op: str, dtype, lora: bool, transpose: bool) -> list:
    t = [("T", dtype), ("LORA", lora)]
    return t + [("TRANS", transpose)] if op == "qmm" else t


def launch_shape(op: str, M: int, N: int) -> tuple[tuple, tuple]:
    """(grid in threads, threadgroup), as both MLX kernel APIs take them."""
    if op == "qmv":
        groups = -(-N // QMV_ROWS)
        return (groups * QMV_ROWS * SIMD, 1, 1), (QMV_ROWS * SIMD, 1, 1)
    return ((-(-N // QMM_TILE)) * QMM_THREADS, -(-M // QMM_TILE), 1), (QMM_THREADS, 1, 1)


def choose_op(M: int, transpose: bool) -> str:
    return "qmv" if M <= QMV_MAX_M and not transpose else "qmm"


# -- dispatch through MLX ---------------------------------------------------------------

@functools.cache
def _kernel(backend: str, fmt: str, op: str, lora: bool, transpose: bool):
    import mlx.core as mx

    s = spec(backend, fmt, op, lora, transpose)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(name=s.name, input_names=list(s.input_names),
                output_names=list(s.output_names), source=s.source, header=s.header)


def _at_least_8(a):
    """MLX binds inputs of fewer than 8 elements in Metal's constant address space; pad so
    every input is a device buffer, as the kernels declare them."""
    import mlx.core as mx

    if a.size >= 8:
        return a
    flat = a.reshape(-1)
    return mx.concatenate([flat, mx.zeros((8 - a.size,), a.dtype)])


def params(M: int, N: int, K: int, R: int, lora_scale, offset):
    """uint32[8]: M, N, K, R, lora_scale and the NF4 absmax offset as float bits, padding."""
    import mlx.core as mx

    def one(v):
        return (v if isinstance(v, mx.array) else mx.array(v)).astype(mx.float32).reshape(-1)[:1]

    floats = mx.concatenate([one(lora_scale), one(offset)])
    return mx.concatenate([mx.array([M, N, K, R], mx.uint32), mx.view(floats, mx.uint32),
                           mx.zeros((2,), mx.uint32)])


@dataclass
class Launch:
    """Everything one kernel call needs, backend aside."""
    op: str
    lora: bool
    transpose: bool
    inputs: list
    template: list
    grid: tuple
    threadgroup: tuple
    output_shape: tuple


def prepare(fmt: str, x, arrays: dict, transpose: bool = False, lora=None) -> Launch:
    """x (M, K) @ W.T -> (M, N) with W (N, K) packed in `arrays` (or, with transpose,
    x (M, K) @ W with W (K, N)); `lora` = (xa (M, R), lb (R, N), scale (1,) float32)."""
    import mlx.core as mx

    rows, cols = arrays["weight"].shape[0], arrays["weight"].shape[1] * 8
    M, K = x.shape
    N = cols if transpose else rows
    if (rows if transpose else cols) != K:
        raise ValueError(f"x has {K} columns, W is {rows} x {cols}")
    op = choose_op(M, transpose)
    R = lora[0].shape[-1] if lora is not None else 0
    scale = lora[2] if lora is not None else mx.zeros((1,))
    offset = arrays.get("absmax_offset", mx.zeros((1,)))
    inputs = [x, *[_at_least_8(arrays[k]) for k in FORMAT_INPUTS[fmt]],
              params(M, N, K, R, scale, offset)]
    if lora is not None:
        inputs += [lora[0].astype(x.dtype), lora[1].astype(x.dtype)]
    grid, group = launch_shape(op, M, N)
    return Launch(op, lora is not None, transpose, inputs,
                  template(op, x.dtype, lora is not None, transpose), grid, group, (M, N))


def matmul(fmt: str, x, arrays: dict, transpose: bool = False, lora=None):
    """Run `prepare`'s launch on the current GPU backend."""
    from mlxtune import backend

    be = backend.name()
    if be not in ("metal", "cuda"):
        raise RuntimeError(f"no quantized kernels for the {be} backend (use the CPU path)")
    p = prepare(fmt, x, arrays, transpose, lora)
    kernel = _kernel(be, fmt, p.op, p.lora, p.transpose)
    return kernel(inputs=p.inputs, template=p.template, grid=p.grid, threadgroup=p.threadgroup,
                  output_shapes=[p.output_shape], output_dtypes=[x.dtype])[0]
