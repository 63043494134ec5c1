"""Preference objectives: DPO (sigmoid, IPO, hinge, robust), ORPO and SimPO.

A batch of B pairs is 2B rows (mlxtune.data.preference.collate_pairs): the chosen answers
first, then the rejected ones in the same order, each row prompt + answer with the mask on
the answer's tokens only. `sequence_logps` sums the log-probabilities of those tokens.

The losses are pure functions of log-probabilities (`dpo_losses`, `orpo_losses`,
`simpo_losses`), one value per pair; tests/test_preference.py checks each against an
independent numpy computation. With pc, pr the policy's summed log-probs of the chosen and
rejected answers, rc, rr the reference's, and h = (pc - rc) - (pr - rr):

- dpo sigmoid (Rafailov et al. 2023):   -log s(beta h); with label_smoothing e > 0,
  (1 - e)(-log s(beta h)) + e(-log s(-beta h)) (conservative DPO, as TRL's sigmoid loss);
- dpo ipo (Azar et al. 2023):           (h - 1 / (2 beta))^2, on summed log-probs as in the
  paper (TRL averages them per token for IPO);
- dpo hinge (SLiC, Zhao et al. 2023):   max(0, 1 - beta h);
- dpo robust (Chowdhury et al. 2024):   ((1 - e)(-log s(beta h)) - e(-log s(-beta h)))
  / (1 - 2e), an unbiased loss under preference labels flipped with probability e;
- any dpo loss with rpo_alpha a > 0 (RPO, Pang et al. 2024; TRL's rpo_alpha): plus
  a (-pc / |c|), the chosen answer's mean per-token negative log-likelihood, which keeps
  DPO from lowering the chosen answer's probability while it widens the margin;
- orpo (Hong et al. 2024), no reference: -mean log p(chosen) - beta log s(log odds ratio),
  odds(y) = P / (1 - P) with log P the answer's mean per-token log-prob;
- simpo (Meng et al. 2024), no reference: -log s(beta (pc / |c| - pr / |r|) - gamma), the
  length-normalised log-probs (with label smoothing as TRL's CPO trainer).

Each objective returns (summed loss, number of pairs, metrics summed over pairs) with TRL's
metric names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (for orpo and simpo, as in TRL, the rewards are beta times
the mean per-token log-probs and the logps are those means; orpo adds nll_loss,
log_odds_ratio and log_odds_chosen).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxtune.objectives.sft import token_losses

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
# beta when objective.beta is unset: the papers' / TRL's defaults (for orpo, beta is the
# weight lambda of the odds-ratio term).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
DEFAULT_SIMPO_GAMMA = 0.5


def log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(x), -x)


# ----------------------------------------------------------------------------- log-probs


def sequence_logps(model: nn.Module, tokens: mx.array, mask: mx.array,
                   chunk: int = 0) -> tuple[mx.array, mx.array]:
    """(summed log-prob of each row's loss-bearing tokens [R], their count [R])."""
    losses, m = token_losses(model, tokens, mask, chunk=chunk)
    return -(losses * m).sum(axis=1), m.sum(axis=1)


def split_pairs(x: mx.array) -> tuple[mx.array, mx.array]:
    """Rows [2B] -> (chosen [B], rejected [B])."""
    n = x.shape[0] // 2
    return x[:n], x[n:]


# ----------------------------------------------------------------------------- losses


def dpo_losses(pc, pr, rc, rr, loss: str = "sigmoid", beta: float = 0.1,
               label_smoothing: float = 0.0) -> mx.array:
    """Per-pair DPO loss from summed log-probs of policy (pc, pr) and reference (rc, rr)."""
    h = (pc - rc) - (pr - rr)
    e = label_smoothing
    if loss == "sigmoid":
        return -(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return mx.maximum(1 - beta * h, 0.0)
    if loss == "robust":
        return (-(1 - e) * log_sigmoid(beta * h) + e * log_sigmoid(-beta * h)) / (1 - 2 * e)
    raise ValueError(f"unknown DPO loss {loss!r} (one of {', '.join(DPO_LOSSES)})")


def _log1m_exp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    x = mx.minimum(x, -1e-7)  # a mean log-prob of exactly 0 has odds of infinity
    return mx.where(x > -0.6931472, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def orpo_losses(pc, pr, len_c, len_r, beta: float = 0.1) -> tuple[mx.array, dict]:
    """Per-pair ORPO loss from summed log-probs and answer lengths, and its parts."""
    avg_c, avg_r = pc / len_c, pr / len_r
    log_odds = (avg_c - avg_r) - (_log1m_exp(avg_c) - _log1m_exp(avg_r))
    ratio = log_sigmoid(log_odds)
    nll = -avg_c
    return nll - beta * ratio, {"nll_loss": nll, "log_odds_ratio": ratio,
                                "log_odds_chosen": log_odds}


def simpo_losses(pc, pr, len_c, len_r, beta: float = 2.0, gamma: float = DEFAULT_SIMPO_GAMMA,
                 label_smoothing: float = 0.0) -> mx.array:
    """Per-pair SimPO loss from summed log-probs and answer lengths."""
    z = beta * (pc / len_c - pr / len_r) - gamma
    e = label_smoothing
    return -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z)


def reward_metrics(chosen_rewards, rejected_rewards, logps_chosen, logps_rejected) -> dict:
    """TRL's metrics, summed over pairs (the trainer divides by the number of pairs)."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": logps_chosen.sum(),
        "logps/rejected": logps_rejected.sum(),
    }


# ----------------------------------------------------------------------------- objectives


def rpo_nll(pc, len_c) -> mx.array:
    """Per-pair NLL term of RPO: the chosen answer's mean per-token negative log-prob."""
    return -pc / len_c


def dpo(model: nn.Module, tokens: mx.array, mask: mx.array, ref_logps: mx.array, *,
        loss: str = "sigmoid", beta: float = DEFAULT_BETA["dpo"],
        label_smoothing: float = 0.0, rpo_alpha: float = 0.0, chunk: int = 0):
    """DPO over a batch of pairs; `ref_logps` [2B] are the reference policy's summed
    log-probs of the same rows (mlxtune.objectives.reference). rpo_alpha > 0 adds RPO's
    NLL term on the chosen answers (and an nll_loss metric)."""
    logps, lengths = sequence_logps(model, tokens, mask, chunk)
    pc, pr = split_pairs(logps)
    rc, rr = split_pairs(mx.stop_gradient(ref_logps))
    losses = dpo_losses(pc, pr, rc, rr, loss, beta, label_smoothing)
    metrics = reward_metrics(beta * mx.stop_gradient(pc - rc), beta * mx.stop_gradient(pr - rr),
                             mx.stop_gradient(pc), mx.stop_gradient(pr))
    if rpo_alpha > 0:
        nll = rpo_nll(pc, split_pairs(lengths)[0])
        losses = losses + rpo_alpha * nll
        metrics["nll_loss"] = mx.stop_gradient(nll).sum()
    return losses.sum(), mx.array(pc.shape[0], mx.float32), metrics


def orpo(model: nn.Module, tokens: mx.array, mask: mx.array, *,
         beta: float = DEFAULT_BETA["orpo"], chunk: int = 0):
    logps, lengths = sequence_logps(model, tokens, mask, chunk)
    pc, pr = split_pairs(logps)
    len_c, len_r = split_pairs(lengths)
    losses, parts = orpo_losses(pc, pr, len_c, len_r, beta)
    avg_c, avg_r = mx.stop_gradient(pc / len_c), mx.stop_gradient(pr / len_r)
    metrics = reward_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)
    metrics.update({k: mx.stop_gradient(v).sum() for k, v in parts.items()})
    return losses.sum(), mx.array(pc.shape[0], mx.float32), metrics


def simpo(model: nn.Module, tokens: mx.array, mask: mx.array, *,
          beta: float = DEFAULT_BETA["simpo"], gamma: float = DEFAULT_SIMPO_GAMMA,
          label_smoothing: float = 0.0, chunk: int = 0):
    logps, lengths = sequence_logps(model, tokens, mask, chunk)
    pc, pr = split_pairs(logps)
    len_c, len_r = split_pairs(lengths)
    losses = simpo_losses(pc, pr, len_c, len_r, beta, gamma, label_smoothing)
    avg_c, avg_r = mx.stop_gradient(pc / len_c), mx.stop_gradient(pr / len_r)
    metrics = reward_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)
    return losses.sum(), mx.array(pc.shape[0], mx.float32), metrics
