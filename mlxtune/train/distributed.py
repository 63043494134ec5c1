"""Data parallelism over MLX's distributed backend (`mx.distributed`, started by mlx.launch).

Every rank runs the same `mlxtune run` on the same config, data and model. A global batch
(train.batch_size) is cut from the same data order as in a single process, and rank r
takes its items r, r + W, r + 2W, ... (W ranks; packed batches: whole rows). Each rank sums
its items' losses and gradients (token-weighted for sft, per pair for preference
objectives); the sums are added across ranks with one `all_sum` per step and divided by
the global weight, so a step equals the single-process step over the same global batch,
not a mean of per-rank means. Rank 0 is the only writer (run directory, events,
checkpoints, adapters, evaluation); validation is split by batches and summed the same way.

Bad input must not hang the other ranks: until the run's inputs have been checked, every
rank meets the others at agreement points (`World.agree`), where each tells whether it
failed (and why) and a digest of what it is about to train on. A rank that fails between
two points still goes to the next one (`preflight`), carrying its error, so every rank
prints the same one line and exits non-zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune import config, errors
from mlxtune.errors import ConfigError, MlxtuneError

# The status every rank sends to an agreement point: a byte of kind, a digest of the
# values compared there, a digest of their names, how many there are, and a text (an
# error message, or rank 0's run directory).
_STATUS_BYTES = 1024
_KINDS = {0: None, 1: errors.ConfigError, 2: errors.DataError, 3: errors.ModelError,
          4: errors.MlxtuneError, 5: RuntimeError}
_HEAD = 1 + 32 + 32 + 4


class World:
    """This process's place among the ranks; the collectives a run uses. With one rank
    every method is a no-op that costs nothing."""

    def __init__(self, group: mx.distributed.Group | None = None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self._depth = 0         # nested preflight() blocks
        self._pending = False   # inside the checks: failures must reach the other ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ batches

    def shard(self, batch: list) -> tuple[list, bool]:
        """This rank's items of a global batch, and whether they are real. A short last
        batch may leave a rank nothing: it then computes a stand-in (the batch's first
        item) whose sums it drops, so every rank still runs the same collectives."""
        mine = batch[self.rank::self.size]
        return (mine, True) if mine else (batch[:1], False)

    # ------------------------------------------------------------------ collectives

    def sum_floats(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, exact for token counts)."""
        if self.size == 1:
            return list(values)
        out = mx.distributed.all_sum(mx.array(np.asarray(values, np.float64)),
                                     group=self.group, stream=mx.cpu)
        return [float(v) for v in np.array(out)]

    def barrier(self) -> None:
        self.sum_floats([0.0])

    def max_float(self, value: float) -> float:
        if self.size == 1:
            return value
        out = mx.distributed.all_max(mx.array([value], mx.float64), group=self.group,
                                     stream=mx.cpu)
        return float(out.item())

    def sum_tree(self, tree):
        """A tree of arrays (gradients) summed over the ranks, in one all_sum."""
        if self.size == 1:
            return tree
        leaves = sorted(tree_flatten(tree), key=lambda kv: kv[0])
        flat = mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in leaves])
        flat = mx.distributed.all_sum(flat, group=self.group)
        out, start = [], 0
        for k, v in leaves:
            out.append((k, flat[start:start + v.size].reshape(v.shape).astype(v.dtype)))
            start += v.size
        return tree_unflatten(out)

    def broadcast_tree(self, tree):
        """Rank 0's arrays, on every rank (the other ranks' values are ignored; the trees
        must have the same structure). Values come through exactly: x + 0 + ... + 0."""
        if self.size == 1:
            return tree
        # By name: a tree read from a checkpoint lists its keys in another order than a
        # freshly initialised one.
        leaves = sorted(tree_flatten(tree), key=lambda kv: kv[0])
        layout = zlib.crc32(repr([(k, v.shape, v.dtype) for k, v in leaves]).encode())
        if self.max_float(layout) != -self.max_float(-layout):
            raise RuntimeError("the ranks hold differently shaped states (a bug)")
        out = dict()
        by_dtype: dict = {}
        for k, v in leaves:
            by_dtype.setdefault(v.dtype, []).append((k, v))
        for dtype, items in by_dtype.items():
            flat = mx.concatenate([v.reshape(-1) for _, v in items])
            if not self.main:
                flat = mx.zeros_like(flat)
            flat = mx.distributed.all_sum(flat, group=self.group, stream=mx.cpu)
            start = 0
            for k, v in items:
                out[k] = flat[start:start + v.size].reshape(v.shape)
                start += v.size
        mx.eval(list(out.values()))
        return tree_unflatten([(k, out[k]) for k, _ in leaves])

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's bytes, on every rank."""
        if self.size == 1:
            return data
        n = self.sum_floats([len(data) if self.main else 0])[0]
        buf = np.zeros(int(n), np.uint8)
        if self.main:
            buf[:] = np.frombuffer(data, np.uint8)
        out = mx.distributed.all_sum(mx.array(buf), group=self.group, stream=mx.cpu)
        return np.array(out).tobytes()

    def broadcast_state(self, model, optimizer, position: dict) -> dict:
        """Start every rank from rank 0's adapter weights, optimizer state and data
        position (only rank 0 reads a checkpoint when resuming; the run directory may
        be on rank 0's machine alone). Returns the position."""
        if self.size == 1:
            return position
        params = self.broadcast_tree(model.trainable_parameters())
        model.update(params)
        optimizer.state = self.broadcast_tree(optimizer.state)
        return json.loads(self.broadcast_bytes(json.dumps(position).encode()))

    # ------------------------------------------------------------------ agreement

    def agree(self, items: Callable[[], dict[str, bytes]], where: str, text: str = "",
              last: bool = False) -> str:
        """A point every rank reaches during the checks. `items()` maps a name to what it
        stands for (bytes; called only with several ranks); ranks that disagree on any are
        refused with one line naming them. Returns rank 0's `text`. `last`: the checks are
        over; a later failure is one rank's own (mlx.launch stops the others)."""
        if self.size == 1:
            return text
        items = items()
        names = sorted(items)
        digests = [hashlib.sha256(items[k]).digest()[:8] for k in names]
        status = _status(0, hashlib.sha256(b"".join(digests)).digest(),
                         hashlib.sha256("\n".join(names).encode()).digest(), len(names), text)
        rows = self._gather(status)
        self._raise_failures(rows)
        if last:
            self._pending = False
        if all(r[1:_HEAD] == rows[0][1:_HEAD] for r in rows):
            return _text(rows[0])
        self._pending = False  # every rank raises below, together
        if any(r[33:_HEAD] != rows[0][33:_HEAD] for r in rows):
            raise ConfigError(f"{where}: the ranks run different mlxtune versions (their "
                              "configuration keys differ); install the same on every machine")
        table = np.array(mx.distributed.all_gather(
            mx.array(np.frombuffer(b"".join(digests), np.uint8).reshape(1, -1)),
            group=self.group, stream=mx.cpu)).reshape(self.size, len(names), 8)
        differ = [names[i] for i in range(len(names))
                  if any((table[r, i] != table[0, i]).any() for r in range(self.size))]
        ranks = [r for r in range(1, self.size) if (table[r] != table[0]).any()]
        raise ConfigError(f"{where}: the ranks disagree on {', '.join(differ)} (rank "
                          f"{', '.join(map(str, ranks))} differs from rank 0); every rank "
                          "must run the same configuration on the same data and model")

    def fail(self, error: BaseException) -> None:
        """Take this rank's error to the agreement point the other ranks wait at, and
        raise there what every rank raises."""
        kind = next((k for k, cls in _KINDS.items() if cls is type(error)), None)
        if kind is None:
            kind = 4 if isinstance(error, MlxtuneError) else 5
        message = str(error) if kind != 5 else f"internal error: {type(error).__name__}: " \
            f"{(str(error).splitlines() or [''])[0]}"
        rows = self._gather(_status(kind, b"", b"", 0, message))
        self._pending = False
        self._raise_failures(rows, own=error)

    def _gather(self, status: bytes) -> list[bytes]:
        out = mx.distributed.all_gather(mx.array(np.frombuffer(status, np.uint8)[None]),
                                        group=self.group, stream=mx.cpu)
        return [bytes(row) for row in np.array(out)]

    def _raise_failures(self, rows: list[bytes], own: BaseException | None = None) -> None:
        failed = [(r, row) for r, row in enumerate(rows) if row[0] != 0]
        if not failed:
            return
        self._pending = False
        r, row = failed[0]
        message = _text(row) if r == 0 else f"rank {r}: {_text(row)}"
        if r == self.rank and own is not None and not isinstance(own, MlxtuneError):
            raise own  # this rank's own bug: its traceback with --debug
        cls = _KINDS[row[0]]
        if cls is RuntimeError:
            cls = MlxtuneError
        raise cls(message) from own


def _status(kind: int, values: bytes, names: bytes, count: int, text: str) -> bytes:
    body = text.encode("utf-8")[: _STATUS_BYTES - _HEAD]
    head = bytes([kind]) + values.ljust(32, b"\0") + names.ljust(32, b"\0") + \
        count.to_bytes(4, "little")
    return (head + body).ljust(_STATUS_BYTES, b"\0")


def _text(row: bytes) -> str:
    return row[_HEAD:].rstrip(b"\0").decode("utf-8", errors="ignore")


_WORLD: World | None = None


def world() -> World:
    """The ranks this process runs among (one when not started by mlx.launch)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = World(mx.distributed.init())
    return _WORLD


@contextlib.contextmanager
def preflight():
    """The checks of a run (also usable as a decorator): an error raised inside, before the
    last agreement point, is taken to the point the other ranks wait at, so every rank
    exits with the same line instead of hanging. Blocks nest (the CLI's around run's)."""
    w = world()
    w._depth += 1
    if w._depth == 1:
        w._pending = True
    try:
        yield w
    except Exception as e:
        if w._pending and w.size > 1:
            w.fail(e)
        raise
    finally:
        w._depth -= 1
        if w._depth == 0:
            w._pending = False


# ----------------------------------------------------------------------------- checks


def config_items(cfg) -> dict[str, bytes]:
    """What the ranks must agree on before loading anything: every training key of the
    config (eval.* only matters to rank 0, which evaluates), the model by its name (its
    folder may sit elsewhere on another machine; weights are compared later), data and
    adapter files by content later too, and the versions of mlxtune and MLX."""
    import mlxtune
    from mlxtune.config import PATH_KEYS

    items = {}
    for key, value in config.flatten(cfg.to_dict()).items():
        if key.startswith("eval.") or (key in PATH_KEYS and key != "model.path"):
            continue
        if key == "model.path":
            value = Path(str(value)).name
        items[key] = json.dumps(value, sort_keys=True).encode()
    items["mlxtune version"] = mlxtune.__version__.encode()
    items["mlx version"] = mx.__version__.encode()
    return items


def check_batch_size(cfg, w: World) -> None:
    b, n = cfg.train.batch_size, w.size
    if b % n:
        near = " or ".join(str(x) for x in (b // n * n, b // n * n + n) if x)
        raise ConfigError(f"{cfg.source}: train.batch_size: {b} is the global batch, split "
                          f"evenly among the {n} ranks; make it a multiple of {n} ({near})")


def check_resume(checkpoint_dir: Path, w: World) -> None:
    """A run resumes with the number of ranks it was trained with."""
    state = json.loads((Path(checkpoint_dir) / "state.json").read_text())
    ranks = int(state.get("ranks", 1))
    if ranks != w.size:
        how = "a single process" if ranks == 1 else f"mlx.launch with {ranks} ranks"
        raise ConfigError(f"--resume: {checkpoint_dir} was trained with {ranks} rank"
                          f"{'s' if ranks != 1 else ''} and this run has {w.size}; resume it "
                          f"with {how}")


def run_items(train_set: list, valid_set: list, loaded, model, adapter_from, layout) -> dict:
    """What the ranks must agree on before training: the encoded data (tokens and loss
    masks, so tokenizers and files alike are compared), the model's architecture and
    weight layout, the starting adapter's weights, the batch layout (packing as decided)."""
    items = {"data.train (tokens and loss masks)": _digest_examples(train_set),
             "data.valid (tokens and loss masks)": _digest_examples(valid_set),
             "data batches (as decided)": str(layout).encode()}
    h = hashlib.sha256(json.dumps(loaded.config, sort_keys=True, default=str).encode())
    for k, v in tree_flatten(model.parameters()):
        h.update(f"{k}:{v.shape}:{v.dtype}|".encode())
    items["model (architecture, weight shapes and types)"] = h.digest()
    if adapter_from:
        h = hashlib.sha256()
        for k, v in tree_flatten(model.parameters()):
            if "lora_" in k:
                h.update(k.encode() + np.array(v.astype(mx.float32)).tobytes())
        items["model.adapter (weights)"] = h.digest()
    return items


def _digest_examples(items: list) -> bytes:
    h = hashlib.sha256()
    for item in items:
        rows = (item.chosen, item.rejected) if hasattr(item, "chosen") else (item,)
        for e in rows:
            h.update(np.asarray(e.tokens, np.int64).tobytes())
            h.update(np.packbits(np.asarray(e.mask, bool)).tobytes())
            h.update(b"|")
    return h.digest()

