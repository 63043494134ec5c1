"""Training objectives: a loss over one batch, nothing more.

Each objective returns (summed loss, number of loss-bearing tokens, extra metrics) so the
trainer can weight micro-batches by their tokens when it accumulates gradients: the mean
loss of an accumulated step equals the mean over all its tokens, however they are split.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def token_losses(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Per-position cross-entropy of predicting tokens[:, 1:], and the mask for it."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    targets = tokens[:, 1:]
    return nn.losses.cross_entropy(logits, targets, reduction="none"), mask[:, 1:]


def sft(model: nn.Module, tokens: mx.array, mask: mx.array):
    losses, m = token_losses(model, tokens, mask)
    return (losses * m).sum(), m.sum()


OBJECTIVES = {"sft": sft}


def get(name: str):
    return OBJECTIVES[name]
