"""GRPO (Shao et al. 2024) as TRL's GRPOTrainer computes it: the loss over a rollout batch.

A rollout batch is B = prompts x group_size rows, each prompt + one sampled completion,
the mask on the completion's tokens (its stop token included; mlxtune.objectives.rollout).
With r_i the weighted reward of completion i (mlxtune.objectives.rewards):

- advantages (`advantages`): A_i = r_i - mean(r of i's group), divided by std + 1e-4 where
  `scale_rewards` is `group` (the group's std) or `batch` (the whole batch's), not at all
  for `none`; std with Bessel's correction as torch's (TRL's).
- per token t of completion i, with p the policy's log-prob, p_old the rollout policy's
  (the weights that sampled the batch; equal to p at a batch's first step) and
  ratio = exp(p - p_old):
      l_it = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i)
             + beta * (exp(p_ref - p) - (p_ref - p) - 1)      (k3 KL estimator; beta > 0)
- reductions (`loss_type`), returned as (sum, weight) so that the trainer's sum / weight
  over a step's micro-batches is the loss of the whole batch:
      dapo     sum_it l_it m_it / sum_it m_it        (token level; TRL's default)
      grpo     mean_i (sum_t l_it m_it / sum_t m_it)  (per-sequence mean, then batch mean)
      dr_grpo  sum_it l_it m_it / (B * max_completion_tokens)
- `mask_truncated_completions`: a completion that ran out of max_completion_tokens gets
  mask 0 (the rollout sets it; the loss sees only the mask).

Metrics (TRL's names): `kl` (mean k3 over completion tokens; only with beta > 0) and
`clip_ratio` (share of completion tokens whose ratio was clipped in the direction that
matters: below 1 - epsilon with A < 0, above 1 + epsilon_high with A > 0), with
`clip_ratio/low_mean` and `clip_ratio/high_mean`; the loss returns their token sums and
the trainer divides.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune import forward

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
STD_EPS = 1e-4  # TRL's


# ----------------------------------------------------------------------------- advantages


def advantages(rewards: np.ndarray, group_size: int, scale: str = "group"
               ) -> tuple[np.ndarray, dict]:
    """Group-relative advantages of rewards [B] (groups of `group_size` consecutive rows)
    and TRL's reward metrics: reward, reward_std, frac_reward_zero_std."""
    r = np.asarray(rewards, dtype=np.float64)
    grouped = r.reshape(-1, group_size)
    mean = np.repeat(grouped.mean(axis=1), group_size)
    group_std = grouped.std(axis=1, ddof=1)
    adv = r - mean
    if scale == "batch":
        std = np.full_like(r, r.std(ddof=1) if r.size > 1 else 0.0)
    else:
        std = np.repeat(group_std, group_size)
    if scale != "none":
        adv = adv / (std + STD_EPS)
    zero = np.isclose(group_std, 0.0)
    return adv, {"reward": float(r.mean()), "reward_std": float(std.mean()),
                 "frac_reward_zero_std": float(zero.mean())}


# ----------------------------------------------------------------------------- the loss


def per_token_loss(logps: mx.array, old_logps: mx.array, adv: mx.array, epsilon: float,
                   epsilon_high: float, ref_logps: mx.array | None = None,
                   beta: float = 0.0) -> tuple[mx.array, dict]:
    """l_it [B, T] from per-token log-probs [B, T] and advantages [B]; and per-token
    parts (kl, clipped low / high as 0/1) for the metrics."""
    ratio = mx.exp(logps - old_logps)
    a = adv[:, None].astype(ratio.dtype)
    lo, hi = mx.array(1 - epsilon, ratio.dtype), mx.array(1 + epsilon_high, ratio.dtype)
    clipped = mx.clip(ratio, lo, hi)
    loss = -mx.minimum(ratio * a, clipped * a)
    parts = {"low": ((ratio < lo) & (a < 0)).astype(mx.float32),
             "high": ((ratio > hi) & (a > 0)).astype(mx.float32)}
    if beta:
        d = ref_logps - logps
        kl = mx.exp(d) - d - 1
        loss = loss + beta * kl
        parts["kl"] = kl
    return loss, parts


def reduce(loss: mx.array, mask: mx.array, loss_type: str,
           max_completion_tokens: int) -> tuple[mx.array, mx.array]:
    """(sum, weight): the loss of the batch is sum / weight (module docstring)."""
    m = mask.astype(loss.dtype)
    rows = loss.shape[0]
    if loss_type == "dapo":
        return (loss * m).sum(), m.sum()
    if loss_type == "grpo":
        per_seq = (loss * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0)
        return per_seq.sum(), mx.array(rows, mx.float32)
    if loss_type == "dr_grpo":
        return (loss * m).sum() / max_completion_tokens, mx.array(rows, mx.float32)
    raise ValueError(f"unknown GRPO loss type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")


def grpo_loss(logps, old_logps, adv, mask, *, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, ref_logps=None,
              max_completion_tokens: int = 256) -> tuple[mx.array, mx.array, dict]:
    """(loss sum, weight, metric sums) from per-token log-probs [B, T], the rollout
    policy's [B, T] (None: this pass's own, detached: the ratio is 1), advantages [B],
    the completion mask [B, T]. Metric sums are over completion tokens (the caller
    divides by their count: mask.sum(); returning that count here too breaks mx.compile,
    which merges it with dapo's weight into one output)."""
    if old_logps is None:
        old_logps = mx.stop_gradient(logps)
    eh = epsilon if epsilon_high is None else epsilon_high
    loss, parts = per_token_loss(logps, old_logps, adv, epsilon, eh, ref_logps, beta)
    total, weight = reduce(loss, mask, loss_type, max_completion_tokens)
    m = mask.astype(mx.float32)
    low, high = (parts["low"] * m).sum(), (parts["high"] * m).sum()
    metrics = {"clip_ratio/low_mean": mx.stop_gradient(low),
               "clip_ratio/high_mean": mx.stop_gradient(high),
               "clip_ratio": mx.stop_gradient(low + high)}
    if "kl" in parts:
        metrics["kl"] = mx.stop_gradient(parts["kl"] * m).sum()
    return total, weight, metrics


# ----------------------------------------------------------------------------- on a model


def token_logps(model: nn.Module, tokens: mx.array, mask: mx.array, temperature: float = 1.0,
                chunk: int = 0, cache=None) -> tuple[mx.array, mx.array]:
    """Per-token log-probs of tokens[:, 1:] under the model with its logits divided by
    `temperature` (as TRL's, so the ratio is of the distribution that sampled), [B, L-1],
    and the mask for them. `cache`: per-layer caches the rows continue (`prompt_cache`)."""
    if temperature == 1.0:
        losses = forward.chunked_token_losses(model, tokens[:, :-1], tokens[:, 1:], chunk=chunk,
                                              active=mask[:, 1:] != 0, cache=cache)
        return -losses, mask[:, 1:]
    logits = forward.logits(model, tokens[:, :-1], cache=cache).astype(mx.float32) / temperature
    losses = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    return -losses, mask[:, 1:]


# ----------------------------------------------------------------------------- shared prompts
#
# A rollout batch holds each prompt group_size times. Computed row by row, the prompts are
# most of the step's tokens (the quickstart: ~100 prompt tokens before ~40 completion
# tokens, 8 rows a prompt). With `shared` batches (rollout.collate_shared) each prompt but
# its last token goes through the model once; every layer's keys and values of it are
# repeated for the group's rows, which then compute only their last prompt token and
# completion, at the positions they would have in the whole row, seeing the prompt's
# slots up to its length and their own tokens causally. The gradient reaches the prompt's
# keys and values from every row of its group: the same loss and gradient as row by row.


class _Recorder:
    """A layer's cache stand-in for the prompts' pass: keeps the keys and values."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class _AfterPrompt:
    """A layer's cache stand-in for the completions' pass: the prompt's keys and values
    (repeated for each row of its group) before the row's own, and the mask over both."""

    def __init__(self, recorded: _Recorder, group: int, offset: mx.array, mask: mx.array):
        self.keys, self.values = (_repeat_rows(a, group) for a in
                                  (recorded.keys, recorded.values))
        self.offset, self.mask = offset, mask

    def update_and_fetch(self, keys, values):
        return (mx.concatenate([self.keys, keys], axis=2),
                mx.concatenate([self.values, values], axis=2))

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return self.mask


def _repeat_rows(a: mx.array, group: int) -> mx.array:
    """[n, ...] -> [n * group, ...], each row `group` times in a row."""
    return mx.broadcast_to(a[:, None], (a.shape[0], group, *a.shape[1:])).reshape(
        a.shape[0] * group, *a.shape[1:])


def prompt_cache(model: nn.Module, prompts: mx.array, lengths: mx.array, group: int,
                 width: int) -> list[_AfterPrompt]:
    """Per-layer caches for rows of `width` tokens that continue prompts [n, P] (each
    prompt less its last token, right-padded; `lengths` [n] their lengths), `group` rows a
    prompt (module comment above)."""
    layers = [_Recorder() for _ in model.layers]
    forward.hidden_states(model, prompts, cache=layers)  # only the keys and values are used
    n, p = prompts.shape
    offset = _repeat_rows(lengths.astype(mx.int32), group)
    slots = mx.arange(p)[None] < offset[:, None]                       # [R, P]
    causal = mx.arange(width)[None] <= mx.arange(width)[:, None]      # [W, W]
    rows = offset.shape[0]
    mask = mx.concatenate([mx.broadcast_to(slots[:, None], (rows, width, p)),
                           mx.broadcast_to(causal[None], (rows, width, width))], axis=2)
    mask = mask[:, None]                                              # [R, 1, W, P + W]
    return [_AfterPrompt(r, group, offset, mask) for r in layers]


def shared_token_logps(model: nn.Module, tokens: mx.array, mask: mx.array, prompts: mx.array,
                       lengths: mx.array, group: int, temperature: float = 1.0,
                       chunk: int = 0) -> tuple[mx.array, mx.array]:
    """token_logps of a shared batch: tokens / mask [n * group, W] (each row's last prompt
    token, then its completion), prompts [n, P] and lengths [n] (rollout.collate_shared)."""
    cache = prompt_cache(model, prompts, lengths, group, tokens.shape[1] - 1)
    return token_logps(model, tokens, mask, temperature, chunk, cache)


def grpo(model: nn.Module, tokens: mx.array, mask: mx.array, adv: mx.array,
         old_logps: mx.array | None = None, ref_logps: mx.array | None = None, *,
         loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
         beta: float = 0.0, max_completion_tokens: int = 256, temperature: float = 1.0,
         chunk: int = 0, prompts: mx.array | None = None, lengths: mx.array | None = None,
         group: int = 1):
    """The GRPO objective over a rollout batch: (loss sum, weight, metric sums); a shared
    batch when `prompts` is given (shared_token_logps)."""
    if prompts is None:
        logps, m = token_logps(model, tokens, mask, temperature, chunk)
    else:
        logps, m = shared_token_logps(model, tokens, mask, prompts, lengths, group,
                                      temperature, chunk)
    return grpo_loss(logps, old_logps, adv, m, loss_type=loss_type, epsilon=epsilon,
                     epsilon_high=epsilon_high, beta=beta, ref_logps=ref_logps,
                     max_completion_tokens=max_completion_tokens)


def bind(cfg):
    """The objective of a grpo run's config: fn(model, tokens, mask, advantages, [old
    log-probs when num_iterations > 1], [reference log-probs when beta > 0], [prompts,
    lengths: a shared batch])."""
    o = cfg.objective
    beta = o.beta or 0.0
    with_old = o.num_iterations > 1
    fixed = int(with_old) + int(bool(beta))

    def objective(model, tokens, mask, adv, *extra):
        shared = extra[fixed:]
        extra = extra[:fixed]
        old = extra[0] if with_old else None
        ref = extra[-1] if beta else None
        prompts, lengths = shared if shared else (None, None)
        return grpo(model, tokens, mask, adv, old, ref, loss_type=o.loss_type,
                    epsilon=o.epsilon, epsilon_high=o.epsilon_high, beta=beta,
                    max_completion_tokens=o.max_completion_tokens,
                    temperature=o.temperature or 1.0, chunk=cfg.train.loss_chunk,
                    prompts=prompts, lengths=lengths, group=o.group_size)
    return objective
