#!/usr/bin/env python
"""Where the time of a long-sequence LoRA step goes on MLX's CPU backend.

Times (process CPU time, one BLAS thread, so other jobs on the machine disturb it less
than wall time) the pieces of one SmolLM2-135M layer at batch 4 x 1024 tokens, forward +
backward, and the elementwise ops they are made of; then, with --step, a whole LoRA step
(rank 16, every linear) with MLX's attention and with mlxtune's blockwise attention.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/profile_cpu_step.py [--step]

The numbers behind docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mlxtune  # noqa: E402,F401  (the system OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mlxtune.attention import blockwise_attention  # noqa: E402

B, L, D, FF, H, HKV, HD = 4, 1024, 576, 1536, 9, 3, 64


def cpu_ms(f, reps: int = 3) -> float:
    mx.eval(f())
    start = time.process_time()
    for _ in range(reps):
        mx.eval(f())
    return (time.process_time() - start) / reps * 1000


def fwd_bwd(fn, *args):
    argnums = tuple(range(len(args)))
    return lambda: mx.grad(lambda *z: fn(*z).sum(), argnums=argnums)(*args)


def pieces() -> list[tuple[str, float]]:
    x = mx.random.normal((B, L, D))
    g = mx.random.normal((B, L, FF))
    q = mx.random.normal((B, H, L, HD))
    kv = mx.random.normal((B, HKV, L, HD))
    w = mx.random.normal((FF, D)) * 0.02
    norm = mx.ones((D,))
    mx.eval(x, g, q, kv, w)
    return [
        ("linear 576->1536, forward", cpu_ms(lambda: x @ w.T)),
        ("rms_norm, forward + backward", cpu_ms(fwd_bwd(lambda x: mx.fast.rms_norm(x, norm, 1e-5), x))),
        ("rope, forward + backward", cpu_ms(fwd_bwd(
            lambda q: mx.fast.rope(q, HD, traditional=False, base=1e4, scale=1.0, offset=0), q))),
        ("silu(gate) * up, forward + backward", cpu_ms(fwd_bwd(lambda a, b: nn.silu(a) * b, g, g))),
        ("exp over B x L x 1536", cpu_ms(lambda: mx.exp(g))),
        ("add over B x L x 1536", cpu_ms(lambda: g + g)),
        ("attention, mx.fast (CPU fallback), fwd + bwd", cpu_ms(fwd_bwd(
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125,
                                                                 mask="causal"), q, kv, kv))),
        ("attention, blockwise (128), fwd + bwd", cpu_ms(fwd_bwd(
            lambda q, k, v: blockwise_attention(q, k, v, 0.125, "causal", 128), q, kv, kv))),
    ]


def whole_step(blockwise: bool, rows_per_micro_batch: int = B) -> tuple[float, float]:
    """(CPU seconds, peak GB) of one LoRA step's forward and backward at B x L on SmolLM2,
    in micro-batches of `rows_per_micro_batch` rows with their gradients summed (what
    train.max_batch_tokens does)."""
    from mlx_lm.utils import load

    from bench_step import save_base_folders
    from mlxtune import adapters, attention
    from mlxtune.config import AdapterConfig
    from mlxtune.objectives import sft

    with tempfile.TemporaryDirectory() as tmp:
        _, dense = save_base_folders(Path(tmp))
        model, _ = load(str(dense))
    model.freeze()
    adapters.apply_lora(model, AdapterConfig(rank=16, alpha=32, targets=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    module = sys.modules[type(model).__module__]
    original = getattr(module.scaled_dot_product_attention, "_mlxtune_original",
                       module.scaled_dot_product_attention)
    module.scaled_dot_product_attention = original
    if blockwise:
        attention.install(model)
    tokens = mx.random.randint(0, 49000, (B, L))
    mask = (mx.random.uniform(shape=(B, L)) > 0.5).astype(mx.float32)
    def step():
        grads = None
        for i in range(0, B, rows_per_micro_batch):
            t, m = tokens[i:i + rows_per_micro_batch], mask[i:i + rows_per_micro_batch]
            _, g = nn.value_and_grad(model, lambda model: sft(model, t, m, chunk=2048)[0])(model)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads)
        return grads

    mx.eval(step())
    mx.reset_peak_memory()
    seconds = cpu_ms(step, reps=2) / 1000
    return seconds, mx.get_peak_memory() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", action="store_true", help="also time whole steps (minutes)")
    args = p.parse_args()
    print(f"batch {B} x {L} tokens, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, "
          "process CPU time")
    for name, ms in pieces():
        print(f"  {name:<48} {ms:8.0f} ms")
    if args.step:
        for blockwise, rows in ((False, B), (True, B), (True, B // 2)):
            seconds, peak = whole_step(blockwise, rows)
            print(f"  whole LoRA step, {'blockwise' if blockwise else 'mx.fast  '} attention, "
                  f"micro-batches of {rows} rows: {seconds:6.1f} s CPU, peak {peak:.2f} GB")


if __name__ == "__main__":
    main()
