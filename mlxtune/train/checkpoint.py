"""Atomic checkpoints: adapter, optimizer state and data position.

A checkpoint folder is written under a temporary name and renamed into place, so a
process killed at any moment leaves either the previous checkpoint or the new one, never
a half-written one. Resuming from one continues exactly where the run stopped: the
trainer re-seeds MLX's RNG from (train.seed, step) at every step, so the step number in
state.json is the whole RNG state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune import adapters

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder; on success it replaces `final` in one rename."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_adapter(model, adapter_config: dict, final: Path) -> None:
    with atomic_dir(final) as tmp:
        adapters.save(model, adapter_config, tmp)


def save(ckpt_root: Path, step: int, model, adapter_config: dict, optimizer,
         trainer_state: dict, keep: int = 0) -> Path:
    final = Path(ckpt_root) / f"step-{step}"
    with atomic_dir(final) as tmp:
        adapters.save(model, adapter_config, tmp)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_digest(folder) -> str:
    """sha256 of an adapter folder's weights file (what a full fine-tune started from)."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(folder) / adapters.ADAPTER_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load(path: Path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state; return the trainer state."""
    path = Path(path)
    weights = mx.load(str(path / adapters.ADAPTER_FILE))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
    return json.loads((path / STATE_FILE).read_text())
