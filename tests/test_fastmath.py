"""The CPU backend's vectorised exp, softmax and SwiGLU (mlxtune.fastmath) against numpy
in float64 and against MLX's and mlx_lm's own functions, values and gradients."""

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from mlxtune import backend, fastmath, forward
from tests.test_forward import FAMILIES, _model, _tokens


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32))


def test_exp_is_within_two_ulp_over_the_float32_range():
    x = np.concatenate([np.linspace(-87.3, 88.3, 1_000_001, dtype=np.float32),
                        np.random.default_rng(0).normal(0, 3, 100_000).astype(np.float32)])
    got = np.array(fastmath.exp(mx.array(x)))
    ulps = _ulps(got, np.exp(x.astype(np.float64)))
    assert ulps.max() <= 2.0, (ulps.max(), x[ulps.argmax()])


def test_exp_limits_and_dtypes():
    x = mx.array([-np.inf, -1e30, -100.0, 0.0, 89.0, 1e30, np.inf, np.nan], mx.float32)
    got = np.array(fastmath.exp(x))
    np.testing.assert_array_equal(got[:-1], [0, 0, 0, 1, np.inf, np.inf, np.inf])
    assert np.isnan(got[-1])
    half = mx.array([-2.0, 0.5, 3.0], mx.bfloat16)
    out = fastmath.exp(half)
    assert out.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.exp([-2.0, 0.5, 3.0]),
                               rtol=1e-2)


def test_negated_exp_equals_exp_of_the_negation():
    # e^-x with the sign flipped on the bits (the sigmoid's form), limits and NaN included
    x = np.concatenate([np.linspace(-90, 90, 10_001, dtype=np.float32),
                        np.array([-np.inf, -1e30, 1e30, np.inf, np.nan], np.float32)])
    f = mx.compile(lambda v: fastmath._exp_ops(v, negate=True))
    got, want = np.array(f(mx.array(x))), np.array(fastmath.exp(mx.array(-x)))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[-1])


def test_softmax_equals_numpy_and_its_gradient_mlx():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 4, (3, 5, 70)).astype(np.float32)
    x[..., 50:] = np.finfo(np.float32).min  # masked scores, as the attention writes them
    got = np.array(fastmath.softmax(mx.array(x)))
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert (got[..., 50:] == 0).all()
    weights = mx.array(rng.normal(size=x.shape).astype(np.float32))

    def grad(f):
        return np.array(mx.grad(lambda v: (f(v) * weights).sum())(mx.array(x)))

    np.testing.assert_allclose(grad(fastmath.softmax), grad(lambda v: mx.softmax(v, -1)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_swiglu_equals_mlx_lm(dtype):
    rng = np.random.default_rng(2)
    gate = mx.array(rng.normal(0, 6, (4, 33, 48)).astype(np.float32)).astype(dtype)
    x = mx.array(rng.normal(size=(4, 33, 48)).astype(np.float32)).astype(dtype)
    weights = mx.array(rng.normal(size=(4, 33, 48)).astype(np.float32))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == mx.float32 else {"rtol": 2e-2, "atol": 2e-2}
    ours, theirs = fastmath.swiglu(gate, x), mlx_lm_swiglu(gate, x)
    assert ours.dtype == theirs.dtype == dtype
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)),
                               np.array(theirs.astype(mx.float32)), **tol)

    def grads(f):
        g = mx.grad(lambda a, b: (f(a, b).astype(mx.float32) * weights).sum(),
                    argnums=(0, 1))(gate, x)
        return [np.array(v.astype(mx.float32)) for v in g]

    for a, b in zip(grads(fastmath.swiglu), grads(mlx_lm_swiglu)):
        np.testing.assert_allclose(a, b, **tol)


def test_extreme_gates_stay_finite():
    gate = mx.array([-1e4, -100.0, -88.5, 0.0, 88.5, 100.0, 1e4], mx.float32)
    out, grad = mx.value_and_grad(lambda g: fastmath.swiglu(g, mx.ones_like(g)).sum())(gate)
    silu = np.array(fastmath.swiglu(gate, mx.ones_like(gate)))
    np.testing.assert_allclose(silu, [0, 0, 0, 0, 88.5, 100, 1e4], atol=1e-30)
    assert np.isfinite(np.array(grad)).all()


@pytest.mark.parametrize("case", list(FAMILIES))
def test_installed_models_give_the_same_logits(case, monkeypatch):
    model = _model(case)
    module = sys.modules[type(model).__module__]
    if hasattr(getattr(module, "swiglu", None), "_mlxtune_original"):  # an earlier test's
        monkeypatch.setattr(module, "swiglu", module.swiglu._mlxtune_original)
    tokens = mx.array(np.stack(_tokens(np.random.default_rng(4), 40, 40)))
    before = forward.logits(model, tokens)
    covered = fastmath.install(model)
    calls = []
    routed = fastmath._swiglu
    monkeypatch.setattr(fastmath, "_swiglu", lambda *a: calls.append(1) or routed(*a))
    after = forward.logits(model, tokens)
    np.testing.assert_allclose(np.array(after), np.array(before), rtol=1e-4, atol=1e-4)
    assert covered == hasattr(module, "swiglu")
    assert bool(calls) == covered


def test_mlxtune_fastmath_0_keeps_mlx_ops(monkeypatch):
    assert fastmath.enabled()
    monkeypatch.setenv("MLXTUNE_FASTMATH", "0")
    assert not fastmath.enabled()
    x = mx.array(np.random.default_rng(5).normal(size=(3, 7)).astype(np.float32))
    np.testing.assert_array_equal(np.array(fastmath.softmax(x)),
                                  np.array(mx.softmax(x, axis=-1, precise=True)))


def test_other_backends_keep_mlx_ops(monkeypatch):
    monkeypatch.setattr(backend, "name", lambda: "metal")
    assert not fastmath.enabled()
    x = mx.array(np.random.default_rng(3).normal(size=(2, 9)).astype(np.float32))
    np.testing.assert_array_equal(np.array(fastmath.softmax(x)),
                                  np.array(mx.softmax(x, axis=-1, precise=True)))
    routed = fastmath._routed(lambda g, v: g * 0 + 7)
    np.testing.assert_array_equal(np.array(routed(x, x)), np.full((2, 9), 7.0))
