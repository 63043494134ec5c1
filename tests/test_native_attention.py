"""mlxtune.native's CPU attention primitive against a float64 numpy reference (forward) and
MLX's own autodiff of mx.fast.scaled_dot_product_attention (gradients)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

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


# ---------------------------------------------------------------- memory and streams


def test_scratch_memory_counts_in_mlx_peak(native_kernels):
    """The kernel's scratch (a block of 128 queries' scores over every key, per worker) is
    taken from MLX's allocator, so MLX's peak memory includes it: at L = 2,048 that is
    ~1 MB, far more than the output (64 KB) and log-sum-exp (8 KB) of one head. Were it
    std::vector memory, the peak would rise by the outputs alone."""
    length, d = 2048, 8
    q, k, v = (mx.array(a) for a in _qkv(10, 1, 1, 1, length, d))
    mx.eval(q, k, v)
    block = 128
    for direction in ("forward", "backward"):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        if direction == "forward":
            out = native_kernels.causal_attention(q, k, v, 0.5, None)
            results = [out]
            # o and lse, plus one worker's scores and 1 / sums
            floor = out.nbytes + 4 * length + 4 * block * (length + 1)
        else:
            results = mx.grad(lambda q: native_kernels.causal_attention(q, k, v, 0.5,
                                                                        None).sum())(q)
            # dq alone, plus one worker's probabilities, their gradient and delta
            floor = results.nbytes + 4 * (2 * block * length + length)
        mx.eval(results)
        assert mx.get_peak_memory() - base >= floor, direction


def test_cross_entropy_scratch_counts_in_mlx_peak(native_kernels):
    """The loss's chunk of logits (256 positions x the vocabulary) comes from MLX's
    allocator too: 4 MB for a 4,096-word vocabulary, beside a 1 KB loss."""
    n, d, vocab = 256, 8, 4096
    rng = np.random.default_rng(11)
    h = mx.array(rng.standard_normal((n, d)).astype(np.float32))
    w = mx.array(rng.standard_normal((vocab, d)).astype(np.float32))
    targets = mx.array(rng.integers(0, vocab, n).astype(np.int32))
    active = mx.ones((n,), mx.bool_)
    mx.eval(h, w, targets, active)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(native_kernels.cross_entropy(h, w, targets, active, False))
    assert mx.get_peak_memory() - base >= 4 * n * vocab


def test_concurrent_streams_keep_the_blas_threads_and_the_results(native_kernels):
    """train.cpu_streams > 1: each group's kernels run on its own stream's thread, at the
    same time. OpenBLAS's thread count is one number for the process; each parallel loop
    used to set it to 1 and put back what it had read, so one that started while another
    held 1 put back 1 and left every later matmul single-threaded. Now they share one hold
    (common.h's BlasHold): the count after is the count before, and each stream's result
    is the one a single stream computes."""
    if _blas.threads() is None:
        pytest.skip("not OpenBLAS: no thread count to keep")
    before = _blas.threads()
    _blas.set_threads(2)  # two workers per kernel, so each kernel takes the hold
    try:
        inputs = [tuple(mx.array(a) for a in _qkv(20 + i, 2, 4, 2, 300, 16)) for i in range(2)]

        def step(q, k, v):
            return mx.value_and_grad(lambda q, k, v: (native_kernels.causal_attention(
                q, k, v, 0.25, None) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)

        alone = [step(*x) for x in inputs]
        mx.eval(alone)
        pair = [mx.new_stream(mx.cpu) for _ in range(2)]
        for _ in range(12):
            results = []
            for stream, x in zip(pair, inputs):
                with mx.stream(stream):
                    results.append(step(*x))
            mx.eval(results)  # both streams' kernels at once
            assert _blas.threads() == 2
            for got, want in zip(results, alone):
                for a, b in zip(tree_flatten(got), tree_flatten(want)):
                    np.testing.assert_array_equal(np.array(a[1]), np.array(b[1]))
    finally:
        _blas.set_threads(before)


def test_overlapping_holds_put_the_count_back_once(native_kernels):
    """The interleaving two streams' kernels can have: A starts, B starts, A ends, B ends.
    Before the shared hold, B read A's 1 as "the count before" and put it back last (every
    later matmul single-threaded), and A's end gave B's still-running single-threaded
    loops a multi-threaded BLAS again. Now the count is 1 from A's start to B's end, the
    loops are sized by the run's count throughout, and it is put back once."""
    if _blas.threads() is None:
        pytest.skip("not OpenBLAS: no thread count to keep")
    before = _blas.threads()
    _blas.set_threads(2)
    try:
        a, b = native_kernels._BlasHold(), native_kernels._BlasHold()
        a.__enter__()
        assert _blas.threads() == 1 and native_kernels._blas_count() == 2
        b.__enter__()
        a.__exit__(None, None, None)
        assert _blas.threads() == 1 and native_kernels._blas_count() == 2
        b.__exit__(None, None, None)
        assert _blas.threads() == 2 and native_kernels._blas_count() == 2
    finally:
        _blas.set_threads(before)


# ---------------------------------------------------------------- build status


FAKE_CXX = """#!/bin/sh
# A compiler that always fails; its --version line comes from FAKE_CXX_VERSION.
if [ "$1" = "--version" ]; then echo "fakecc ${FAKE_CXX_VERSION:-1.0}"; exit 0; fi
echo "$*" >> "$FAKE_CXX_CALLS"
echo "In file included from somewhere.h:1:"
echo "attention.cpp:1:1: error: this compiler always fails"
exit 1
"""


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """mlxtune.native as a new process finds it, with its cache in tmp_path; this
    process's real outcome (the loaded module) is put back afterwards."""
    saved = (native._module, native._settled, dict(native.state), dict(native._identities))
    monkeypatch.setenv("MLXTUNE_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLXTUNE_NATIVE", raising=False)
    monkeypatch.delenv("MLXTUNE_PROFILE", raising=False)
    native.reset()
    yield tmp_path
    native._module, native._settled = saved[0], saved[1]
    native.state.clear()
    native.state.update(saved[2])
    native._identities.clear()
    native._identities.update(saved[3])


def _fake_compiler(folder, monkeypatch):
    cxx = folder / "fake-c++"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    calls = folder / "calls"
    calls.write_text("")
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_CXX_CALLS", str(calls))
    return calls


def _compiles(calls):
    return len(calls.read_text().splitlines())


@pytest.mark.skipif(not native.sys.platform.startswith("linux"), reason="built on Linux only")
def test_a_failed_build_is_one_line_and_retried_under_a_new_key(fresh_native, monkeypatch):
    pytest.importorskip("nanobind")
    calls = _fake_compiler(fresh_native, monkeypatch)
    line = native.status_line()
    log = native.module_path().parent / "build.log"
    assert line == ("CPU kernels: MLX's ops (native build failed: attention.cpp:1:1: error: "
                    f"this compiler always fails; log at {log})")
    assert "\n" not in line and log.exists() and native.load() is None
    first = _compiles(calls)
    assert first > 0

    # The next run (a new process) with the same MLX and compiler: told at once, no compile.
    native.reset()
    assert native.status_line() == line
    assert _compiles(calls) == first

    # The compiler upgraded in place (same path, new --version): a new key, built again.
    old_key = native._key()
    native.reset()
    native._identities.clear()
    monkeypatch.setenv("FAKE_CXX_VERSION", "2.0")
    assert native._key() != old_key
    assert "native build failed" in native.status_line()
    assert _compiles(calls) > first

    # So does another MLX or nanobind version (each part of the key counts).
    real_version = native.importlib.metadata.version
    for package in ("mlx", "nanobind"):
        monkeypatch.setattr(native.importlib.metadata, "version",
                            lambda name, _p=package: "99.0" if name == _p else real_version(name))
        assert native._key() != old_key
        monkeypatch.setattr(native.importlib.metadata, "version", real_version)


def test_the_status_line_names_the_path_and_why(native_kernels, fresh_native, monkeypatch):
    native.reset()
    monkeypatch.setenv("MLXTUNE_NATIVE", "0")
    assert native.status_line() == "CPU kernels: MLX's ops (MLXTUNE_NATIVE=0)"
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    monkeypatch.delenv("MLXTUNE_NATIVE")
    assert native.status_line().startswith("CPU kernels: not used (MLXTUNE_PROFILE=gpu")
    monkeypatch.delenv("MLXTUNE_PROFILE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.status_line() == "CPU kernels: MLX's ops (no C++ compiler (install g++))"


def test_the_status_line_of_a_loaded_build(native_kernels):
    line = native.status_line()
    assert line == f"CPU kernels: native ({native.state['loaded']})"
