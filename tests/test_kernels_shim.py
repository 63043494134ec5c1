"""The Metal and CUDA kernel sources, compiled as C++ and run on the CPU through the shim
(tests/kernel_shim.py), against float64 numpy on the reference dequantization: the same
header and body text, the same inputs and launch shape as mlxtune hands to MLX, in
float32, float16 and bfloat16. Metal text is compiled by clang++ with Metal's address
spaces (tests/shim/metal_shim.h): a pointer in the wrong space does not compile."""

import mlx.core as mx
import numpy as np
import pytest

import kernel_shim
from mlxtune.quant import formats, kernel_check, kernels, layouts

N_OUT, K_IN = 80, 512      # neither a multiple of the 32 x 32 tile in every direction
BACKENDS = [
    pytest.param("metal", marks=pytest.mark.skipif(kernel_shim.metal_problem() is not None,
                                                   reason=f"Metal shim: {kernel_shim.metal_problem()}")),
    pytest.param("cuda", marks=pytest.mark.skipif(kernel_shim.cuda_problem() is not None,
                                                  reason=f"CUDA shim: {kernel_shim.cuda_problem()}")),
]
needs_metal_shim = pytest.mark.skipif(kernel_shim.metal_problem() is not None,
                                      reason=f"Metal shim: {kernel_shim.metal_problem()}")
# clang's complaint about a pointer in the wrong address space (a type it names with one)
SPACE_ERROR = (r"(address space|no known conversion|cannot initialize)[^\n]*"
               r"(address space|device|constant|threadgroup)")
EPS = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def weights(fmt: str, rows=N_OUT, cols=K_IN, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if fmt == "nf4":
        arrays = layouts.nf4_from_dense(w)
        ref = formats.nf4_dequantize(layouts.nf4_to_reference(arrays))
    else:
        raw = formats.quantize(w, "Q6_K")
        arrays = layouts.gguf_q6_k(raw, w.shape)
        ref = formats.dequantize_raw(raw, "Q6_K", w.shape)
    return {k: mx.array(v) for k, v in arrays.items()}, ref.astype(np.float64)


def run(backend, fmt, x, arrays, transpose=False, lora=None):
    """(op, y as float64) of the launch mlxtune prepares, run by the shim."""
    launch = kernels.prepare(fmt, x, arrays, transpose, lora)
    spec = kernels.spec(backend, fmt, launch.op, launch.lora, launch.transpose)
    y = kernel_shim.run_launch(backend, spec, launch, x.dtype)
    assert y.dtype == x.dtype
    return launch.op, np.array(y.astype(mx.float32)).astype(np.float64)


def as_seen(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype`, as float64: what the kernel reads."""
    return np.array(mx.array(a).astype(getattr(mx, dtype)).astype(mx.float32), np.float64)


def assert_close(got, want, size, reduction, dtype):
    """Elementwise: the kernel sums `reduction` float32 products in some order, off the
    exact sum by at most (n + 1) * 2^-24 * sum|terms| (`size`, first-order bound for n
    terms and the products' own rounding), then rounds to `dtype`: at most eps/2 * |y|,
    taken as eps * |y|. A wrong index or decode is off by a fraction of |y| itself."""
    tol = EPS[dtype] * np.abs(want) + (reduction + 1) * 2.0 ** -24 * size
    bad = np.abs(got - want) > tol
    assert not bad.any(), (f"{bad.sum()} of {bad.size} outputs off; worst "
                           f"{np.abs(got - want).max():.3g}, tolerance there "
                           f"{tol.flat[np.argmax(np.abs(got - want))]:.3g}")


CASES = [  # (M, transpose, lora): which op they exercise
    (1, False, False), (5, False, True), (8, False, False),   # qmv
    (45, False, False), (70, False, True),                     # qmm
    (37, True, False),                                         # qmm transposed (backward)
]
HALF_CASES = [(5, False, True), (70, False, True), (37, True, False)]
DTYPE_CASES = ([("float32", *c) for c in CASES]
               + [(d, *c) for d in ("float16", "bfloat16") for c in HALF_CASES])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "q6_k"])
@pytest.mark.parametrize("dtype,M,transpose,lora", DTYPE_CASES)
def test_kernel_against_float64(backend, fmt, dtype, M, transpose, lora):
    arrays, w = weights(fmt)
    rng = np.random.default_rng(M)
    x = as_seen(rng.standard_normal((M, N_OUT if transpose else K_IN)).astype(np.float32), dtype)
    wt = w if transpose else w.T
    expected, size = x @ wt, np.abs(x) @ np.abs(wt)
    lora_args, rank = None, 0
    if lora:
        rank = 8
        xa = rng.standard_normal((M, rank)).astype(np.float32)
        lb = rng.standard_normal((rank, N_OUT)).astype(np.float32) * 0.1
        lora_args = (mx.array(xa), mx.array(lb), mx.array([2.5], mx.float32))
        xa, lb = as_seen(xa, dtype), as_seen(lb, dtype)
        expected += 2.5 * xa @ lb
        size += 2.5 * np.abs(xa) @ np.abs(lb)
    xm = mx.array(x.astype(np.float32)).astype(getattr(mx, dtype))
    op, got = run(backend, fmt, xm, arrays, transpose, lora_args)
    assert op == kernels.choose_op(M, transpose)
    assert_close(got, expected, size, x.shape[1] + rank, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_kernel_fails_this_test(backend, monkeypatch):
    """The comparison above can fail: the tiled kernel with one accumulator fed the wrong
    weight column (b0 for b1, a quarter of the outputs) is caught in bfloat16 too."""
    bad = kernels.header(backend).replace("acc11 += a1 * b1;", "acc11 += a1 * b0;")
    assert bad != kernels.header(backend)
    monkeypatch.setattr(kernels, "header", lambda b: bad)
    arrays, w = weights("nf4")
    x = as_seen(np.random.default_rng(1).standard_normal((40, K_IN)).astype(np.float32),
                "bfloat16")
    _, got = run(backend, "nf4", mx.array(x.astype(np.float32)).astype(mx.bfloat16), arrays)
    with pytest.raises(AssertionError, match="outputs off"):
        assert_close(got, x @ w.T, np.abs(x) @ np.abs(w.T), K_IN, "bfloat16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_arrays_are_padded_to_device_buffers(backend):
    """A 64 x 64 NF4 weight has one second-level scale: MLX would bind it as `constant`."""
    arrays, w = weights("nf4", rows=8, cols=64, seed=3)
    launch = kernels.prepare("nf4", mx.ones((2, 64)), arrays)
    assert all(a.size >= 8 for a in launch.inputs)
    _, got = run(backend, "nf4", mx.ones((2, 64)), arrays)
    np.testing.assert_allclose(got, np.tile(w.sum(1), (2, 1)), rtol=1e-5, atol=1e-5)


@needs_metal_shim
def test_unpadded_small_array_is_a_compile_error():
    """Without the padding, the one-element scale array is bound `constant` (as MLX binds
    it) and handed to the decoder's `device` pointer: the Metal shim refuses, as Metal does."""
    arrays, _ = weights("nf4", rows=8, cols=64, seed=3)
    launch = kernels.prepare("nf4", mx.ones((2, 64)), arrays)
    inputs = [kernel_shim.from_mlx(a) for a in launch.inputs]
    at = kernels.spec("metal", "nf4", "qmv", False).input_names.index("absmax_scale")
    inputs[at] = inputs[at][:1]
    spec = kernels.spec("metal", "nf4", launch.op, False)
    with pytest.raises(kernel_shim.CompileError, match=SPACE_ERROR):
        kernel_shim.run("metal", spec, inputs, kernel_shim.template_names(launch.template),
                        launch.grid, launch.threadgroup, launch.output_shape)


HELPERS = """
inline float first(const device float* p) { return p[0]; }
inline float first_constant(const constant float* p) { return p[0]; }
inline void fill(thread float* out, float v) { out[0] = v; }
"""
RIGHT = {  # each statement passes pointers of the right address space
    "device to device": "y[i] = first(x + i);",
    "threadgroup tile, generic read": "tile[i] = x[i]; threadgroup_barrier(mem_flags::mem_none);"
                                      " y[i] = tile[31 - i];",
    "thread to thread": "float v[1]; fill(v, x[i]); y[i] = v[0];",
}
WRONG = {  # the same with a pointer in another address space
    "threadgroup to device": "tile[i] = x[i]; y[i] = first(tile + i);",
    "device to thread": "fill(y + i, x[i]);",
    "thread to device": "float v[1]; v[0] = x[i]; y[i] = first(v);",
    "device to constant": "y[i] = first_constant(x + i);",
    "constant to device": "y[i] = first(LEVELS);",
}


def _space_spec(name, statement):
    body = ("threadgroup float tile[32];\nuint i = thread_index_in_threadgroup;\n(void)tile;\n"
            + statement)
    return kernels.Spec(name, ("x",), ("y",),
                        "constant float LEVELS[2] = {1.0f, 2.0f};\n" + HELPERS, body)


@needs_metal_shim
@pytest.mark.parametrize("case", list(RIGHT))
def test_right_address_spaces_compile_and_run(case):
    x = np.arange(32, dtype=np.float32)
    got = kernel_shim.run("metal", _space_spec("right", RIGHT[case]), [x], [("T", "float32")],
                          (32, 1, 1), (32, 1, 1), (32,))
    np.testing.assert_array_equal(got, x[::-1] if "tile" in case else x)


@needs_metal_shim
@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_address_space_is_rejected(case):
    x = np.arange(32, dtype=np.float32)
    with pytest.raises(kernel_shim.CompileError, match=SPACE_ERROR):
        kernel_shim.run("metal", _space_spec("wrong", WRONG[case]), [x], [("T", "float32")],
                        (32, 1, 1), (32, 1, 1), (32,))


@needs_metal_shim
def test_shim_reports_divergent_barriers(tmp_path):
    """The shim is not a pushover: a barrier inside divergent control flow fails."""
    spec = kernels.Spec("divergent", ("x",), ("y",), "", (
        "if (thread_index_in_threadgroup < 5) { threadgroup_barrier(mem_flags::mem_threadgroup); }"
        "\ny[thread_position_in_grid.x] = x[thread_position_in_grid.x];"))
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(RuntimeError, match="barrier"):
        kernel_shim.run("metal", spec, [x], [("T", "float32")], (64, 1, 1), (32, 1, 1), (64,))


@needs_metal_shim
def test_shim_shares_threadgroup_memory():
    """threadgroup arrays are shared by the group's threads and ordered by barriers."""
    spec = kernels.Spec("reverse", ("x",), ("y",), "", (
        "threadgroup float tile[64];\n"
        "uint i = thread_index_in_threadgroup;\n"
        "tile[i] = x[threadgroup_position_in_grid.x * 64 + i];\n"
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "y[threadgroup_position_in_grid.x * 64 + i] = tile[63 - i] + simd_sum(1.0f);"))
    x = np.arange(128, dtype=np.float32)
    got = kernel_shim.run("metal", spec, [x], [("T", "float32")], (128, 1, 1), (64, 1, 1),
                          (128,))
    np.testing.assert_array_equal(got, np.concatenate([x[:64][::-1], x[64:][::-1]]) + 32)


def test_bfloat16_conversions_round_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, 1e-40], np.float32)
    back = kernel_shim.bf16_to_float32(kernel_shim.bf16_from_float32(x))
    want = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(back, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_dispatch_with_fused_lora_and_its_vjp(monkeypatch, backend):
    """QuantLinear's GPU path (forward kernel with the LoRA epilogue, backward through the
    transposed kernel, LoRA gradients written out in the VJP) under the GPU profile, with
    kernels.matmul launching through the shim (after each kernel's self-check) in place of
    MLX's GPU: values and gradients against float64 numpy."""
    from mlx.utils import tree_flatten

    from mlxtune.adapters import LoRALinear
    from mlxtune.quant import QuantLinear, layers

    calls = []

    def shim(be, spec, launch, dtype):
        calls.append(spec.name)
        return kernel_shim.run_launch(be, spec, launch, dtype)

    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    kernel_check.reset_self_checks()
    layers._gpu_matmul.cache_clear()
    arrays, w = weights("q6_k")
    lora = LoRALinear(QuantLinear("q6_k", arrays, K_IN, N_OUT), rank=4, scale=0.5)
    rng = np.random.default_rng(5)
    a = rng.standard_normal((K_IN, 4)).astype(np.float32) * 0.1
    b = rng.standard_normal((4, N_OUT)).astype(np.float32) * 0.1
    lora.lora_a, lora.lora_b = mx.array(a), mx.array(b)
    x = rng.standard_normal((2, 20, K_IN)).astype(np.float32)   # 40 rows: the tiled kernel
    g = rng.standard_normal((2, 20, N_OUT)).astype(np.float32)

    def loss(params, x):
        lora.update(params)
        return (lora(x.astype(mx.float32)) * mx.array(g)).sum()

    with kernels.use_runner(shim, backend, "shim"):
        (value, grads), dx = mx.value_and_grad(loss)(lora.trainable_parameters(), mx.array(x)), \
            mx.grad(loss, argnums=1)(lora.trainable_parameters(), mx.array(x))
        mx.eval(value, grads, dx)
    kernel_check.reset_self_checks()
    layers._gpu_matmul.cache_clear()
    assert {"mlxtune_qmm_q6_k_lora", "mlxtune_qmm_q6_k_t"} <= set(calls)
    x64, g64, a64, b64 = (v.astype(np.float64).reshape(-1, v.shape[-1]) for v in (x, g, a, b))
    y64 = x64 @ w.T + 0.5 * (x64 @ a64) @ b64
    np.testing.assert_allclose(float(value), (y64 * g64).sum(), rtol=1e-5)
    grads = dict(tree_flatten(grads))
    np.testing.assert_allclose(np.array(grads["lora_a"]), 0.5 * x64.T @ (g64 @ b64.T),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(grads["lora_b"]), 0.5 * (x64 @ a64).T @ g64,
                               rtol=1e-4, atol=1e-5)
    dx64 = g64 @ w + 0.5 * (g64 @ b64.T) @ a64.T
    np.testing.assert_allclose(np.array(dx).reshape(-1, K_IN), dx64, rtol=1e-4, atol=1e-4)
