"""mlxtune.native's cross-entropy primitive against a float64 numpy reference: the loss,
its gradient with respect to the hidden states, the positions it skips, and its errors."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import _blas


def _case(seed, n, d, vocab, active_share=0.7):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d)).astype(np.float32)
    w = (rng.standard_normal((vocab, d)) * 0.5).astype(np.float32)
    targets = rng.integers(0, vocab, n).astype(np.int32)
    active = rng.random(n) < active_share
    cotangent = rng.standard_normal(n).astype(np.float32)
    return h, w, targets, active, cotangent


def _reference(h, w, targets, active, cotangent):
    """(loss [N], d (cotangent . loss) / d h [N, D]) in float64; 0 at inactive positions."""
    logits = h.astype(np.float64) @ w.astype(np.float64).T
    top = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - top)
    lse = top[:, 0] + np.log(e.sum(axis=-1))
    loss = (lse - logits[np.arange(len(h)), targets]) * active
    d_logits = e / e.sum(axis=-1, keepdims=True)
    d_logits[np.arange(len(h)), targets] -= 1
    grad = (d_logits @ w.astype(np.float64)) * (cotangent * active)[:, None]
    return loss, grad


# 600 positions with a 1,000-word vocabulary: three chunks of 256 rows, the last partial.
@pytest.mark.parametrize("n,d,vocab", [(1, 8, 5), (37, 16, 300), (600, 32, 1000)])
@pytest.mark.parametrize("with_grad", [True, False])
def test_loss_and_gradient_match_numpy(native_kernels, n, d, vocab, with_grad):
    h, w, targets, active, cotangent = _case(n, n, d, vocab)
    f = lambda x: native_kernels.cross_entropy(x, mx.array(w), mx.array(targets), mx.array(active),
                                       with_grad)
    loss, (grad,) = mx.vjp(f, [mx.array(h)], [mx.array(cotangent)])
    want_loss, want_grad = _reference(h, w, targets, active, cotangent)
    np.testing.assert_allclose(np.array(loss[0]), want_loss, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-4,
                               atol=1e-5 * np.abs(want_grad).max())


def test_inactive_positions_cost_nothing_and_give_zero(native_kernels):
    h, w, targets, _, cotangent = _case(5, 40, 8, 50)
    active = np.zeros(40, bool)
    active[[3, 17]] = True
    loss, (grad,) = mx.vjp(lambda x: native_kernels.cross_entropy(
        x, mx.array(w), mx.array(targets), mx.array(active), True),
        [mx.array(h)], [mx.array(cotangent)])
    loss, grad = np.array(loss[0]), np.array(grad)
    assert np.all(loss[~active] == 0) and np.all(loss[active] > 0)
    assert np.all(grad[~active] == 0) and np.all(np.abs(grad[active]).sum(axis=1) > 0)
    none = native_kernels.cross_entropy(mx.array(h), mx.array(w), mx.array(targets),
                                mx.zeros((40,), mx.bool_), True)
    assert np.all(np.array(none) == 0)


def test_extreme_logits_stay_finite(native_kernels):
    """A target far below the row's largest logit: its softmax underflows to 0, the loss
    does not (it is read from the logits, not from the exponentials)."""
    h = np.zeros((2, 1), np.float32)
    h[:, 0] = [1.0, -1.0]
    w = np.array([[200.0], [-200.0], [0.0]], np.float32)
    targets = np.array([1, 0], np.int32)
    loss = np.array(native_kernels.cross_entropy(mx.array(h), mx.array(w), mx.array(targets),
                                         mx.ones((2,), mx.bool_), True))
    np.testing.assert_allclose(loss, [400.0, 400.0], rtol=1e-6)


def test_a_target_outside_the_vocabulary_gives_nan_there_only(native_kernels):
    h, w, targets, _, _ = _case(6, 4, 8, 20)
    targets[1] = 20
    targets[2] = -1
    active = np.array([True, True, True, False])
    targets[3] = 99  # inactive: never read
    f = lambda x: native_kernels.cross_entropy(x, mx.array(w), mx.array(targets), mx.array(active),
                                       True)
    loss, (grad,) = mx.vjp(f, [mx.array(h)], [mx.ones((4,))])
    loss, grad = np.array(loss[0]), np.array(grad)
    assert np.isfinite(loss[0]) and np.all(np.isfinite(grad[0]))
    assert np.isnan(loss[1]) and np.isnan(loss[2]) and np.all(np.isnan(grad[1:3]))
    assert loss[3] == 0 and np.all(grad[3] == 0)


def test_bad_arguments_raise(native_kernels):
    h, w = mx.zeros((4, 8)), mx.zeros((10, 8))
    t, a = mx.zeros((4,), mx.int32), mx.ones((4,), mx.bool_)
    with pytest.raises(ValueError, match="float32"):
        native_kernels.cross_entropy(h.astype(mx.float16), w, t, a)
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        native_kernels.cross_entropy(h, mx.zeros((10, 7)), t, a)
    with pytest.raises(ValueError, match="int32"):
        native_kernels.cross_entropy(h, w, t.astype(mx.int64), a)
    with pytest.raises(ValueError, match="bool"):
        native_kernels.cross_entropy(h, w, t, a.astype(mx.float32))


def test_no_gradient_for_the_head(native_kernels):
    h, w, targets, active, _ = _case(7, 6, 8, 20)
    with pytest.raises(ValueError, match="frozen"):
        mx.grad(lambda w: native_kernels.cross_entropy(mx.array(h), w, mx.array(targets),
                                               mx.array(active), True).sum())(mx.array(w))


def test_the_blas_thread_count_is_restored(native_kernels):
    before = _blas.threads()
    h, w, targets, active, _ = _case(8, 300, 16, 500)
    mx.eval(mx.grad(lambda x: native_kernels.cross_entropy(x, mx.array(w), mx.array(targets),
                                                   mx.array(active), True).sum())(mx.array(h)))
    assert _blas.threads() == before
