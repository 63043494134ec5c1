"""Held-out preference pairs, scored by one side of the comparison (base, start or tuned).

Every pair is scored once per side with mlxtune.objectives.reference.score_pairs: the
summed log-probs of the chosen and the rejected answer (prompt + answer rows, the answer's
tokens masked in, exactly as training encodes them). From those:

- loss / perplexity on the chosen answers: the mean cross-entropy per chosen-answer token
  (what SFT on the chosen answers would report);
- preference accuracy: the share of pairs whose chosen answer has the higher summed
  log-prob under this side;
- reward accuracy and margin, as the objective defines its reward (TRL's
  rewards/accuracies and rewards/margins): for dpo, beta * (log-prob under this side -
  log-prob under the reference policy), so it exists for the tuned side only (the
  reference's own reward is 0 by definition); for orpo and simpo, beta times the mean
  per-token log-prob, for every side.
"""

from __future__ import annotations

import math

import numpy as np

from mlxtune.objectives import beta_of
from mlxtune.objectives.reference import score_pairs


def score_side(model, pairs, pad_id: int, batch_size: int, chunk: int) -> dict[str, np.ndarray]:
    """{'chosen', 'rejected'}: summed log-probs; {'chosen_tokens', 'rejected_tokens'}."""
    s = score_pairs(model, pairs, pad_id, batch_size=batch_size, chunk=chunk, reference=False)
    return {"chosen": s["policy_chosen"], "rejected": s["policy_rejected"],
            "chosen_tokens": s["chosen_tokens"], "rejected_tokens": s["rejected_tokens"]}


def side_metrics(scores: dict[str, np.ndarray], objective_cfg) -> dict:
    ntok = float(scores["chosen_tokens"].sum())
    loss = float(-scores["chosen"].sum() / max(ntok, 1.0))
    out = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
           "loss_tokens": int(ntok), "pairs": len(scores["chosen"]),
           "preference_accuracy": float((scores["chosen"] > scores["rejected"]).mean())}
    if objective_cfg.type in ("orpo", "simpo"):
        beta = beta_of(objective_cfg)
        c = scores["chosen"] / scores["chosen_tokens"]
        r = scores["rejected"] / scores["rejected_tokens"]
        out["reward_accuracy"] = float((c > r).mean())
        out["reward_margin"] = float(beta * (c - r).mean())
    return out


def dpo_rewards(scores: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                objective_cfg) -> dict:
    """DPO's implicit reward of `scores`' side against the reference policy's scores."""
    beta = beta_of(objective_cfg)
    h = (scores["chosen"] - reference["chosen"]) - (scores["rejected"] - reference["rejected"])
    return {"reward_accuracy": float((h > 0).mean()), "reward_margin": float(beta * h.mean())}
