"""The training batches of a run: which examples share a step, and how they become rows.

Three layouts (`Batcher.layout`):

- "random" (the default for SFT): each batch is `batch_size` examples drawn at random, so
  every step mixes short and long ones as the data does. Its examples become rows of at
  most `mix_row_len` tokens, several to a row with no attention across them, or one to a
  row padded to the longest, whichever `RowCost` says is cheaper for that batch.
- "by_length" (data.group_by_length: true): examples of similar length share a batch, one
  to a row, padded to the longest (little padding, every batch length-uniform).
- "packed" (data.packing): rows of `row_len` tokens filled with as many examples as fit,
  `batch_size` rows a step (fewer steps an epoch).

Why random is the default: the SFT loss is a mean over a batch's loss-bearing tokens, so a
length-grouped batch of short examples moves the adapter as far as one of long examples
with many times their tokens; on docs/performance.md's benchmark that trained to a worse
held-out loss than mlx-lm's mixed batches, every seed.

Row widths: the longest row of a batch rounded up to a multiple of `pad_multiple`, or with
data.shape_buckets to one of a bounded set of widths (`batches.Widths`), capped at the
layout's widest row (data.max_seq_len; a random batch's shared rows: `mix_row_len`), so
that the compiled step is traced for few shapes (docs/performance.md, "Shape buckets").

One object answers the trainer's three questions: which batches an epoch has (in order),
how a batch becomes arrays, and how many batches an epoch holds. Every layout is a pure
function of (example lengths, batch size, seed, epoch), which is what lets a resumed run
continue at the same batch.
"""

from __future__ import annotations

from mlxtune.data.batches import Widths, batch_order, collate
from mlxtune.data.encode import Example
from mlxtune.data.packing import (RowCost, collate_packed, first_fit_decreasing,
                                  packed_batch_order)
from mlxtune.data.preference import PairBatcher

LAYOUTS = ("random", "by_length", "packed")
# Widest row a random batch's examples share when attention skips the other examples' keys:
# the row's [L x L] bool mask is built every step and read by every layer (16 MB here).
MIX_ROW_CAP = 4096


class Batcher:
    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 pad_multiple: int, layout: str = "by_length", row_len: int = 0,
                 mix_row_len: int = 0, cost: RowCost | None = None, buckets: int = 0):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id, self.pad_multiple, self.buckets = pad_id, pad_multiple, buckets
        self.layout, self.row_len = layout, row_len
        self.mix_row_len = mix_row_len or row_len
        # One example (or a packed row) a row: at most row_len; a random batch's shared rows:
        # at most mix_row_len. Each is the top width of its set.
        self.widths = Widths(pad_multiple, buckets, row_len or None)
        self.mix_widths = Widths(pad_multiple, buckets, self.mix_row_len or None)
        self.cost = cost or RowCost(1.0, 0.0)
        self.lengths = [len(e.tokens) for e in examples]
        self._orders: dict[int, list] = {}

    @property
    def packed(self) -> bool:
        return self.layout == "packed"

    def order(self, epoch: int) -> list:
        """The epoch's batches: lists of example indices (packed: lists of rows of them)."""
        if epoch not in self._orders:
            if self.packed:
                order = packed_batch_order(self.lengths, self.row_len, self.batch_size,
                                           self.seed, epoch)
            else:
                order = batch_order(self.lengths, self.batch_size, self.seed, epoch,
                                    by_length=self.layout == "by_length")
            self._orders = {epoch: order}  # keep one epoch: orders can be large
        return self._orders[epoch]

    def rows(self, batch) -> tuple[list[list[int]], bool]:
        """The rows a batch's examples take, and whether they carry segment ids (several
        examples to a row). The trainer's ranks each lay out their own share of a batch."""
        if self.packed:
            return batch, True
        alone = [[i] for i in batch]
        if self.layout == "by_length" or len(batch) == 1:
            return alone, False
        mixed = first_fit_decreasing(batch, self.lengths, max(self.mix_row_len,
                                                              max(self.lengths[i] for i in batch)))
        if len(mixed) == len(batch):  # one example a row either way
            return alone, False
        # Decided on widths rounded to pad_multiple, whatever the buckets: they change a
        # batch's width, never its rows.
        if (self.cost.of(mixed, self.lengths, self.pad_multiple, segmented=True)
                < self.cost.of(alone, self.lengths, self.pad_multiple, segmented=False)):
            return mixed, True
        return alone, False

    def arrays(self, batch) -> tuple:
        """(tokens, mask) for one example a row; (tokens, mask, segments) for rows of
        several."""
        rows, segmented = self.rows(batch)
        if segmented:
            return collate_packed([[self.examples[i] for i in row] for row in rows],
                                  self.pad_id, self.row_widths(segmented))
        return collate([self.examples[row[0]] for row in rows], self.pad_id,
                       self.row_widths(segmented))

    def row_widths(self, segmented: bool) -> Widths:
        """The widths of rows of one example (False) or of several (True)."""
        return self.mix_widths if segmented and not self.packed else self.widths

    def shape(self, batch) -> tuple[int, int, bool]:
        """(rows, width, segmented) of a batch as `arrays` lays it out, without the arrays."""
        rows, segmented = self.rows(batch)
        longest = max(sum(self.lengths[i] for i in row) for row in rows)
        return len(rows), self.row_widths(segmented)(longest), segmented

    def batches_per_epoch(self) -> int:
        return len(self.order(0))

    def epoch_cost(self, bucketed: bool = True) -> float:
        """Model FLOPs of epoch 0's batches, as laid out (by `cost`), at their bucketed
        widths or (bucketed false) rounded to pad_multiple."""
        total = 0.0
        for batch in self.order(0):
            rows, segmented = self.rows(batch)
            widths = self.row_widths(segmented) if bucketed else self.pad_multiple
            total += self.cost.of(rows, self.lengths, widths, segmented)
        return total

    def describe(self) -> str:
        n = self.batches_per_epoch()
        widths = f"; row widths: {self.widths.describe()}"
        if self.layout == "by_length":
            return f"batches: {n} per epoch of {self.batch_size} length-grouped examples{widths}"
        if self.layout == "random":
            return (f"batches: {n} per epoch of {self.batch_size} random examples, in rows "
                    f"of up to {self.mix_row_len} tokens where that saves padding{widths}")
        rows = sum(len(b) for b in self.order(0))
        return (f"batches: {n} per epoch of {self.batch_size} packed rows of up to "
                f"{self.row_len} tokens ({len(self.examples) / max(rows, 1):.1f} examples a "
                f"row){widths}")


def decide_packing(setting, unpacked: Batcher) -> bool:
    """data.packing: true / false as given; "auto": pack when an epoch of packed rows
    costs at least 5% fewer model FLOPs than the unpacked layout's epoch (by its RowCost).
    Packing only for a clear gain: one example a row is the unpacked layout plus masking."""
    if setting is True or setting is False:
        return setting
    packed = Batcher(unpacked.examples, unpacked.batch_size, unpacked.seed, unpacked.pad_id,
                     unpacked.pad_multiple, "packed", unpacked.row_len, cost=unpacked.cost)
    # On widths rounded to pad_multiple: data.shape_buckets never changes the layout (nor,
    # with it, the batches and steps of an epoch).
    return packed.epoch_cost(False) < 0.95 * unpacked.epoch_cost(False)


def training_batches(examples: list, pairs: bool, data_cfg, train_cfg, pad_id: int,
                     pad_multiple: int, model_config: dict, skips_other_examples: bool):
    """The training batches of a run as configured (data.group_by_length, data.packing,
    train.batch_size and seed): a Batcher, or for preference pairs a PairBatcher.
    skips_other_examples: the model's attention on this backend costs a packed row its
    examples' own (query, key) pairs (mlxtune.attention.skips_other_examples)."""
    grouped = data_cfg.group_by_length
    if pairs:  # a pair's loss is its own, whatever its batch: length-grouped by default
        return PairBatcher(examples, train_cfg.batch_size, train_cfg.seed, pad_id,
                           pad_multiple, by_length=grouped is not False)
    cost = RowCost(*layer_flops(model_config), skips_other_examples)
    buckets = shape_buckets(data_cfg.shape_buckets)
    unpacked = Batcher(examples, train_cfg.batch_size, train_cfg.seed, pad_id, pad_multiple,
                       "by_length" if grouped else "random", data_cfg.max_seq_len,
                       mix_row_length(data_cfg.max_seq_len, train_cfg, skips_other_examples),
                       cost, buckets=buckets)
    if not decide_packing(data_cfg.packing, unpacked):
        return unpacked
    return Batcher(examples, train_cfg.batch_size, train_cfg.seed, pad_id, pad_multiple,
                   "packed", data_cfg.max_seq_len, cost=cost, buckets=buckets)


# data.shape_buckets when unset: widths per doubling under each profile (see the key).
DEFAULT_BUCKETS = {"gpu": 8, "cpu": 0}


def shape_buckets(setting: int | None) -> int:
    """data.shape_buckets as given, or (None) this profile's default."""
    if setting is not None:
        return setting
    from mlxtune import backend

    return DEFAULT_BUCKETS[backend.profile()]


def mix_row_length(max_seq_len: int, train_cfg, skips_other_examples: bool) -> int:
    """The widest row a random batch's examples share. max_seq_len, unless the attention
    skips the other examples' keys: then a whole batch can be one row (up to MIX_ROW_CAP
    tokens) without paying attention across it, as long as the row still fits a
    micro-batch (train.max_batch_tokens) and the step is not split over CPU streams by
    rows (train.cpu_streams)."""
    if not skips_other_examples or train_cfg.cpu_streams > 1:
        return max_seq_len
    wide = min(train_cfg.batch_size * max_seq_len, MIX_ROW_CAP)
    if train_cfg.max_batch_tokens:
        wide = min(wide, train_cfg.max_batch_tokens)
    return max(max_seq_len, wide)


def layer_flops(config: dict) -> tuple[float, float]:
    """Forward FLOPs of one transformer block: per token through its linear layers, and per
    (query, key) pair through attention (scores and the weighted sum of values)."""
    d = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    inter = config.get("intermediate_size", 4 * d)
    linear_params = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * inter
    return 2.0 * linear_params, 4.0 * heads * head_dim
