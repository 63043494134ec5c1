"""Blockwise causal attention (the CPU backend's training attention) computes what MLX's
own scaled_dot_product_attention computes, values and gradients, and the models it is
installed in give the same logits, packed rows and sliding windows included."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import attention, forward
from tests.test_forward import FAMILIES, _model, _tokens


def _qkv(seed, b, h, hk, length, d):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(s).astype(np.float32))
            for s in ((b, h, length, d), (b, hk, length, d), (b, hk, length, d))]


def numpy_attention(q, k, v, scale, keep):
    """float64 reference; keep: bool [B or 1, 1, L, L]."""
    q, k, v = (np.array(x, np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    s = np.where(keep, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bhjd->bhid", s / s.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("h,hk,length,block", [(4, 4, 37, 8), (6, 2, 64, 16), (6, 3, 50, 64),
                                                (2, 1, 33, 32)])
def test_causal_blocks_equal_numpy_and_mlx(h, hk, length, block):
    q, k, v = _qkv(0, 2, h, hk, length, 16)
    keep = np.tril(np.ones((length, length), bool))[None, None]
    got = attention.blockwise_attention(q, k, v, 0.25, "causal", block)
    np.testing.assert_allclose(np.array(got), numpy_attention(q, k, v, 0.25, keep),
                               rtol=1e-5, atol=1e-5)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    np.testing.assert_allclose(np.array(got), np.array(fused), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_query_that_sees_no_key_stays_finite(kind):
    """Left padding of a batched prompt: the padded queries may attend to nothing. Their
    output is unused but must be finite, and the other queries' outputs unchanged."""
    b, h, hk, length, pad = 1, 4, 2, 40, 9
    q, k, v = _qkv(2, b, h, hk, length, 8)
    pos = np.arange(length)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pad)  # keys before pad: none
    mask = mx.array(allowed)[None, None]
    if kind == "additive":
        mask = mx.where(mask, 0.0, -mx.inf)
    got = np.array(attention.blockwise_attention(q, k, v, 0.3, mask, block=16))
    assert np.isfinite(got).all()
    want = mx.fast.scaled_dot_product_attention(q[..., pad:, :], k[..., pad:, :],
                                                v[..., pad:, :], scale=0.3, mask="causal")
    np.testing.assert_allclose(got[..., pad:, :], np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive", "per-head"])
def test_array_masks_equal_mlx(kind):
    b, h, hk, length = 2, 4, 2, 40
    q, k, v = _qkv(1, b, h, hk, length, 8)
    segments = mx.array(np.repeat([[0, 1, 2, 3], [4, 4, 5, 6]], [7, 13, 15, 5], axis=1))
    mask = forward.segment_mask(segments)  # bool [B, 1, L, L], block-diagonal causal
    if kind == "additive":
        mask = mx.where(mask, 0.0, -1e9)
    elif kind == "per-head":
        mask = mx.broadcast_to(mask, (b, h, length, length))
    got = attention.blockwise_attention(q, k, v, 0.3, mask, block=16)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_gradients_equal_mlx():
    q, k, v = _qkv(2, 2, 6, 2, 45, 16)
    w = mx.array(np.random.default_rng(3).standard_normal((2, 6, 45, 16)).astype(np.float32))

    def grads(fn):
        return mx.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: attention.blockwise_attention(q, k, v, 0.25, "causal", 16))
    want = grads(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25,
                                                                      mask="causal"))
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4,
                                   atol=1e-5 * float(mx.abs(r).max()))


@pytest.mark.parametrize("case", list(FAMILIES))
def test_installed_models_give_the_same_logits(case, monkeypatch):
    model = _model(case)
    rng = np.random.default_rng(4)
    tokens = mx.array(np.stack(_tokens(rng, 40, 40)))
    segments = mx.array(np.repeat([[0, 1], [2, 2]], [25, 15], axis=1))
    before = [forward.logits(model, tokens), forward.logits(model, tokens, segments)]
    covered = attention.install(model)
    monkeypatch.setattr(attention, "BLOCK", 16)  # several blocks at L = 40
    calls = []  # either routed form: the native kernel (when built) or the blockwise one
    blockwise, kernel = attention.blockwise_attention, attention.native_attention
    monkeypatch.setattr(attention, "blockwise_attention",
                        lambda *a, **kw: calls.append(1) or blockwise(*a, **kw))
    monkeypatch.setattr(attention, "native_attention",
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    after = [forward.logits(model, tokens), forward.logits(model, tokens, segments)]
    for a, b in zip(after, before):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
    # Gemma 2 computes its own (soft-capped) attention: nothing to route there.
    assert covered == (case != "gemma2")
    assert bool(calls) == covered


def test_decoding_with_a_cache_takes_the_original_path(monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    model = _model("llama")
    attention.install(model)
    monkeypatch.setattr(attention, "BLOCK", 8)
    tokens = mx.array(np.arange(1, 21, dtype=np.int32)[None])
    cache = make_prompt_cache(model)
    prefill = model(tokens[:, :19], cache=cache)  # 19 queries, 19 keys: blockwise
    step = model(tokens[:, 19:], cache=cache)     # 1 query, 20 keys: the original
    full = model(tokens)
    np.testing.assert_allclose(np.array(prefill[0, -1]), np.array(full[0, 18]), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.array(step[0, -1]), np.array(full[0, -1]), rtol=1e-4,
                               atol=1e-4)
