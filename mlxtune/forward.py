"""The model's forward pass for training: packed rows and a chunked loss.

mlx_lm's models take a batch of token rows and return logits for every position. Training
needs two things they do not offer directly, and both are reached through public seams of
mlx_lm's model classes rather than by re-implementing an architecture:

- Packed rows (several examples in one row, no attention across them). Every mlx_lm model
  asks its per-layer cache objects for the attention mask (`cache.make_mask`) and for the
  rotary offset (`cache.offset`). `SegmentMask` is a pass-through "cache" that answers
  with a block-diagonal causal mask and offset 0, and stores nothing. Positions then run
  0..L-1 across the row instead of restarting per example; with rotary embeddings the score
  of a query and a key depends only on their distance, so inside a block (the only place
  attention reaches) the result is the same as for the example alone, up to float rounding
  of the rotary angles. tests/test_forward.py checks this per example.

- A chunked loss. `hidden_states` stops before the output head; `chunked_token_losses` then
  applies the head and the cross-entropy a chunk of positions at a time, with a backward
  pass of its own (`mx.custom_function`) that recomputes each chunk's logits, so the whole
  [tokens x vocab] array (the largest single activation for small models with big
  vocabularies) never exists. Each chunk's input depends on the previous chunk's result
  (`mx.depends`), forward and backward, so MLX's scheduler runs one chunk at a time and its
  buffers are freed before the next starts (without that order, plain `mx.checkpoint`
  pieces were all recomputed at once and the peak was higher than the full logits').
  Supported for the model families whose head is known (HEAD_FAMILIES) and frozen; other
  models fall back to the full logits, with the same result.

- On the CPU backend (mlxtune.fastmath enabled) the loss always runs in chunks of at most
  FAST_CHUNK positions with `fastmath.exp`, whose two temporaries per call are then small.
  When the loss is being differentiated (the trainer marks it with `for_gradient`), each
  chunk's forward pass also computes the gradient with respect to its hidden states per
  unit of loss (softmax minus the one-hot target, through the head's VJP) and keeps only
  that [positions x hidden] array: the loss is the last op of a step, so the backward pass
  only scales it by each position's cotangent, and neither the logits nor their
  exponentials are computed a second time. Without the mark, the backward pass recomputes
  each chunk's logits and takes one exponential, exp(logits - log-sum-exp).

- On the CPU backend with mlxtune.native's kernels built, a frozen float32 head without a
  final scaling (`_native_head_weight`) runs as one primitive instead (the extension's
  `cross_entropy`): the same scheme in C++, through one scratch buffer, at the positions
  the caller marks `active` (those that bear loss) only; the others get loss 0 and cost
  nothing. A quantized head on the CPU path is dequantized to float32 once for it.
"""

from __future__ import annotations

import contextvars
import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune import fastmath, native

# model_type -> how the output head is applied to the trunk's last hidden state. Each
# entry is checked against the model's own __call__ in tests/test_forward.py.
HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                 "phi3", "granite", "smollm3", "olmo2", "starcoder2"}

# Positions per chunk of the loss on the fastmath path. MLX's CPU backend allocates an op's
# output when it dispatches the op, up to ~100 ops (10 tasks of 10 dispatches) ahead of the
# thread that computes them, so several chunks' [chunk x vocab] arrays are alive at once
# however the chunks are ordered, and the memory grows with the chunk size. Measured over
# 1,220 positions of SmolLM2's 49,152-word head, forward and backward: peak 708 MB with
# chunks of 64 (12.5 MB a copy), 1,047 MB with 128, 1,076 MB for the full logits; the
# head's matmul on 64 rows is still large enough for BLAS.
FAST_CHUNK = 64

# Set while a loss is traced for its gradient (`for_gradient`).
_FOR_GRADIENT = contextvars.ContextVar("mlxtune_loss_for_gradient", default=False)


def for_gradient(loss_fn):
    """loss_fn, marked as computed to be differentiated (the trainer wraps its objective
    with this before nn.value_and_grad): the fastmath loss then computes its gradient in
    the forward pass. Calling it without differentiating only wastes that work."""
    @functools.wraps(loss_fn)
    def marked(*args, **kwargs):
        token = _FOR_GRADIENT.set(True)
        try:
            return loss_fn(*args, **kwargs)
        finally:
            _FOR_GRADIENT.reset(token)

    return marked


class SegmentMask:
    """A stand-in for a layer's KV cache that supplies a block-diagonal causal mask.

    segments: int32 [B, L]; positions with the same id attend to each other causally.
    Padding gets its own id (any value not used by an example), so it attends only to
    itself and never to an example.
    """

    offset = 0

    def __init__(self, segments: mx.array):
        self.segments = segments
        self._masks: dict = {}

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size not in self._masks:
            self._masks[window_size] = segment_mask(self.segments, window_size)
        return self._masks[window_size]

    def update_and_fetch(self, keys, values):
        return keys, values


def segment_mask(segments: mx.array, window_size: int | None = None) -> mx.array:
    """bool [B, 1, L, L]: query i sees key j when both are in the same segment and j <= i
    (and i - j < window_size when given)."""
    length = segments.shape[1]
    pos = mx.arange(length)
    causal = pos[:, None] >= pos[None, :]
    if window_size is not None:
        causal = causal & (pos[:, None] - pos[None, :] < window_size)
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def _layer_count(model: nn.Module) -> int:
    return len(model.layers)


def _caches(model: nn.Module, segments: mx.array | None, cache=None):
    if cache is not None:  # the caller's (GRPO's prompts computed once: objectives.grpo)
        return cache
    if segments is None:
        return None
    cache = SegmentMask(segments)
    return [cache] * _layer_count(model)


def logits(model: nn.Module, tokens: mx.array, segments: mx.array | None = None,
           cache=None) -> mx.array:
    """Full logits [B, L, V]; packed rows when `segments` is given; `cache`: per-layer
    caches the tokens continue (the keys before them and the mask)."""
    return model(tokens, cache=_caches(model, segments, cache))


def splits_head(model: nn.Module) -> bool:
    """Whether hidden_states / apply_head reproduce this model's __call__."""
    return getattr(model, "model_type", None) in HEAD_FAMILIES and hasattr(model, "model")


def hidden_states(model: nn.Module, tokens: mx.array,
                  segments: mx.array | None = None, cache=None) -> mx.array:
    """The trunk's output (after the final norm), before the output head: [B, L, D]."""
    return model.model(tokens, _caches(model, segments, cache))


def apply_head(model: nn.Module, h: mx.array) -> mx.array:
    """The output head of HEAD_FAMILIES models: untied lm_head or tied embeddings, plus
    the family's final scaling (Gemma 2's soft cap, Granite's logit scaling)."""
    if hasattr(model, "lm_head"):
        out = model.lm_head(h)
    else:
        out = model.model.embed_tokens.as_linear(h)
    cap = getattr(model, "final_logit_softcapping", None)
    if cap:
        out = mx.tanh(out / cap) * cap
    scaling = getattr(getattr(model, "args", None), "logits_scaling", None)
    if model.model_type == "granite" and scaling:
        out = out / scaling
    return out


def _head_module(model: nn.Module) -> nn.Module:
    return model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens


def chunked_token_losses(model: nn.Module, tokens: mx.array, targets: mx.array,
                         segments: mx.array | None = None, chunk: int = 1024,
                         active: mx.array | None = None, cache=None) -> mx.array:
    """Cross-entropy of each position predicting `targets` (same shape as tokens), float32
    [B, L], never holding the logits of more than `chunk` positions. `active` (bool, the
    shape of tokens) marks the positions whose loss is used: elsewhere the loss may be
    returned as 0 without being computed (the native kernel skips them). `cache`: as
    for `logits`.

    chunk <= 0, a model whose head is not known, or a head with trainable parameters (its
    gradient would be lost: the chunks' backward pass differentiates the hidden states
    only) computes the full logits instead; so do batches of at most `chunk` positions
    off the fastmath path (one chunk holds as much as the full logits). With fastmath the
    chunks are at most FAST_CHUNK positions."""
    fast = fastmath.enabled()
    positions = tokens.shape[0] * tokens.shape[1]
    if (chunk <= 0 or not splits_head(model) or (positions <= chunk and not fast)
            or tree_flatten(_head_module(model).trainable_parameters())):
        out = logits(model, tokens, segments, cache).astype(mx.float32)
        return nn.losses.cross_entropy(out, targets, reduction="none")
    h = hidden_states(model, tokens, segments, cache)
    b, length, d = h.shape
    weight = _native_head_weight(model, h) if fast else None
    if weight is not None:
        every = mx.ones(targets.shape, mx.bool_) if active is None else active.astype(mx.bool_)
        losses = native.load().cross_entropy(
            h.reshape(b * length, d), weight, targets.reshape(b * length).astype(mx.int32),
            every.reshape(b * length), _FOR_GRADIENT.get())
        return losses.reshape(b, length)
    if not fast:
        loss_fn = _chunked_cross_entropy(model, chunk)
    elif _FOR_GRADIENT.get():
        loss_fn = _fast_cross_entropy_with_gradient(model, min(chunk, FAST_CHUNK))
    else:
        loss_fn = _fast_cross_entropy(model, min(chunk, FAST_CHUNK))
    losses = loss_fn(h.reshape(b * length, d), targets.reshape(b * length))
    return losses.reshape(b, length)


def _native_head_weight(model: nn.Module, h: mx.array) -> mx.array | None:
    """The head's weight [V, D] when mlxtune.native's cross-entropy covers this model's
    head (a float32 linear head or tied embedding, no soft cap or logit scaling, float32
    hidden states) and the kernels are built; else None."""
    if (h.dtype != mx.float32 or getattr(model, "final_logit_softcapping", None)
            or model.model_type == "granite"):
        return None
    head = _head_module(model)
    if "bias" in head or native.load() is None:
        return None
    if type(head) in (nn.Linear, nn.Embedding):
        return head.weight if head.weight.dtype == mx.float32 else None
    return _dequantized_head(head, h)


def _dequantized_head(head: nn.Module, h: mx.array) -> mx.array | None:
    """A quantized head on the CPU path (mlxtune.quant's dequantize-then-BLAS layers),
    dequantized to float32 once for the whole loss, as the CPU path's matmul dequantizes
    it (scales as stored); else None. The chunked loss would dequantize the whole [V, D]
    head again for every chunk of FAST_CHUNK positions, forward and backward: 32 copies
    of a 151,936 x 1,536 head for 1,024 positions, several alive at once (measured on
    Qwen2.5-1.5B's shape: docs/memory.md). Frozen: no gradient flows into it. Made once
    the hidden states `h` exist, or a compiled step computes it early and holds it."""
    from mlxtune import quant

    if isinstance(head, (quant.DequantizedLinear, quant.DequantizedEmbedding)):
        keys = [k for k in ("weight", "scales", "biases") if k in head]
        a = dict(zip(keys, mx.depends([head[k] for k in keys], [h])))
        w = mx.dequantize(a["weight"], a["scales"], a.get("biases"), group_size=head.group_size,
                          bits=head.bits, mode=head.mode, dtype=mx.float32)
    elif isinstance(head, (quant.QuantLinear, quant.QuantEmbedding)):
        keys = quant.layouts.KEYS[head.format]
        a = dict(zip(keys, mx.depends([head[k] for k in keys], [h])))
        w = quant.layouts.dequantize(head.format, a, mx.float32)
    else:
        return None
    return mx.stop_gradient(w)


def _float_head(model: nn.Module):
    """x -> the model's logits for hidden states x, in float32 (the losses' precision)."""
    return lambda x: apply_head(model, x).astype(mx.float32)


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _after(x: mx.array, previous: mx.array | None) -> mx.array:
    """x, ordered after `previous` by the scheduler (one chunk's buffers at a time)."""
    return x if previous is None else mx.depends(x, previous)


def _fast_chunk_loss(logits: mx.array, targets: mx.array):
    """(cross-entropy [c], exponentials e^(logits - max) [c, V], their sums [c, 1])."""
    top = logits.max(axis=-1, keepdims=True)
    e = fastmath.exp(logits - top)
    sums = e.sum(axis=-1, keepdims=True)
    target_logit = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (top + mx.log(sums) - target_logit)[:, 0], e, sums


def _fast_cross_entropy_with_gradient(model: nn.Module, chunk: int):
    """f(h [N, D], targets [N]) -> per-position cross-entropy [N] on fastmath, a chunk at a
    time, each chunk's gradient with respect to h (per unit loss) computed beside it."""

    head = _float_head(model)

    @mx.custom_function
    def cross_entropy(h, targets):
        losses, grads, previous = [], [], None
        vocab = None
        for a, b in _spans(h.shape[0], chunk):
            hc = _after(h[a:b], previous)
            logits = head(hc)
            if vocab is None:
                vocab = mx.arange(logits.shape[-1])
            loss, e, sums = _fast_chunk_loss(logits, targets[a:b])
            # d loss / d logits = softmax - one_hot(target)
            d_logits = e * (1.0 / sums) - (vocab[None, :] == targets[a:b, None])
            _, (previous,) = mx.vjp(head, [hc], [d_logits])
            losses.append(loss)
            grads.append(previous)
        return mx.concatenate(losses), mx.concatenate(grads)

    @cross_entropy.vjp
    def cross_entropy_vjp(primals, cotangents, outputs):
        h, targets = primals
        grad = outputs[1] * cotangents[0][:, None]
        return grad.astype(h.dtype), mx.zeros_like(targets)

    return lambda h, targets: cross_entropy(h, targets)[0]


def _fast_cross_entropy(model: nn.Module, chunk: int):
    """f(h [N, D], targets [N]) -> per-position cross-entropy [N] on fastmath, a chunk at a
    time; the backward pass recomputes each chunk's logits, and its softmax is the one
    exponential exp(logits - log-sum-exp), the log-sum-exp being loss + target logit."""

    def softmax(logits, targets, loss):
        target_logit = mx.take_along_axis(logits, targets[:, None], axis=-1)
        return fastmath.exp(logits - (loss[:, None] + target_logit))

    return _recomputing_cross_entropy(
        model, chunk, lambda logits, targets: _fast_chunk_loss(logits, targets)[0], softmax)


def _chunked_cross_entropy(model: nn.Module, chunk: int):
    """f(h [N, D], targets [N]) -> per-position cross-entropy [N] with MLX's ops, a chunk of
    rows at a time, with a backward pass that recomputes each chunk's logits."""

    def loss(logits, targets):
        return (mx.logsumexp(logits, axis=-1)
                - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0])

    return _recomputing_cross_entropy(
        model, chunk, loss, lambda logits, _targets, _loss: mx.softmax(logits, axis=-1))


def _recomputing_cross_entropy(model: nn.Module, chunk: int, chunk_loss, chunk_softmax):
    """The chunked loss whose backward pass recomputes each chunk's logits:
    chunk_loss(logits, targets) -> cross-entropy [c]; chunk_softmax(logits, targets,
    loss) -> the softmax of the logits [c, V]."""

    head = _float_head(model)

    @mx.custom_function
    def cross_entropy(h, targets):
        out, previous = [], None
        for a, b in _spans(h.shape[0], chunk):
            previous = chunk_loss(head(_after(h[a:b], previous)), targets[a:b])
            out.append(previous)
        return mx.concatenate(out)

    @cross_entropy.vjp
    def cross_entropy_vjp(primals, cotangent, output):
        h, targets = primals
        grads, previous, vocab = [], None, None
        for a, b in _spans(h.shape[0], chunk):
            hc = _after(h[a:b], previous)
            logits = head(hc)
            if vocab is None:
                vocab = mx.arange(logits.shape[-1])
            # d loss / d logits = softmax - one_hot(target), times the cotangent.
            one_hot = (vocab[None, :] == targets[a:b, None]).astype(logits.dtype)
            p = chunk_softmax(logits, targets[a:b], output[a:b])
            d_logits = (p - one_hot) * cotangent[a:b, None]
            _, (previous,) = mx.vjp(head, [hc], [d_logits])
            grads.append(previous)
        return mx.concatenate(grads).astype(h.dtype), mx.zeros_like(targets)

    return cross_entropy
