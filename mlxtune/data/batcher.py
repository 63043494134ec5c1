"""The training batches of a run: length-bucketed rows, or packed rows.

One object answers the trainer's three questions: which batches an epoch has (in order),
how a batch becomes arrays, and how many batches an epoch holds. Both layouts are pure
functions of (example lengths, batch size, seed, epoch), which is what lets a resumed run
continue at the same batch.
"""

from __future__ import annotations

from mlxtune.data.batches import batch_order, collate
from mlxtune.data.encode import Example
from mlxtune.data.packing import collate_packed, packed_batch_order, packing_pays


class Batcher:
    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 pad_multiple: int, packed: bool = False, row_len: int = 0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.packed, self.row_len = packed, row_len
        self.lengths = [len(e.tokens) for e in examples]
        self._orders: dict[int, list] = {}

    def order(self, epoch: int) -> list:
        """The epoch's batches: lists of example indices (packed: lists of rows of them)."""
        if epoch not in self._orders:
            if self.packed:
                order = packed_batch_order(self.lengths, self.row_len, self.batch_size,
                                           self.seed, epoch)
            else:
                order = batch_order(self.lengths, self.batch_size, self.seed, epoch)
            self._orders = {epoch: order}  # keep one epoch: orders can be large
        return self._orders[epoch]

    def arrays(self, batch) -> tuple:
        """(tokens, mask) for bucketed batches; (tokens, mask, segments) for packed ones."""
        if self.packed:
            rows = [[self.examples[i] for i in row] for row in batch]
            return collate_packed(rows, self.pad_id, self.pad_multiple)
        return collate([self.examples[i] for i in batch], self.pad_id, self.pad_multiple)

    def batches_per_epoch(self) -> int:
        return len(self.order(0))

    def describe(self) -> str:
        n = self.batches_per_epoch()
        if not self.packed:
            return f"batches: {n} per epoch of {self.batch_size} length-bucketed examples"
        rows = sum(len(b) for b in self.order(0))
        return (f"batches: {n} per epoch of {self.batch_size} packed rows of up to "
                f"{self.row_len} tokens ({len(self.examples) / max(rows, 1):.1f} examples a row)")


def decide_packing(setting, lengths: list[int], row_len: int, batch_size: int,
                   model_config: dict, pad_multiple: int) -> bool:
    """data.packing: true / false as given; "auto": pack when it costs fewer model FLOPs
    per epoch than length-bucketed batches (mlxtune.data.packing.packing_pays)."""
    if setting is True or setting is False:
        return setting
    flops, attention = layer_flops(model_config)
    return packing_pays(lengths, row_len, batch_size, flops, attention, pad_multiple)


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
