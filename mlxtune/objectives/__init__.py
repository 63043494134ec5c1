"""Training objectives: a loss over one batch, nothing more.

An objective returns (summed loss, weight, extra metrics): the trainer divides sums by
the total weight of a step, so an accumulated step's loss is the mean over all of its
items however they are split into micro-batches. The weight is the number of
loss-bearing tokens for `sft` and the number of pairs for the preference objectives;
extra metrics (TRL's `rewards/...`, `logps/...`) are sums over the same items.

- `sft` (mlxtune.objectives.sft): cross-entropy on the loss-bearing tokens.
- `dpo`, `orpo`, `simpo` (mlxtune.objectives.preference): losses over pairs of answers;
  `dpo` also takes the reference policy's log-probs (mlxtune.objectives.reference).
- `grpo` (mlxtune.objectives.grpo): the clipped policy-gradient loss over a rollout batch
  (mlxtune.objectives.rollout) scored by objective.rewards (mlxtune.objectives.rewards);
  its weight depends on objective.loss_type (tokens for dapo, completions otherwise).
"""

from __future__ import annotations

from functools import partial

from mlxtune.objectives import grpo, preference
from mlxtune.objectives.sft import sft, token_losses

OBJECTIVES = {"sft": sft, "dpo": preference.dpo, "orpo": preference.orpo,
              "simpo": preference.simpo, "grpo": grpo.grpo}
PREFERENCE = ("dpo", "orpo", "simpo")
WITH_REFERENCE = ("dpo",)  # the others are reference-free

__all__ = ["OBJECTIVES", "PREFERENCE", "WITH_REFERENCE", "build", "get", "sft", "token_losses"]


def get(name: str):
    return OBJECTIVES[name]


def build(cfg) -> callable:
    """The objective of a run's config with its settings bound, returning
    (loss_sum, weight, metrics) for every objective."""
    o = cfg.objective
    chunk = cfg.train.loss_chunk
    if o.type == "sft":
        def with_metrics(model, *batch):
            loss_sum, ntok = sft(model, *batch, chunk=chunk)
            return loss_sum, ntok, {}
        return with_metrics
    if o.type == "grpo":
        return grpo.bind(cfg)
    if o.type == "dpo":
        return partial(preference.dpo, loss=o.loss, beta=beta_of(o),
                       label_smoothing=o.label_smoothing, rpo_alpha=o.rpo_alpha, chunk=chunk)
    if o.type == "orpo":
        return partial(preference.orpo, beta=beta_of(o), chunk=chunk)
    return partial(preference.simpo, beta=beta_of(o), gamma=o.simpo_gamma,
                   label_smoothing=o.label_smoothing, chunk=chunk)


def beta_of(objective_cfg) -> float:
    """objective.beta, or the method's default when unset."""
    if objective_cfg.beta is not None:
        return objective_cfg.beta
    return preference.DEFAULT_BETA[objective_cfg.type]
