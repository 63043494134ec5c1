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
  applies the head and the cross-entropy a chunk of positions at a time under
  `mx.checkpoint`, so the backward pass recomputes each chunk's logits instead of keeping
  the whole [tokens x vocab] array (the largest single activation for small models with big
  vocabularies). Supported for the model families whose head is known (HEAD_FAMILIES);
  other models fall back to the full logits, with the same result.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# model_type -> how the output head is applied to the trunk's last hidden state. Each
# entry is checked against the model's own __call__ in tests/test_forward.py.
HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                 "phi3", "granite", "smollm3", "olmo2", "starcoder2"}


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


def _caches(model: nn.Module, segments: mx.array | None):
    if segments is None:
        return None
    cache = SegmentMask(segments)
    return [cache] * _layer_count(model)


def logits(model: nn.Module, tokens: mx.array, segments: mx.array | None = None) -> mx.array:
    """Full logits [B, L, V]; packed rows when `segments` is given."""
    return model(tokens, cache=_caches(model, segments))


def splits_head(model: nn.Module) -> bool:
    """Whether hidden_states / apply_head reproduce this model's __call__."""
    return getattr(model, "model_type", None) in HEAD_FAMILIES and hasattr(model, "model")


def hidden_states(model: nn.Module, tokens: mx.array,
                  segments: mx.array | None = None) -> mx.array:
    """The trunk's output (after the final norm), before the output head: [B, L, D]."""
    return model.model(tokens, _caches(model, segments))


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


def chunked_token_losses(model: nn.Module, tokens: mx.array, targets: mx.array,
                         segments: mx.array | None = None, chunk: int = 1024) -> mx.array:
    """Cross-entropy of each position predicting `targets` (same shape as tokens), float32
    [B, L], without ever holding the logits of more than `chunk` positions for backward.

    chunk <= 0, or a model whose head is not known, computes the full logits instead."""
    if chunk <= 0 or not splits_head(model):
        out = logits(model, tokens, segments).astype(mx.float32)
        return nn.losses.cross_entropy(out, targets, reduction="none")
    h = hidden_states(model, tokens, segments)
    b, length, d = h.shape
    flat_h = h.reshape(b * length, d)
    flat_t = targets.reshape(b * length)

    def chunk_loss(targets_chunk):
        def loss(hc):
            out = apply_head(model, hc).astype(mx.float32)
            return nn.losses.cross_entropy(out, targets_chunk, reduction="none")
        # Recompute the chunk's logits in the backward pass instead of keeping them. The
        # targets are captured, not passed: checkpoint differentiates all its inputs.
        return mx.checkpoint(loss)

    pieces = [chunk_loss(flat_t[i:i + chunk])(flat_h[i:i + chunk])
              for i in range(0, b * length, chunk)]
    return mx.concatenate(pieces).reshape(b, length)
