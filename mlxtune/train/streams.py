"""A batch's rows on several CPU streams at once (train.cpu_streams, CPU backend only).

MLX's CPU backend runs the ops of a stream on that stream's one thread; only the matmuls
(OpenBLAS) spread over the cores. In a LoRA step most of the time goes to elementwise ops,
softmax and reductions (docs/performance.md), so with one stream the other cores sit idle
for most of a step. With N streams the rows of each (micro-)batch are split into N groups
whose forward and backward passes are each built on a stream of their own and evaluated
together: N threads run the elementwise work at once, and each OpenBLAS call gets
cores / N threads so the matmuls do not oversubscribe the cores. The gradient is the sum of
the groups' gradients, as for micro-batches: the same step (tested), with the activations
of the same rows alive at once as when the batch runs whole.

Measured (docs/performance.md): faster where elementwise work dominates (short rows), but
slower and with a higher peak on SmolLM2 at 4 x 1,024 tokens, where single-threaded BLAS
calls lose more than the elementwise ops gain; so it is off (1) unless asked for.

mlxtune.native's kernels are safe here: each group's kernels are built on its group's
stream (the one `mx.stream` makes the default), and their parallel loops, which hold
OpenBLAS single-threaded while they run, share one process-wide hold (native/common.h's
BlasHold): the first in sets 1, the last out puts back the count set below, so streams
running kernels at once neither leave OpenBLAS at 1 thread nor hand a running loop a
multi-threaded BLAS (tests/test_native_attention.py).
"""

from __future__ import annotations

import contextlib
import os

import mlx.core as mx

from mlxtune import _blas, backend

_STREAMS: list = []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve(requested: int) -> int:
    """How many streams a step uses: `requested` on the CPU profile, else 1 (GPU kernels
    are parallel already; the GPU profile does as a GPU does)."""
    return requested if backend.profile() == "cpu" else 1


def streams(n: int) -> list:
    """n CPU streams, made once per process (each has its own thread)."""
    while len(_STREAMS) < n:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[:n]


@contextlib.contextmanager
def blas_threads_for(n_streams: int):
    """OpenBLAS threads per call while n_streams streams run matmuls at the same time."""
    before = _blas.threads()
    if before is None or n_streams <= 1:
        yield
        return
    _blas.set_threads(max(1, usable_cores() // n_streams))
    try:
        yield
    finally:
        _blas.set_threads(before)
