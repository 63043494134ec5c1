"""The kernels on a real GPU through MLX (mx.fast.metal_kernel / cuda_kernel): run by
.github/workflows/metal.yml on Apple Silicon; skipped where MLX has no GPU backend."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import backend
from mlxtune.quant import QuantLinear, formats, kernels, layouts


def _gpu() -> str | None:
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    try:
        if mx.cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return None


pytestmark = pytest.mark.skipif(_gpu() is None, reason="no Metal or CUDA GPU in this MLX")


def weights(fmt, rows=96, cols=512, seed=0):
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


def test_backend_is_the_gpu():
    assert backend.name() == _gpu()


@pytest.mark.parametrize("fmt", ["nf4", "q6_k"])
@pytest.mark.parametrize("M,transpose,lora", [(1, False, False), (6, False, True),
                                              (77, False, False), (64, False, True),
                                              (50, True, False)])
def test_kernels_on_the_gpu(fmt, M, transpose, lora):
    arrays, w = weights(fmt)
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, w.shape[0] if transpose else w.shape[1])).astype(np.float32)
    expected = x.astype(np.float64) @ (w if transpose else w.T)
    args = None
    if lora:
        xa = rng.standard_normal((M, 8)).astype(np.float32)
        lb = rng.standard_normal((8, w.shape[0])).astype(np.float32) * 0.1
        args = (mx.array(xa), mx.array(lb), mx.array([1.5], mx.float32))
        expected += 1.5 * xa.astype(np.float64) @ lb.astype(np.float64)
    got = np.array(kernels.matmul(fmt, mx.array(x), arrays, transpose, args))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_on_the_gpu(dtype):
    arrays, w = weights("nf4")
    x = np.random.default_rng(1).standard_normal((40, 512)).astype(np.float32)
    got = kernels.matmul("nf4", mx.array(x).astype(dtype), arrays)
    assert got.dtype == dtype
    expected = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), expected, rtol=5e-2,
                               atol=1e-2 * np.abs(expected).max())


def test_layer_gradients_on_the_gpu():
    from mlx.utils import tree_flatten

    from mlxtune.adapters import LoRALinear

    arrays, w = weights("nf4")
    lora = LoRALinear(QuantLinear("nf4", arrays, 512, 96), rank=4, scale=2.0)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((512, 4)).astype(np.float32) * 0.1
    b = rng.standard_normal((4, 96)).astype(np.float32) * 0.1
    lora.lora_a, lora.lora_b = mx.array(a), mx.array(b)
    x = rng.standard_normal((3, 16, 512)).astype(np.float32)
    g = rng.standard_normal((3, 16, 96)).astype(np.float32)

    def loss(params, x):
        lora.update(params)
        return (lora(x) * mx.array(g)).sum()

    grads = dict(tree_flatten(mx.grad(loss)(lora.trainable_parameters(), mx.array(x))))
    dx = mx.grad(loss, argnums=1)(lora.trainable_parameters(), mx.array(x))
    x64, g64, a64, b64 = (v.astype(np.float64).reshape(-1, v.shape[-1]) for v in (x, g, a, b))
    np.testing.assert_allclose(np.array(grads["lora_b"]), 2.0 * (x64 @ a64).T @ g64,
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.array(grads["lora_a"]), 2.0 * x64.T @ (g64 @ b64.T),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.array(dx).reshape(-1, 512),
                               g64 @ w + 2.0 * (g64 @ b64.T) @ a64.T, rtol=1e-3, atol=1e-3)
