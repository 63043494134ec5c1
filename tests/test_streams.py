"""train.cpu_streams: how many streams a step uses, the row groups, and BLAS threads."""

import mlx.core as mx
import numpy as np

from mlxtune import _blas
from mlxtune.train import streams
from mlxtune.train.loop import split_groups


def test_resolve():
    assert streams.resolve(3) == 3  # the CPU backend here
    assert streams.resolve(1) == 1


def test_groups_cover_every_row_once_and_keep_pairs_whole():
    rows = mx.arange(8)[:, None] * mx.ones((1, 3), mx.int32)
    ref = mx.arange(8).astype(mx.float32)
    groups = split_groups((rows, ref), 3)
    assert [g[0].shape[0] for g in groups] == [3, 3, 2]
    assert np.concatenate([np.array(g[1]) for g in groups]).tolist() == list(range(8))
    # Pairs: rows are [chosen 0..3, rejected 0..3]; a group holds both rows of its pairs.
    groups = split_groups((rows, ref), 2, pairs=True)
    assert [np.array(g[1]).tolist() for g in groups] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert len(split_groups((rows[:1], ref[:1]), 4)) == 1
    assert len(split_groups((rows, ref), 1)) == 1


def test_blas_threads_are_shared_out_and_restored():
    before = _blas.threads()
    if before is None:  # another BLAS: nothing to share
        return
    with streams.blas_threads_for(streams.usable_cores()):
        assert _blas.threads() == 1
    assert _blas.threads() == before
