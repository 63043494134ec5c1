"""mlxtune.native's CPU attention primitive against a float64 numpy reference (forward) and
MLX's own autodiff of mx.fast.scaled_dot_product_attention (gradients)."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import _blas, attention, forward, native

pytestmark = pytest.mark.skipif(native._unavailable() is not None,
                                reason=f"native kernels: {native._unavailable()}")


def _qkv(seed, b, h, hk, length, d, dv=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, length, d)).astype(np.float32)
    k = rng.standard_normal((b, hk, length, d)).astype(np.float32)
    v = rng.standard_normal((b, hk, length, dv or d)).astype(np.float32)
    return q, k, v


def _reference(q, k, v, scale, mask):
    """softmax over the visible keys (j <= i and mask), float64; rows that see no key: 0."""
    b, h, length, _ = q.shape
    rep = h // k.shape[1]
    kk = np.repeat(k.astype(np.float64), rep, axis=1)
    vv = np.repeat(v.astype(np.float64), rep, axis=1)
    scores = q.astype(np.float64) @ kk.swapaxes(-1, -2) * scale
    visible = np.tril(np.ones((length, length), bool))[None, None]
    if mask is not None:
        visible = visible & mask
    scores = np.where(visible, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.where(visible, np.exp(scores - top), 0.0)
    total = p.sum(-1, keepdims=True)
    p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    return p @ vv


def _segments_mask(b, length, seed):
    rng = np.random.default_rng(seed)
    segments = np.zeros((b, length), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        for s, c in enumerate(cuts):
            segments[r, c:] = s + 1
    return forward.segment_mask(mx.array(segments))


CASES = {
    # name: (b, h, hk, length, d, dv)
    "causal, GQA 3, several blocks": (2, 6, 2, 300, 32, 32),
    "one head, length below a block": (1, 1, 1, 50, 16, 16),
    "value dim differs": (2, 4, 4, 200, 24, 40),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mask_kind", ["causal", "packed", "packed, one plane"])
def test_forward_equals_the_reference(native_kernels, case, mask_kind):
    b, h, hk, length, d, dv = CASES[case]
    q, k, v = _qkv(0, b, h, hk, length, d, dv)
    mask = None if mask_kind == "causal" else _segments_mask(b, length, 1)
    if mask is not None and mask_kind.endswith("one plane"):
        mask = mask[:1]
    got = native_kernels.causal_attention(mx.array(q), mx.array(k), mx.array(v), 0.3, mask)
    want = _reference(q, k, v, 0.3, None if mask is None else np.array(mask))
    np.testing.assert_allclose(np.array(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mask_kind", ["causal", "packed"])
def test_gradients_equal_mlx_autodiff(native_kernels, mask_kind):
    b, h, hk, length = 2, 6, 2, 260
    q, k, v = (mx.array(a) for a in _qkv(2, b, h, hk, length, 16))
    mask = "causal" if mask_kind == "causal" else _segments_mask(b, length, 3)
    w = mx.array(np.random.default_rng(4).standard_normal((b, h, length, 16)).astype(np.float32))

    def grads(fn):
        return mx.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: native_kernels.causal_attention(
        q, k, v, 0.25, None if isinstance(mask, str) else mask))
    want = grads(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25,
                                                                      mask=mask))
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4,
                                   atol=2e-5 * float(mx.abs(r).max()))


def test_compiled_step_equals_eager(native_kernels):
    q, k, v = (mx.array(a) for a in _qkv(5, 1, 4, 2, 150, 8))

    def loss(q, k, v):
        return (native_kernels.causal_attention(q, k, v, 0.5, None) ** 2).sum()

    eager = mx.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    compiled = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.array(compiled[0]), np.array(eager[0]), rtol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_no_key_gets_zero_output_and_gradient(native_kernels):
    b, h, length = 1, 2, 140
    q, k, v = (mx.array(a) for a in _qkv(6, b, h, h, length, 8))
    keep = np.tril(np.ones((length, length), bool))
    keep[:5] = False  # the left padding of a batched prompt: queries 0-4 see nothing
    keep[:, :5] = False
    mask = mx.array(keep[None, None])
    out = native_kernels.causal_attention(q, k, v, 1.0, mask)
    assert np.isfinite(np.array(out)).all()
    np.testing.assert_array_equal(np.array(out[:, :, :5]), 0.0)
    np.testing.assert_allclose(np.array(out), _reference(np.array(q), np.array(k),
                                                         np.array(v), 1.0, keep),
                               rtol=2e-5, atol=2e-5)
    dq = mx.grad(lambda q: native_kernels.causal_attention(q, k, v, 1.0, mask).sum())(q)
    assert np.isfinite(np.array(dq)).all()
    np.testing.assert_array_equal(np.array(dq[:, :, :5]), 0.0)


def test_strided_inputs_equal_contiguous_ones(native_kernels):
    q, k, v = _qkv(7, 2, 4, 2, 130, 8)
    # [B, L, H, D] storage seen as [B, H, L, D], as mlx_lm's projections produce them
    qs, ks, vs = (mx.array(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
                  for a in (q, k, v))
    got = native_kernels.causal_attention(qs, ks, vs, 0.3, None)
    want = native_kernels.causal_attention(mx.array(q), mx.array(k), mx.array(v), 0.3, None)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_bad_arguments_raise(native_kernels):
    q = mx.zeros((1, 2, 8, 4))
    with pytest.raises(ValueError, match="float32"):
        native_kernels.causal_attention(q.astype(mx.float16), q, q, 1.0, None)
    with pytest.raises(ValueError, match="multiple"):
        native_kernels.causal_attention(q, mx.zeros((1, 3, 8, 4)), mx.zeros((1, 3, 8, 4)), 1.0, None)
    with pytest.raises(ValueError, match="mask"):
        native_kernels.causal_attention(q, q, q, 1.0, mx.ones((1, 2, 8, 8), mx.bool_))


def test_the_blas_thread_count_is_restored(native_kernels):
    before = _blas.threads()
    q, k, v = (mx.array(a) for a in _qkv(8, 2, 4, 4, 140, 8))
    mx.eval(mx.grad(lambda q: native_kernels.causal_attention(q, k, v, 1.0, None).sum())(q))
    assert _blas.threads() == before


def test_the_router_takes_the_kernel_only_where_it_applies(native_kernels):
    q, k, v = (mx.array(a) for a in _qkv(9, 1, 2, 2, 140, 8))
    assert attention.native_attention(q, k, v, 1.0, "causal") is not None
    assert attention.native_attention(q, k, v, 1.0, mx.zeros((140, 140))) is None  # additive
    per_head = mx.ones((1, 2, 140, 140), mx.bool_)
    assert attention.native_attention(q, k, v, 1.0, per_head) is None
    half = q.astype(mx.float16)
    assert attention.native_attention(half, half, half, 1.0, "causal") is None


def test_a_failed_build_is_reported_and_leaves_no_module(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    with pytest.raises(native.BuildError, match="failed"):
        native.build()
    assert not native.module_path().exists()
    assert (native.module_path().parent / "build.log").exists()
    # remembered: the next call says so at once instead of compiling again
    with pytest.raises(native.BuildError, match="earlier build failed"):
        native.build()
