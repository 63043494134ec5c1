"""The config's rules that span several keys (config.load and config.from_dict apply them
after each key has been read and typed): data sources, iters or epochs, each objective's
own keys, adapter types, trackers. Each failure is one ConfigError naming the key."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from mlxtune.errors import ConfigError

if TYPE_CHECKING:
    from mlxtune.config import Config

DEFAULT_ITERS = 600


def check(cfg: Config, where: str) -> None:
    """Rules that span several keys."""
    d = cfg.data
    if d.path and (d.train or d.valid or d.test):
        raise ConfigError(f"{where}: data.path: give either data.path (one file split by "
                          "data.split) or data.train/valid/test files, not both")
    if d.hub is not None:
        if d.path or d.train or d.valid or d.test:
            given = "data.path" if d.path else "data.train/valid/test"
            raise ConfigError(f"{where}: data.hub: give either data.hub (a Hugging Face "
                              f"dataset) or {given}, not both")
        if not d.hub.id or not str(d.hub.id).strip():
            raise ConfigError(f"{where}: data.hub.id: the dataset's id is required (e.g. "
                              "HuggingFaceH4/no_robots)")
    elif not d.path and not d.train:
        raise ConfigError(f"{where}: data.train: no training data (set data.train, "
                          "data.path with data.split, or data.hub)")
    if d.path and d.split.valid + d.split.test >= 1.0:
        raise ConfigError(f"{where}: data.split: valid + test must leave data for training")
    t = cfg.train
    if t.epochs is not None and t.iters is not None:
        raise ConfigError(f"{where}: train.epochs: give train.iters or train.epochs, not both")
    if t.epochs is None and t.iters is None:
        t.iters = DEFAULT_ITERS
    o = cfg.objective
    if o.type != "dpo" and o.loss != "sigmoid":
        raise ConfigError(f"{where}: objective.loss: {o.loss} is a DPO loss; {o.type} has none")
    if o.type != "dpo" and o.precompute_reference:
        raise ConfigError(f"{where}: objective.precompute_reference: {o.type} has no reference "
                          "model (only dpo does)")
    if o.type != "dpo" and o.rpo_alpha:
        raise ConfigError(f"{where}: objective.rpo_alpha: adds an NLL term to DPO; {o.type} "
                          "does not use it (orpo has its own NLL term)")
    if o.type == "dpo" and o.loss in ("ipo", "hinge") and o.label_smoothing:
        raise ConfigError(f"{where}: objective.label_smoothing: the {o.loss} loss does not use "
                          "it (sigmoid and robust do)")
    if o.beta == 0 and o.type in ("dpo", "simpo"):
        raise ConfigError(f"{where}: objective.beta: must be > 0 for {o.type}")
    _check_grpo(cfg, where)
    if cfg.adapter.rank > 4096:
        raise ConfigError(f"{where}: adapter.rank: {cfg.adapter.rank} is implausibly large")
    _check_adapter(cfg, where)
    cfg.train.report_to = _trackers(cfg.train.report_to, where)
    if not str(cfg.name).strip() or "/" in str(cfg.name):
        raise ConfigError(f"{where}: name: must be a non-empty name without '/'")


def _check_adapter(cfg: Config, where: str) -> None:
    """adapter.type against the keys that go with it."""
    a, t, o = cfg.adapter, cfg.train, cfg.objective
    if a.type == "full":
        if t.lora_plus_ratio is not None:
            raise ConfigError(f"{where}: train.lora_plus_ratio: LoRA+ sets the learning rate "
                              "of LoRA's B matrices; adapter.type full has none")
        if a.rslora:
            raise ConfigError(f"{where}: adapter.rslora: scales a LoRA update; adapter.type "
                              "full has none")
        q = cfg.model.quantize
        if q is not None and q.format != "none":
            raise ConfigError(f"{where}: model.quantize: adapter.type full trains every weight "
                              "and needs a dense base (remove model.quantize, or use lora / "
                              "dora for a quantized base)")
        if o.type == "dpo" and not o.precompute_reference:
            raise ConfigError(f"{where}: objective.precompute_reference: dpo with adapter.type "
                              "full needs it true (the reference is the starting weights: "
                              "computed once before training instead of keeping a second "
                              "copy of every trained weight)")
        if o.type == "grpo" and o.beta:
            raise ConfigError(f"{where}: objective.beta: grpo's KL term with adapter.type full "
                              "would need the starting weights beside the trained ones (a "
                              "second copy of every trained weight, for new completions each "
                              "step); set objective.beta: 0 (as DAPO and Dr. GRPO do) or use "
                              "adapter.type lora / dora")


# GRPO's own keys, and their defaults (set on another objective: an error).
GRPO_KEYS = {"group_size": 8, "temperature": 1.0, "top_p": 1.0, "max_completion_tokens": 256,
             "epsilon": 0.2, "epsilon_high": None, "loss_type": "dapo",
             "scale_rewards": "group", "mask_truncated_completions": False,
             "num_iterations": 1, "rewards": [], "dense_base": "auto"}


def _check_grpo(cfg: Config, where: str) -> None:
    """objective.type grpo and its keys (mlxtune.objectives.rewards checks each reward)."""
    o = cfg.objective
    if o.type != "grpo":
        for key, default in GRPO_KEYS.items():
            if getattr(o, key) != default:
                raise ConfigError(f"{where}: objective.{key}: a grpo key; objective.type "
                                  f"{o.type} does not use it")
        return
    if o.group_size < 2:
        raise ConfigError(f"{where}: objective.group_size: must be >= 2, got {o.group_size} "
                          "(advantages compare the completions of one prompt with each other)")
    if not o.rewards:
        raise ConfigError(f"{where}: objective.rewards: grpo needs at least one reward, e.g. "
                          "[{name: json_valid, weight: 1.0}]")
    from mlxtune.objectives import rewards

    rewards.check(o.rewards, where)


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def _trackers(names: list[str], where: str) -> list[str]:
    """train.report_to: known names, lower case, each once; "none" alone means none."""
    out = []
    if len(names) == 1 and "," in str(names[0]):  # report_to: tensorboard,wandb
        names = str(names[0]).split(",")
    for i, name in enumerate(names):
        n = str(name).strip().lower()
        if n == "none" and len(names) == 1:
            return []
        if n not in TRACKERS:
            close = difflib.get_close_matches(n, TRACKERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: train.report_to[{i}]: unknown tracker {name!r}{hint}; "
                              f"known: {', '.join(TRACKERS)} (or none)")
        if n not in out:
            out.append(n)
    return out
