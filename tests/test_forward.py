"""Packed rows and the chunked loss compute what the plain forward pass computes."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlxtune import forward, native
from mlxtune.adapters import apply_lora
from mlxtune.config import AdapterConfig
from tests.tiny import build_model, model_args

FAMILIES = {
    "llama": dict(),
    "llama-untied": dict(tie_word_embeddings=False),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=32),
    "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                        num_hidden_layers=6),
}


def _model(case: str, seed: int = 0):
    model_type = case.split("-")[0]
    return build_model(model_args(model_type, **FAMILIES[case]), seed)


def _tokens(rng, *lengths):
    return [rng.integers(1, 200, size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("case", list(FAMILIES))
def test_split_head_reproduces_the_model(case):
    model = _model(case)
    assert forward.splits_head(model)
    tokens = mx.array(_tokens(np.random.default_rng(0), 12)[0])[None]
    full = model(tokens)
    split = forward.apply_head(model, forward.hidden_states(model, tokens))
    np.testing.assert_allclose(np.array(split), np.array(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_packed_examples_match_each_example_alone(case):
    """Three examples in one row (and padding) give each example's own logits: no
    attention across examples; gemma3's sliding window stays inside each example."""
    model = _model(case)
    rng = np.random.default_rng(1)
    examples = _tokens(rng, 5, 9, 7)
    row = np.zeros(24, np.int32)
    segments = np.full(24, 99, np.int32)  # padding: its own segment
    start = 0
    for i, ex in enumerate(examples):
        row[start:start + len(ex)] = ex
        segments[start:start + len(ex)] = i
        start += len(ex)
    packed = forward.logits(model, mx.array(row)[None], mx.array(segments)[None])
    start = 0
    for ex in examples:
        alone = model(mx.array(ex)[None])
        np.testing.assert_allclose(np.array(packed[0, start:start + len(ex)]),
                                   np.array(alone[0]), rtol=1e-4, atol=1e-4)
        start += len(ex)


def test_segment_mask_is_block_causal():
    seg = mx.array([[0, 0, 1, 1, 1, 7]])
    m = np.array(forward.segment_mask(seg))[0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(m, expected)
    windowed = np.array(forward.segment_mask(seg, window_size=2))[0, 0]
    assert not windowed[4, 2] and windowed[4, 3] and windowed[4, 4]


# The loss's five implementations: MLX's ops in chunks (Metal, CUDA, MLXTUNE_FASTMATH=0),
# fastmath's with the backward pass recomputing each chunk, fastmath's with the gradient
# computed in the forward pass (a loss the trainer marks with for_gradient), and
# mlxtune.native's kernel (the CPU default where it is built), without and with the mark.
LOSS_PATHS = ["mlx", "fastmath", "fastmath-for-gradient", "native", "native-for-gradient"]


def _loss_path(path: str, monkeypatch, fn):
    monkeypatch.setenv("MLXTUNE_FASTMATH", "0" if path == "mlx" else "1")
    if path.startswith("native"):
        if native._unavailable() is not None:
            pytest.skip(f"native kernels: {native._unavailable()}")
        monkeypatch.delenv("MLXTUNE_NATIVE", raising=False)
    else:
        monkeypatch.setenv("MLXTUNE_NATIVE", "0")
    return forward.for_gradient(fn) if path.endswith("for-gradient") else fn


@pytest.mark.parametrize("path", LOSS_PATHS)
@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_chunked_loss_equals_full_loss_and_gradient(case, chunk, path, monkeypatch):
    model = _model(case)
    apply_lora(model, AdapterConfig(rank=4, alpha=8.0))
    # LoRA's B starts at zero; give every adapter weight a value so gradients reach all.
    mx.random.seed(3)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05,
                          model.trainable_parameters()))
    rng = np.random.default_rng(2)
    tokens = mx.array(rng.integers(1, 200, size=(2, 11)).astype(np.int32))
    targets = mx.array(rng.integers(1, 200, size=(2, 11)).astype(np.int32))
    mask = mx.array((rng.random((2, 11)) > 0.3).astype(np.float32))

    def loss(fn):
        def f(m):
            return (fn(m) * mask).sum()
        return nn.value_and_grad(model, f)(model)

    full_loss, full_grads = loss(lambda m: nn.losses.cross_entropy(
        m(tokens).astype(mx.float32), targets, reduction="none"))
    # `active`: the positions whose loss is used (the native kernel computes only those)
    chunk_loss, chunk_grads = loss(_loss_path(path, monkeypatch, lambda m: (
        forward.chunked_token_losses(m, tokens, targets, chunk=chunk, active=mask != 0))))
    np.testing.assert_allclose(chunk_loss.item(), full_loss.item(), rtol=1e-5)
    full, chunked = dict(tree_flatten(full_grads)), dict(tree_flatten(chunk_grads))
    assert full.keys() == chunked.keys() and full
    for k in full:
        # float32 sums in another order: errors scale with the tensor's largest entries.
        want = np.array(full[k])
        np.testing.assert_allclose(np.array(chunked[k]), want, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max(), err_msg=k)


def test_unknown_family_falls_back_to_full_logits():
    model = _model("llama")
    model.model_type = "something-new"
    assert not forward.splits_head(model)
    tokens = mx.array([[3, 4, 5, 6]])
    targets = mx.array([[4, 5, 6, 7]])
    expected = nn.losses.cross_entropy(model(tokens), targets, reduction="none")
    np.testing.assert_allclose(np.array(forward.chunked_token_losses(model, tokens, targets)),
                               np.array(expected), rtol=1e-6)


class _HeadOnly(nn.Module):
    """Just an output head, for the chunked loss alone (apply_head reads lm_head)."""
    model_type = "llama"

    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.lm_head = nn.Linear(d, vocab, bias=False)


def _peak_of_gradient(fn, h) -> float:
    grad = mx.compile(mx.grad(lambda x: fn(x).sum()))
    mx.eval(grad(h))  # compiled and warmed
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(grad(h))
    return mx.get_peak_memory() - before


def test_chunked_loss_never_holds_the_full_logits():
    """The point of the chunks: the backward pass of 4,096 positions x 8,192 logits (134 MB
    per copy) in chunks of 128 peaks far below the full logits' backward pass. The chunked
    peak is set by how many chunk-sized arrays MLX's CPU backend has allocated ahead of
    the ops it dispatched (49-54 MB here, at 2,048 positions as at 4,096; it varies from
    run to run), not by the positions: at 2,048 the full path's 204 MB left it only a
    ratio of 3.8-4.2, too close to a bound of 4."""
    n = 4096
    head = _HeadOnly(64, 8192)
    head.freeze()
    mx.random.seed(0)
    h = mx.random.normal((n, 64))
    targets = mx.random.randint(0, 8192, (n,))
    full = _peak_of_gradient(lambda x: nn.losses.cross_entropy(
        forward.apply_head(head, x), targets, reduction="none"), h)
    chunked = _peak_of_gradient(lambda x: forward._chunked_cross_entropy(head, 128)(
        x, targets), h)
    assert full > 2 * n * 8192 * 4  # the full path holds at least two copies
    assert chunked < full / 4, (chunked, full)
    # fastmath's chunks hold more (MLX's CPU backend allocates the outputs of the ops it
    # has dispatched ahead, and these chunks have more ops), but still less than the
    # full logits; measured here 1.3 and 0.3 copies against 3.0 (1.9 and 1.3 at 2,048).
    for fast in (forward._fast_cross_entropy_with_gradient, forward._fast_cross_entropy):
        peak = _peak_of_gradient(lambda x: fast(head, forward.FAST_CHUNK)(x, targets), h)
        assert peak < 0.75 * full, (fast.__name__, peak, full)


def test_trainable_head_falls_back_to_full_logits(monkeypatch):
    monkeypatch.setenv("MLXTUNE_FASTMATH", "0")  # the path that monkeypatch watches
    model = _model("llama")
    apply_lora(model, AdapterConfig(rank=4, alpha=8.0))
    used = []
    original = forward._chunked_cross_entropy
    monkeypatch.setattr(forward, "_chunked_cross_entropy",
                        lambda *a: used.append(1) or original(*a))
    tokens = mx.array([[3, 4, 5, 6, 7, 8]])
    targets = mx.array([[4, 5, 6, 7, 8, 9]])
    forward.chunked_token_losses(model, tokens, targets, chunk=2)
    assert used == [1]
    forward._head_module(model).unfreeze()
    expected = nn.losses.cross_entropy(model(tokens), targets, reduction="none")
    np.testing.assert_allclose(np.array(forward.chunked_token_losses(model, tokens, targets,
                                                                     chunk=2)),
                               np.array(expected), rtol=1e-5)
    assert used == [1]  # the trainable head took the full path


def test_the_trainer_computes_the_loss_gradient_in_the_forward_pass(monkeypatch):
    """On the fastmath path the trainer's step takes the loss whose forward pass computes
    its gradient; evaluation (no gradient) takes the plain one."""
    monkeypatch.setenv("MLXTUNE_FASTMATH", "1")
    monkeypatch.setenv("MLXTUNE_NATIVE", "0")
    used = []
    for name in ("_fast_cross_entropy_with_gradient", "_fast_cross_entropy"):
        original = getattr(forward, name)
        monkeypatch.setattr(forward, name, lambda *a, _o=original, _n=name: (
            used.append(_n) or _o(*a)))
    _marked_then_plain_loss("llama", lambda: used == ["_fast_cross_entropy_with_gradient"])
    assert used[-1] == "_fast_cross_entropy"


def _marked_then_plain_loss(case: str, after_marked) -> None:
    """The loss of a LoRA model as the trainer takes it (marked, differentiated), checking
    after_marked() then, and as evaluation takes it (plain): the same value."""
    model = _model(case)
    apply_lora(model, AdapterConfig(rank=4, alpha=8.0))
    tokens = mx.array([[3, 4, 5, 6, 7, 8]])
    targets = mx.array([[4, 5, 6, 7, 8, 9]])

    def loss(m):
        return forward.chunked_token_losses(m, tokens, targets, chunk=4).sum()

    marked, _ = nn.value_and_grad(model, forward.for_gradient(loss))(model)
    assert after_marked(), case
    np.testing.assert_allclose(loss(model).item(), marked.item(), rtol=1e-6)


def test_the_trainer_takes_the_native_loss_with_its_gradient(native_kernels, monkeypatch):
    """Where the native kernels are built, the CPU loss is theirs: with the gradient in
    the forward pass for the trainer's marked loss, without it for evaluation; a head
    with a soft cap (Gemma 2) keeps fastmath's."""
    monkeypatch.setenv("MLXTUNE_FASTMATH", "1")
    monkeypatch.delenv("MLXTUNE_NATIVE", raising=False)
    calls = []  # the with_grad argument of each call
    original = native_kernels.cross_entropy
    monkeypatch.setattr(native_kernels, "cross_entropy",
                        lambda *a: calls.append(a[-1]) or original(*a))
    for case, marked, plain in (("llama", [True], [False]), ("qwen3", [True], [False]),
                                ("gemma2", [], [])):
        calls.clear()
        _marked_then_plain_loss(case, lambda: calls == marked)
        assert calls == marked + plain, case


def test_the_native_loss_never_holds_the_full_logits(native_kernels, monkeypatch):
    monkeypatch.delenv("MLXTUNE_NATIVE", raising=False)
    kernels = native_kernels
    head = _HeadOnly(64, 8192)
    head.freeze()
    mx.random.seed(0)
    h = mx.random.normal((2048, 64))
    targets = mx.random.randint(0, 8192, (2048,)).astype(mx.int32)
    every = mx.ones((2048,), mx.bool_)
    full = _peak_of_gradient(lambda x: nn.losses.cross_entropy(
        forward.apply_head(head, x), targets, reduction="none"), h)
    for with_grad in (True, False):
        peak = _peak_of_gradient(lambda x: kernels.cross_entropy(
            x, head.lm_head.weight, targets, every, with_grad), h)
        # its scratch (256 rows of logits here, 8 MB) is counted: MLX's allocator
        assert 256 * 8192 * 4 <= peak < full / 4, (with_grad, peak, full)


@pytest.mark.parametrize("fmt", ["affine", "nf4"])
def test_a_quantized_head_takes_the_native_loss_dequantized_once(native_kernels, monkeypatch,
                                                                  fmt):
    """A quantized tied head on the CPU path goes to the native loss with one float32
    copy (the chunked loss dequantizes the head for every chunk, forward and backward):
    loss and LoRA gradients equal the chunked path's, which dequantizes it as the CPU
    path's matmul does."""
    from mlxtune import quant

    monkeypatch.setenv("MLXTUNE_FASTMATH", "1")
    monkeypatch.delenv("MLXTUNE_NATIVE", raising=False)
    model = build_model(model_args("llama", hidden_size=64, intermediate_size=128))
    if fmt == "affine":
        nn.quantize(model, group_size=32, bits=4)
        quant.use_cpu_path(model)
    else:
        quant.quantize_nf4(model, embeddings=True)
    head = forward._head_module(model)
    assert not isinstance(head, nn.Embedding)
    apply_lora(model, AdapterConfig(rank=4, alpha=8.0))
    tokens = mx.array([[3, 4, 5, 6, 7, 8, 9, 10, 11]] * 2)
    targets = mx.array([[4, 5, 6, 7, 8, 9, 10, 11, 12]] * 2)

    def loss(m):
        return forward.chunked_token_losses(m, tokens, targets, chunk=4).sum()

    calls = []
    original = native_kernels.cross_entropy
    monkeypatch.setattr(native_kernels, "cross_entropy",
                        lambda *a: calls.append(a[1].shape) or original(*a))
    got, got_grads = nn.value_and_grad(model, forward.for_gradient(loss))(model)
    assert calls == [(head.weight.shape[0], 64)]  # [V, D] float32, once
    monkeypatch.setattr(forward, "_native_head_weight", lambda *a: None)
    want, want_grads = nn.value_and_grad(model, forward.for_gradient(loss))(model)
    # Both sum the same float32 products in a different order (BLAS on chunks of 64 vs
    # the kernel's chunks): a few float32 ulps of the loss's size per position.
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(got.item(), want.item(), rtol=64 * eps * tokens.size)
    for (k, g), (_, w) in zip(tree_flatten(got_grads), tree_flatten(want_grads)):
        g, w = np.array(g), np.array(w)
        scale = float(np.abs(w).max()) or 1.0
        assert np.abs(g - w).max() <= 1e-4 * scale, k
