"""Runs with trained-looking adapters, and logits on both sides, for the export tests."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxtune import adapters, models
from mlxtune.config import AdapterConfig, ModelConfig


def make_run(run_dir: Path, base: str | Path, rank: int = 4, alpha: float = 8.0,
             targets: list | None = None, layers: int = -1, seed: int = 1,
             b_scale: float = 0.05, folder: str = "adapters", kind: str = "lora",
             rslora: bool = False) -> Path:
    """A run directory as `mlxtune run` leaves it (config.yaml + an adapter folder), with
    random non-zero LoRA weights so that the adapter changes the output (`kind` dora: the
    magnitudes moved off the base's row norms too; full: every block weight perturbed)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"name: test\nmodel:\n  path: {base}\n")
    loaded = models.load(ModelConfig(path=str(base)))
    cfg = adapters.apply_lora(loaded.model, AdapterConfig(type=kind, rank=rank, alpha=alpha,
                                                          targets=targets or [],
                                                          layers=layers, rslora=rslora))
    mx.random.seed(seed)
    new = []
    for k, v in tree_flatten(loaded.model.trainable_parameters()):
        if kind == "full" or k.endswith(".m"):  # around the trained value, not from zero
            new.append((k, v * (1 + 0.2 * mx.random.normal(v.shape))))
            continue
        scale = b_scale if k.endswith("lora_b") else 1.0 / np.sqrt(v.shape[0])
        new.append((k, mx.random.normal(v.shape) * scale))
    loaded.model.load_weights(new, strict=False)
    cfg["base_model"] = str(base)
    adapters.save(loaded.model, cfg, run_dir / folder)
    return run_dir


def mlxtune_logits(base: str | Path, adapter_dir: Path | None, tokens: list[int]):
    """(base logits, adapted logits) from mlxtune: the base as loaded for training plus
    the adapter at run time (LoRALinear), float32, positions x vocab."""
    loaded = models.load(ModelConfig(path=str(base), dtype="float32"))
    x = mx.array([tokens])
    plain = np.array(loaded.model(x)[0].astype(mx.float32))
    if adapter_dir is None:
        return plain, None
    adapters.load(loaded.model, adapter_dir)
    adapted = np.array(loaded.model(x)[0].astype(mx.float32))
    return plain, adapted


def shift_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(correlation, regression slope of theirs on ours) of two logit shifts."""
    a, b = ours.ravel().astype(np.float64), theirs.ravel().astype(np.float64)
    a0, b0 = a - a.mean(), b - b.mean()
    corr = float((a0 @ b0) / np.sqrt((a0 @ a0) * (b0 @ b0)))
    slope = float((a0 @ b0) / (a0 @ a0))
    return corr, slope
