"""The kernels on a real GPU through MLX (mx.fast.metal_kernel / cuda_kernel), and their
self-check there: run by .github/workflows/metal.yml on Apple Silicon (where the job fails
if Metal is unusable); skipped where MLX has no GPU backend."""

import os

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import backend
from mlxtune.quant import QuantLinear, formats, kernel_check, kernels, layouts


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


# MLXTUNE_REQUIRE_GPU=metal (or cuda): CI on a GPU machine; these tests then fail, rather
# than skip, where MLX finds no such GPU.
REQUIRED = os.environ.get("MLXTUNE_REQUIRE_GPU", "").strip().lower()
pytestmark = [pytest.mark.skipif(_gpu() is None and not REQUIRED,
                                 reason="no Metal or CUDA GPU in this MLX"),
              pytest.mark.gpu]  # on the GPU device (conftest), not the CPU path's


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
    assert _gpu() is not None, "MLXTUNE_REQUIRE_GPU is set but MLX finds no Metal or CUDA GPU"
    assert backend.name() == _gpu()
    if REQUIRED:
        assert _gpu() == REQUIRED


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


EPS = {mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("M,transpose,lora", [(6, False, True), (40, False, True),
                                              (50, True, False)])
def test_half_precision_on_the_gpu(dtype, M, transpose, lora):
    """Tolerance: float32 sums of n products in any order (n * 2^-24 * sum|terms|), then
    rounded to dtype (eps * |y|, eps = 2^-10 or 2^-7), elementwise."""
    arrays, w = weights("nf4")
    rng = np.random.default_rng(1)
    K = 96 if transpose else 512
    xm = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    x = np.array(xm.astype(mx.float32), np.float64)
    wt = w if transpose else w.T
    expected, size, n = x @ wt, np.abs(x) @ np.abs(wt), x.shape[1]
    args = None
    if lora:
        xa = mx.array(rng.standard_normal((M, 8)).astype(np.float32)).astype(dtype)
        lb = mx.array((rng.standard_normal((8, 96)) * 0.1).astype(np.float32)).astype(dtype)
        args = (xa, lb, mx.array([1.5], mx.float32))
        xa64, lb64 = (np.array(a.astype(mx.float32), np.float64) for a in (xa, lb))
        expected = expected + 1.5 * xa64 @ lb64
        size, n = size + 1.5 * np.abs(xa64) @ np.abs(lb64), n + 8
    got = kernels.matmul("nf4", xm, arrays, transpose, args)
    assert got.dtype == dtype
    got = np.array(got.astype(mx.float32), np.float64)
    tol = EPS[dtype] * np.abs(expected) + (n + 1) * 2.0 ** -24 * size
    assert (np.abs(got - expected) <= tol).all(), np.abs(got - expected).max()


def test_every_kernel_passes_its_self_check_on_the_gpu():
    """Every format x dtype x variant, through MLX's kernel API: 'ok', none falls back."""
    kernel_check.reset_self_checks()
    records = kernel_check.self_check_all()
    bad = [r for r in records if r["status"] != "ok"]
    assert not bad, "\n".join(f"{r['kernel']}: {r['status']} {r['message'][:300]}" for r in bad)
    assert {r["runner"] for r in records} == {"mlx"}
    assert {r["backend"] for r in records} == {_gpu()}


def test_matmul_launches_the_checked_kernel():
    kernel_check.reset_self_checks()
    arrays, w = weights("q6_k")
    x = np.random.default_rng(3).standard_normal((33, 512)).astype(np.float32)
    got = np.array(kernels.matmul("q6_k", mx.array(x), arrays))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-4,
                               atol=1e-4 * np.abs(got).max())
    (record,) = kernel_check.self_check_results()
    assert (record["kernel"], record["runner"], record["status"]) == (
        "mlxtune_qmm_q6_k[float32]", "mlx", "ok")


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
