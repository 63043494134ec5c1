"""The Metal and CUDA kernel sources, compiled as C++ and run on the CPU through the shim
(tests/kernel_shim.py), against float64 numpy on the reference dequantization. The same
header and body text, the same inputs and launch shape as mlxtune hands to MLX."""

import mlx.core as mx
import numpy as np
import pytest

import kernel_shim
from mlxtune.quant import formats, kernels, layouts

pytestmark = pytest.mark.skipif(kernel_shim.compiler() is None, reason="no C++ compiler")

N_OUT, K_IN = 80, 512      # neither a multiple of the 32 x 32 tile in every direction
BACKENDS = ["metal", "cuda"]


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
    launch = kernels.prepare(fmt, x, arrays, transpose, lora)
    spec = kernels.spec(backend, fmt, launch.op, launch.lora, launch.transpose)
    inputs = [np.array(a) for a in launch.inputs]
    template = [(k, v if isinstance(v, bool) else str(v).split(".")[-1])
                for k, v in launch.template]
    return launch.op, kernel_shim.run(backend, spec, inputs, template, launch.grid,
                                      launch.threadgroup, launch.output_shape)


CASES = [  # (M, transpose, lora): which op they exercise
    (1, False, False), (5, False, True), (8, False, False),   # qmv
    (45, False, False), (70, False, True),                     # qmm
    (37, True, False),                                         # qmm transposed (backward)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "q6_k"])
@pytest.mark.parametrize("M,transpose,lora", CASES)
def test_kernel_against_float64(backend, fmt, M, transpose, lora):
    arrays, w = weights(fmt)
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, N_OUT if transpose else K_IN)).astype(np.float32)
    expected = x.astype(np.float64) @ (w if transpose else w.T)
    lora_args = None
    if lora:
        xa = rng.standard_normal((M, 8)).astype(np.float32)
        lb = rng.standard_normal((8, N_OUT)).astype(np.float32) * 0.1
        lora_args = (mx.array(xa), mx.array(lb), mx.array([2.5], mx.float32))
        expected += 2.5 * xa.astype(np.float64) @ lb.astype(np.float64)
    op, got = run(backend, fmt, mx.array(x), arrays, transpose, lora_args)
    assert op == kernels.choose_op(M, transpose)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [3, 40])
def test_half_inputs(backend, M):
    arrays, w = weights("nf4", rows=64, cols=256, seed=1)
    x = np.random.default_rng(2).standard_normal((M, 256)).astype(np.float16)
    _, got = run(backend, "nf4", mx.array(x), arrays)
    assert got.dtype == np.float16
    expected = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-2,
                               atol=2e-3 * np.abs(expected).max())


def test_small_arrays_are_padded_to_device_buffers():
    """A 64 x 64 NF4 weight has one second-level scale: MLX would bind it as `constant`."""
    arrays, w = weights("nf4", rows=8, cols=64, seed=3)
    launch = kernels.prepare("nf4", mx.ones((2, 64)), arrays)
    assert all(a.size >= 8 for a in launch.inputs)
    _, got = run("metal", "nf4", mx.ones((2, 64)), arrays)
    np.testing.assert_allclose(got, np.tile(w.sum(1), (2, 1)), rtol=1e-5, atol=1e-5)


def test_shim_reports_divergent_barriers(tmp_path):
    """The shim is not a pushover: a barrier inside divergent control flow fails."""
    spec = kernels.Spec("divergent", ("x",), ("y",), "", (
        "if (thread_index_in_threadgroup < 5) { threadgroup_barrier(mem_flags::mem_threadgroup); }"
        "\ny[thread_position_in_grid.x] = x[thread_position_in_grid.x];"))
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(RuntimeError, match="barrier"):
        kernel_shim.run("metal", spec, [x], [("T", "float32")], (64, 1, 1), (32, 1, 1), (64,))


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_dispatch_with_fused_lora_and_its_vjp(monkeypatch, backend):
    """QuantLinear's GPU path (forward kernel with the LoRA epilogue, backward through the
    transposed kernel, LoRA gradients written out in the VJP) with the kernels run by the
    shim in place of MLX's GPU: values and gradients against float64 numpy."""
    from mlx.utils import tree_flatten

    from mlxtune.adapters import LoRALinear
    from mlxtune.quant import QuantLinear, layers

    def shim_matmul(fmt, x, arrays, transpose=False, lora=None):
        return mx.array(run(backend, fmt, x, arrays, transpose, lora)[1])

    monkeypatch.setattr(layers, "_backend", lambda: backend)
    monkeypatch.setattr(kernels, "matmul", shim_matmul)
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
        return (lora(x) * mx.array(g)).sum()

    (value, grads), dx = mx.value_and_grad(loss)(lora.trainable_parameters(), mx.array(x)), \
        mx.grad(loss, argnums=1)(lora.trainable_parameters(), mx.array(x))
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
    layers._gpu_matmul.cache_clear()
