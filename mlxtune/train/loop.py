"""The training loop: one obvious path from batches to a saved adapter.

step = grad_accumulation micro-batches -> weighted mean gradient -> clip -> update (the
weight is the objective's: loss-bearing tokens for sft, pairs for preference objectives,
whose extra metrics are averaged the same way into train and val events). Validation
every `eval_every` steps (best adapter kept, early stopping), atomic checkpoints every
`save_every`, a NaN stops the run with the last good checkpoint intact,
SIGINT / SIGTERM save a checkpoint and stop cleanly.

Under mlx.launch (mlxtune.train.distributed) each rank computes its share of every global
batch; the sums of loss, weight, tokens, metrics and gradients are added across ranks
before the update, so every rank takes the same step and makes the same decisions
(validation, early stopping, a signal on any rank); rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxtune import adapters, backend, data, forward, objectives
from mlxtune.config import Config
from mlxtune.data.batcher import Batcher
from mlxtune.data.preference import PairBatcher, collate_pairs
from mlxtune.objectives.reference import Reference
from mlxtune.errors import TrainingStopped
from mlxtune.train import checkpoint, streams
from mlxtune.train.distributed import World
from mlxtune.train.events import EventWriter
from mlxtune.train.optim import make_optimizer
from mlxtune.train.progress import Progress

PAD_MULTIPLE = 32  # fewer distinct shapes -> fewer recompilations of the step


@dataclass
class Position:
    """Everything besides weights, optimizer and RNG that a resume needs."""
    step: int = 0
    epoch: int = 0
    batch: int = 0           # next batch index within the epoch's order
    tokens: int = 0          # loss-bearing tokens trained on so far
    best_val: float = math.inf
    best_step: int = 0
    bad_evals: int = 0       # validations since the last improvement
    val_history: list = field(default_factory=list)
    ranks: int = 1           # data-parallel ranks (a resume must use as many)


@dataclass
class Result:
    reason: str
    step: int
    best_val: float | None
    last_loss: float | None


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    t = cfg.train
    if t.iters is not None:
        return t.iters
    return max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accumulation))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of a step (LoRA dropout); ranks draw apart from one another."""
    return (seed * 1_000_003 + step + rank * 0x9E3779B97F4A7C15) % (1 << 63)


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.
    Swaps each block's class for a subclass so other models in the process are untouched."""
    for block in model.layers:
        block.__class__ = _checkpointed_class(type(block))


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "_mlxtune_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:
        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return cls.__call__(self, *args, **kwargs)
            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)
        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__,
                                                         "_mlxtune_checkpointed": True})
    return _CHECKPOINTED[cls]


def split_rows(batch: tuple, max_tokens: int | None, pairs: bool = False) -> list[tuple]:
    """train.max_batch_tokens: a batch (arrays with rows first) as micro-batches of whole
    rows of at most max_tokens padded tokens each (at least one row). Preference batches
    keep each pair's chosen and rejected rows (and the pair's reference values) together."""
    rows, length = batch[0].shape
    if not max_tokens or rows * length <= max_tokens:
        return [batch]
    per = max(1, max_tokens // length)
    return _in_parts(batch, max(1, per // 2) if pairs else per, pairs)


def split_groups(batch: tuple, n: int, pairs: bool = False) -> list[tuple]:
    """train.cpu_streams: a batch as at most n groups of whole rows (pairs), near-equal."""
    units = batch[0].shape[0] // (2 if pairs else 1)
    if n <= 1 or units <= 1:
        return [batch]
    return _in_parts(batch, math.ceil(units / n), pairs)


def _in_parts(batch: tuple, per: int, pairs: bool) -> list[tuple]:
    """Consecutive parts of `per` rows (pairs: `per` pairs) of every array of a batch."""
    rows = batch[0].shape[0]
    if pairs:  # every array's rows are [chosen of each pair..., rejected of each pair...]
        n = rows // 2
        return [tuple(a[mx.concatenate([mx.arange(i, min(i + per, n)),
                                        mx.arange(n + i, n + min(i + per, n))])]
                      for a in batch) for i in range(0, n, per)]
    return [tuple(a[i:i + per] for a in batch) for i in range(0, rows, per)]


class Trainer:
    def __init__(self, model: nn.Module, adapter_config: dict, cfg: Config,
                 train_set: list, valid_set: list, run_dir: Path, events: EventWriter,
                 progress: Progress, pad_id: int, batches: Batcher | PairBatcher,
                 world: World | None = None):
        self.model, self.adapter_config, self.cfg = model, adapter_config, cfg
        self.world = world or World()
        self.train_set, self.valid_set = train_set, valid_set
        self.run_dir, self.events, self.progress = Path(run_dir), events, progress
        self.pad_id = pad_id
        # A full fine-tune trains its blocks in place: no other set of their weights is
        # kept (its DPO reference log-probs are precomputed before the first update).
        adapters.release_kept_weights(model)
        self.full = adapters.is_full(model)
        self.loss_fn = objectives.build(cfg)
        # Preference objectives train on pairs (train_set / valid_set hold data.preference.Pair).
        self.preference = cfg.objective.type in objectives.PREFERENCE
        # data.batcher.training_batches: a Batcher (examples) or PairBatcher (pairs)
        self.batches = batches
        self.reference = None
        if cfg.objective.type in objectives.WITH_REFERENCE:
            self.reference = Reference(model, pad_id, PAD_MULTIPLE, cfg.train.loss_chunk,
                                       compile=cfg.train.compile)
        self.total = total_steps(cfg, self.batches.batches_per_epoch())
        self.n_streams = streams.resolve(cfg.train.cpu_streams)
        self.streams = streams.streams(self.n_streams) if self.n_streams > 1 else [None]
        self.pos = Position()
        self._signal = None
        self._signalled = False  # a signal reached some rank (agreed at the last step)

    # ------------------------------------------------------------------ batches

    def _next_batch(self) -> tuple[tuple, bool]:
        """This rank's share of the next global batch as arrays, and whether it is real
        (distributed.World.shard)."""
        if self.pos.batch >= len(self.batches.order(self.pos.epoch)):
            self.pos.epoch += 1
            self.pos.batch = 0
        batch = self.batches.order(self.pos.epoch)[self.pos.batch]
        self.pos.batch += 1
        batch, real = self.world.shard(batch)
        arrays = self.batches.arrays(batch)
        if self.reference is not None:  # DPO: the reference's log-probs are an input
            arrays = (*arrays, self.reference.batch("train", batch, *arrays[:2]))
        return arrays, real

    def precompute_reference(self) -> None:
        """objective.precompute_reference: the reference log-probs of every train and
        valid pair, computed once (or read back from the run directory's cache)."""
        m = self.cfg.model
        identity = {"model": m.path, "revision": m.revision, "dtype": m.dtype,
                    "quantize": None if m.quantize is None else vars(m.quantize)}
        if self.full:
            # The reference is the starting weights, which training overwrites: the key
            # names them by the starting adapter's file, and they cannot be recomputed
            # once the run has taken a step.
            identity["full"] = checkpoint.file_digest(m.adapter) if m.adapter else "base"
        for split, pairs in (("train", self.train_set), ("valid", self.valid_set)):
            if not pairs:
                continue
            if self.world.main:  # it writes the cache; the other ranks receive the values
                self.reference.precompute(split, pairs, self.run_dir, identity,
                                          self.cfg.train.batch_size, self.progress.message,
                                          compute=not (self.full and self.pos.step > 0))
            if self.world.size > 1:
                values = self.reference.cached.get(split)
                if values is None:
                    values = np.zeros((len(pairs), 2), np.float32)
                self.reference.cached[split] = np.array(
                    self.world.broadcast_tree({"v": mx.array(values)})["v"])

    # ------------------------------------------------------------------ steps

    def _build_steps(self, optimizer: optim.Optimizer):
        model, t = self.model, self.cfg.train
        loss_and_grad = nn.value_and_grad(model, forward.for_gradient(self.loss_fn))
        state = [model.state, optimizer.state, mx.random.state]

        def finish(grads, ntok):
            grads = tree_map(lambda g: g / ntok, grads)
            if t.max_grad_norm is not None:
                grads, norm = optim.clip_grad_norm(grads, t.max_grad_norm)
            else:
                norm = mx.array(0.0)
            optimizer.update(model, grads)
            return norm

        def fused(*batch):
            (loss_sum, weight, metrics), grads = loss_and_grad(model, *batch)
            return loss_sum, weight, metrics, finish(grads, weight)

        def micro(*batch):
            (loss_sum, weight, metrics), grads = loss_and_grad(model, *batch)
            return loss_sum, weight, metrics, grads

        if t.compile:
            fused = mx.compile(fused, inputs=state, outputs=state)
            micro = mx.compile(micro, inputs=state, outputs=state)
            finish = mx.compile(finish, inputs=state, outputs=state)
        return fused, micro, finish

    def _train_step(self, fused, micro, finish) -> tuple[float, float, int, dict]:
        """One optimizer step: (summed loss, weight, loss-bearing tokens, summed metrics),
        over every rank's share of the step's batches."""
        accum, world = self.cfg.train.grad_accumulation, self.world
        # The RNG (LoRA dropout) is a function of (seed, step): resuming needs no RNG file.
        mx.random.seed(step_seed(self.cfg.train.seed, self.pos.step + 1, world.rank))
        total_loss, total_weight, total_tok, metrics, grads = 0.0, 0.0, 0, {}, None
        parts_of = [self._next_batch() for _ in range(accum)]
        parts_of = [(part, real) for batch, real in parts_of
                    for part in split_rows(batch, self.cfg.train.max_batch_tokens,
                                           self.preference)]
        whole = len(parts_of) == 1 and world.size == 1 and self.n_streams == 1
        with streams.blas_threads_for(self.n_streams):
            for batch, real in parts_of:
                if whole:  # the update is part of the compiled step
                    loss_sum, weight, m, _ = fused(*batch)
                    done = [(loss_sum, weight, m)]
                    mx.eval(done, self.model.state)
                else:
                    done = []
                    groups = split_groups(batch, self.n_streams, self.preference)
                    for stream, group in zip(self.streams, groups):
                        with mx.stream(stream) if stream else contextlib.nullcontext():
                            loss_sum, weight, m, g = micro(*group)
                        if not real:  # a stand-in for a rank with no share of a short batch
                            g = tree_map(mx.zeros_like, g)
                        grads = g if grads is None else tree_map(mx.add, grads, g)
                        done.append((loss_sum, weight, m))
                    mx.eval(done, grads)  # the groups' streams run at the same time
                if not real:
                    continue
                total_tok += int(batch[1][:, 1:].sum().item())
                for loss_sum, weight, m in done:
                    total_loss += loss_sum.item()
                    total_weight += weight.item()
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0.0) + v.item()
        if world.size > 1:
            # Sums over every rank's items, then the same update everywhere. The signal
            # flag rides along, so every rank stops at the same step.
            keys = sorted(m)
            sums = world.sum_floats([total_loss, total_weight, total_tok,
                                     float(self._signal is not None),
                                     *[metrics.get(k, 0.0) for k in keys]])
            total_loss, total_weight, total_tok, signalled = sums[:4]
            total_tok = int(total_tok)
            self._signalled = signalled > 0
            metrics = dict(zip(keys, sums[4:]))
            grads = world.sum_tree(grads)
        if not whole:
            mx.eval(finish(grads, mx.array(max(total_weight, 1), mx.float32)), self.model.state)
        return total_loss, total_weight, total_tok, metrics

    # ------------------------------------------------------------------ validation

    def validate(self) -> tuple[float, dict] | None:
        """(mean loss, mean extra metrics) over the validation split (or its first
        train.val_batches batches)."""
        if not self.valid_set:
            return None
        self.model.eval()
        order = data.batch_order([len(e) if self.preference else len(e.tokens)
                                  for e in self.valid_set],
                                 self.cfg.train.batch_size, self.cfg.train.seed, 0)
        if self.cfg.train.val_batches:
            order = order[: self.cfg.train.val_batches]
        # Each rank validates its share of the batches; the sums are added up below.
        order, real = self.world.shard(order)
        loss_sum, weight, metrics = 0.0, 0.0, {}
        for idx in order:
            items = [self.valid_set[i] for i in idx]
            if self.preference:
                batch = collate_pairs(items, self.pad_id, PAD_MULTIPLE)
            else:
                batch = data.collate(items, self.pad_id, PAD_MULTIPLE)
            if self.reference is not None:
                batch = (*batch, self.reference.batch("valid", idx, *batch))
            s, n, m = self.loss_fn(self.model, *batch)
            mx.eval(s, n, m)
            loss_sum += s.item()
            weight += n.item()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v.item()
        self.model.train()
        if self.world.size > 1:
            keys = sorted(metrics)
            scale = 1.0 if real else 0.0
            sums = self.world.sum_floats([scale * x for x in
                                          (loss_sum, weight, *[metrics[k] for k in keys])])
            loss_sum, weight, metrics = sums[0], sums[1], dict(zip(keys, sums[2:]))
        return loss_sum / max(weight, 1), {k: v / max(weight, 1) for k, v in metrics.items()}

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, optimizer) -> None:
        if not self.world.main:  # rank 0 writes; every rank holds the same state
            return
        path = checkpoint.save(self.run_dir / "checkpoints", self.pos.step, self.model,
                               self.adapter_config, optimizer, self.pos.__dict__,
                               keep=self.cfg.train.keep_checkpoints)
        self.events.emit("checkpoint", step=self.pos.step, path=str(path))

    def _save_adapter(self, folder: str) -> None:
        if self.world.main:
            checkpoint.save_adapter(self.model, self.adapter_config, self.run_dir / folder)

    def _on_signal(self, signum, _frame):
        self._signal = signum
        # A second Ctrl-C while we save kills the process as usual.
        signal.signal(signum, signal.SIG_DFL)

    # ------------------------------------------------------------------ the loop

    def run(self, resume_from: Path | None = None) -> Result:
        t = self.cfg.train
        optimizer = make_optimizer(t, self.total)
        optimizer.init(self.model.trainable_parameters())
        if resume_from is not None:
            self.pos = Position(**checkpoint.load(resume_from, self.model, optimizer))
            optimizer.init(self.model.trainable_parameters())
        if self.world.size > 1:  # rank 0's weights, optimizer state and position everywhere
            self.pos = Position(**self.world.broadcast_state(self.model, optimizer,
                                                             self.pos.__dict__))
        self.pos.ranks = self.world.size
        if t.grad_checkpoint:
            enable_grad_checkpoint(self.model)
        self.model.train()
        steps = self._build_steps(optimizer)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.reference is not None and self.cfg.objective.precompute_reference:
                self.precompute_reference()
            return self._loop(optimizer, steps)
        except BaseException as e:
            # A NaN stop has emitted its own stop event already.
            if not isinstance(e, (KeyboardInterrupt, TrainingStopped)):
                self.events.emit("stop", reason="error", step=self.pos.step,
                                 message=f"{type(e).__name__}: {e}")
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.progress.close()

    def _loop(self, optimizer, steps) -> Result:
        t, pos = self.cfg.train, self.pos
        interval_loss, interval_weight, interval_tok = 0.0, 0.0, 0
        interval_metrics, interval_start = {}, time.perf_counter()
        last_loss = None
        saved_at = pos.step if pos.step else -1
        self.progress.start(pos.step, self.total)
        if t.eval_every and pos.step == 0:
            self._evaluate()  # the untrained starting point, for comparison
        while pos.step < self.total:
            loss_sum, weight, ntok, metrics = self._train_step(*steps)
            loss = loss_sum / max(weight, 1)
            if not math.isfinite(loss):
                last = checkpoint.latest(self.run_dir / "checkpoints")
                msg = (f"loss became {loss} at step {pos.step + 1}; the last good checkpoint is "
                       f"{last}" if last else f"loss became {loss} at step {pos.step + 1} "
                       "(no checkpoint was saved before it)")
                self.events.emit("stop", reason="nan", step=pos.step + 1, message=msg)
                raise TrainingStopped(msg + "; lower train.learning_rate or check the data")
            pos.step += 1
            pos.tokens += ntok
            interval_loss += loss_sum
            interval_weight += weight
            interval_tok += ntok
            for k, v in metrics.items():
                interval_metrics[k] = interval_metrics.get(k, 0.0) + v
            last_loss = loss

            if pos.step % t.log_every == 0 or pos.step == self.total:
                now = time.perf_counter()
                # LoRA+ (two optimizers): the base learning rate, lora_a's
                lr = getattr(optimizer, "optimizers", [optimizer])[-1].learning_rate
                denom = max(interval_weight, 1)
                record = self.events.emit(
                    "train", step=pos.step, loss=interval_loss / denom,
                    lr=float(lr.item() if isinstance(lr, mx.array) else lr),
                    tokens=pos.tokens,
                    tokens_per_sec=interval_tok / max(now - interval_start, 1e-9),
                    peak_memory_gb=self.world.max_float(backend.peak_memory_gb()),  # any rank's
                    epoch=pos.epoch,
                    **{k: v / denom for k, v in interval_metrics.items()})
                self.progress.train(record)
                interval_loss, interval_weight, interval_tok = 0.0, 0.0, 0
                interval_metrics, interval_start = {}, time.perf_counter()

            stop_reason = None
            if t.eval_every and (pos.step % t.eval_every == 0 or pos.step == self.total):
                stop_reason = self._evaluate()
            if self._signal is not None if self.world.size == 1 else self._signalled:
                stop_reason = "interrupted"
            if stop_reason or (t.save_every and pos.step % t.save_every == 0) \
                    or pos.step == self.total:
                self._save_checkpoint(optimizer)
                saved_at = pos.step
            if stop_reason:
                break
        else:
            stop_reason = "done"

        if saved_at != pos.step:
            self._save_checkpoint(optimizer)
        if stop_reason != "interrupted":
            self._save_adapter("adapters")
        best = pos.best_val if math.isfinite(pos.best_val) else None
        # GRPO validates a reward, its val `loss` being minus it: the message names the reward.
        watched = (f"validation reward has not improved for {pos.bad_evals} evaluations; best "
                   f"{0.0 - best:.4f}" if self.cfg.objective.type == "grpo" and best is not None
                   else f"validation loss has not improved for {pos.bad_evals} evaluations; "
                        f"best {best}")
        messages = {
            "done": f"finished {pos.step} steps",
            "early_stopping": f"{watched} at step {pos.best_step}",
            "interrupted": f"stopped by signal {self._signal or '(to another rank)'} at step "
                           f"{pos.step}; resume with --resume",
        }
        self.events.emit("stop", reason=stop_reason, step=pos.step,
                         message=messages[stop_reason], best_val=best)
        # No rank leaves before rank 0 has written: mlx.launch stops the others when
        # one exits non-zero (as an interrupted run does).
        self.world.barrier()
        return Result(stop_reason, pos.step, best, last_loss)

    def _evaluate(self) -> str | None:
        """Validate, keep the best adapter, decide on early stopping."""
        out = self.validate()
        if out is None:
            return None
        val, metrics = out
        pos, es = self.pos, self.cfg.train.early_stopping
        pos.val_history.append([pos.step, val])
        improved = val < pos.best_val - es.min_delta
        if improved:
            pos.best_val, pos.best_step, pos.bad_evals = val, pos.step, 0
            self._save_adapter("best")
        else:
            pos.bad_evals += 1
        self.events.emit("val", step=pos.step, loss=val, best=pos.best_val, improved=improved,
                         **metrics)
        self._report_val(val, metrics)
        if es.patience and pos.bad_evals >= es.patience:
            return "early_stopping"
        return None

    def _report_val(self, val: float, metrics: dict) -> None:
        """The progress line of one validation (GRPO's names its reward)."""
        self.progress.val(self.pos.step, val, self.pos.best_val, metrics)
