"""Optimizer and learning-rate schedule from the train config."""

from __future__ import annotations

import mlx.optimizers as optim

from mlxtune.config import TrainConfig


def schedule(cfg: TrainConfig, total_steps: int):
    """constant / cosine / linear decay to min_lr, after `warmup` linear warmup steps."""
    lr = cfg.learning_rate
    decay_steps = max(total_steps - cfg.warmup, 1)
    if cfg.schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, cfg.min_lr)
    elif cfg.schedule == "linear":
        main = optim.linear_schedule(lr, cfg.min_lr, decay_steps)
    else:
        main = lr
    if cfg.warmup <= 0:
        return main
    warm = optim.linear_schedule(0.0, lr, cfg.warmup)
    if not callable(main):
        main_value = main
        main = lambda step: main_value + 0.0 * step  # noqa: E731 (join_schedules wants callables)
    return optim.join_schedules([warm, main], [cfg.warmup])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    lr = schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
