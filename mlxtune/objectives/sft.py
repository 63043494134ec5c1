"""Supervised fine-tuning: cross-entropy on the loss-bearing tokens.

A batch is (tokens, mask) or, for packed rows, (tokens, mask, segments); see
mlxtune.forward for the packed attention mask and the chunked loss (`chunk`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxtune import forward


def token_losses(model: nn.Module, tokens: mx.array, mask: mx.array,
                 segments: mx.array | None = None,
                 chunk: int = 0) -> tuple[mx.array, mx.array]:
    """Per-position cross-entropy of predicting tokens[:, 1:], and the mask for it (the
    head in chunks of `chunk` positions: forward.chunked_token_losses; the loss may be 0
    where the mask is)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg = None if segments is None else segments[:, :-1]
    m = mask[:, 1:]
    losses = forward.chunked_token_losses(model, inputs, targets, seg, chunk=chunk,
                                          active=m != 0)
    return losses, m


def sft(model: nn.Module, tokens: mx.array, mask: mx.array,
        segments: mx.array | None = None, chunk: int = 0):
    """(summed cross-entropy, loss-bearing tokens)."""
    losses, m = token_losses(model, tokens, mask, segments, chunk)
    return (losses * m).sum(), m.sum()
