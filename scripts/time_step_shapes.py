#!/usr/bin/env python
"""The trainer's compiled LoRA step at given batch lengths: first call, repeats, page faults.

SmolLM2-135M (the packaged GGUF, dequantized to float32), rank-16 LoRA on every linear
layer, 4 rows of random tokens of each LENGTH given: the whole loss's forward and backward
pass compiled as the trainer compiles it (no optimizer update). For each length it prints
the first call's wall time (tracing, compiling, and the first run at that shape, whose
buffers may be new to the heap), two repeats, the minor page faults of each, and MLX's
peak memory. A repeat that still page-faults is the heap being given back between steps
(mlxtune._malloc). Under `perf record -p PID` the repeats show where a steady step's time
goes (docs/performance.md, "Where the time goes now").

    .venv/bin/python scripts/time_step_shapes.py 304 1024 [LENGTH ...]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mlxtune  # noqa: E402,F401  (the system OpenBLAS and malloc settings before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlxtune import adapters, forward, models  # noqa: E402
from mlxtune.config import AdapterConfig, ModelConfig  # noqa: E402
from mlxtune.objectives.sft import sft  # noqa: E402

ROWS = 4


def timed(step, tokens, mask) -> tuple[float, int]:
    """(wall seconds, minor page faults) of one evaluated call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    mx.eval(step(tokens, mask))
    return (time.perf_counter() - start,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lengths", type=int, nargs="+", metavar="LENGTH")
    args = p.parse_args()

    from bench_step import save_base_folders

    with tempfile.TemporaryDirectory() as tmp:
        _, dense = save_base_folders(Path(tmp))
        model = models.load(ModelConfig(path=str(dense))).model
    adapters.apply_lora(model, AdapterConfig(rank=16, alpha=32.0, targets=[]))
    grad = nn.value_and_grad(model, forward.for_gradient(
        lambda m, t, k: sft(m, t, k, chunk=2048)))
    step = mx.compile(lambda t, k: grad(model, t, k), inputs=[model.state],
                      outputs=[model.state])
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    for length in args.lengths:
        tokens = mx.array(rng.integers(0, vocab, (ROWS, length)).astype(np.int32))
        mask = mx.ones((ROWS, length))
        mx.reset_peak_memory()
        calls = [timed(step, tokens, mask) for _ in range(3)]
        print(f"{ROWS} x {length}: first {calls[0][0]:.2f} s ({calls[0][1]} faults), "
              f"repeats {calls[1][0]:.2f} / {calls[2][0]:.2f} s ({calls[1][1]} / "
              f"{calls[2][1]} faults), peak {mx.get_peak_memory() / 1e9:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
