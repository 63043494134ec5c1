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


def _scaled(lr, ratio: float):
    if callable(lr):
        return lambda step: ratio * lr(step)
    return ratio * lr


def is_lora_plus_b(path: str, _value=None) -> bool:
    """LoRA+'s faster group, as PEFT's create_loraplus_optimizer forms it: the B matrices
    and the one-dimensional parameters (DoRA's magnitudes)."""
    return path.endswith(".lora_b") or path.endswith(".m")


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    """The optimizer of train.optimizer with the schedule; with train.lora_plus_ratio,
    two of them (LoRA+): lora_b and DoRA's magnitudes at ratio x the learning rate."""
    if cfg.lora_plus_ratio is None:
        return _make(cfg, schedule(cfg, total_steps))
    return optim.MultiOptimizer(
        [_make(cfg, _scaled(schedule(cfg, total_steps), cfg.lora_plus_ratio)),
         _make(cfg, schedule(cfg, total_steps))], [is_lora_plus_b])


def _make(cfg: TrainConfig, lr) -> optim.Optimizer:
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
