"""The data pipeline: JSONL -> validated records -> splits -> tokens + loss mask -> batches.

Read in the order of the flow: ``records`` (reading and validation, ``file:line`` errors),
``splits`` (train / valid / test, optionally grouped by a key), ``encode`` (chat templates
and the loss mask), ``batches`` (random or length-grouped order, padding), ``packing``
(several examples to a row), ``batcher`` (a run's batches: order and rows together).
"""

from mlxtune.data.batches import batch_order, collate
from mlxtune.data.encode import EncodedSplit, Example, encode, resolve_mask_prompt
from mlxtune.data.records import FORMATS, ROLES, Record, read_records
from mlxtune.data.splits import load_splits, split_records

__all__ = ["FORMATS", "ROLES", "EncodedSplit", "Example", "Record", "batch_order", "collate",
           "encode", "load_splits", "read_records", "resolve_mask_prompt", "split_records"]
