#!/usr/bin/env python
"""A LoRA training step on an NF4 base vs the same step on the dense float32 base.

SmolLM2-135M (the packaged GGUF, dequantized to float32: the dense base) and the same
weights with every linear layer of the blocks in NF4 (double-quantized; embeddings stay
float32, as in QLoRA). LoRA rank 8 / alpha 16 on every linear layer of every block, AdamW,
batch 4 x 128 tokens, the step compiled the way mlxtune's trainer compiles it. Steps of
the two models alternate (dense, nf4, dense, ...) so that load from other processes hits
both alike; the first steps of each (compilation) are not timed. Per-step peak memory is
MLX's own count.

    .venv/bin/python scripts/bench_nf4_step.py               # ~2 minutes on 2 cores
    .venv/bin/python scripts/bench_nf4_step.py --steps 10 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxtune  # noqa: E402,F401  (OpenBLAS before mlx.core)


def dense_base():
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    from mlxtune import quant
    from mlxtune.models import packaged_path
    from mlxtune.models.gguf import load_gguf

    model, _, _ = load_gguf(packaged_path("smollm2-135m-instruct"))
    model = dequantize_model(model)
    quant.cast_floats(model, mx.float32)
    return model


def prepare(model, nf4: bool):
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlxtune import quant
    from mlxtune.adapters import apply_lora
    from mlxtune.config import AdapterConfig

    if nf4:
        quant.quantize_nf4(model)
        quant.cast_floats(model, mx.float32)
    mx.random.seed(0)
    apply_lora(model, AdapterConfig(rank=8, alpha=16.0))
    model.train()
    mx.eval(model.parameters())
    return model, optim.AdamW(learning_rate=1e-4)


def step_fn(model, optimizer):
    import mlx.core as mx
    import mlx.nn as nn

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(tokens):
        loss, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        return loss

    return mx.compile(step, inputs=state, outputs=state)


def main() -> int:
    import mlx.core as mx
    import numpy as np

    from mlxtune import backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    dense_model, dense_opt = prepare(dense_base(), nf4=False)
    nf4_model, nf4_opt = prepare(dense_base(), nf4=True)
    runs = {"dense_f32": step_fn(dense_model, dense_opt), "nf4": step_fn(nf4_model, nf4_opt)}
    models = {"dense_f32": dense_model, "nf4": nf4_model}
    rng = np.random.default_rng(0)
    vocab = dense_model.args.vocab_size
    batches = [mx.array(rng.integers(0, vocab, (args.batch, args.seq + 1)))
               for _ in range(args.warmup + args.steps)]
    times = {k: [] for k in runs}
    peaks = {k: 0.0 for k in runs}
    losses = {k: [] for k in runs}
    for i, tokens in enumerate(batches):
        for name, step in runs.items():
            mx.reset_peak_memory()
            start = time.perf_counter()
            loss = step(tokens)
            mx.eval(loss, models[name].state)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], mx.get_peak_memory() / 1e9)
            losses[name].append(loss.item())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "backend": backend.name(), "blas": backend.blas(), "batch": args.batch,
        "seq": args.seq, "steps": args.steps,
        "step_s": {k: round(v, 3) for k, v in med.items()},
        "step_s_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "tokens_per_s": {k: round(args.batch * args.seq / v, 1) for k, v in med.items()},
        "peak_gb": {k: round(v, 3) for k, v in peaks.items()},
        "ratio_nf4_over_dense": round(med["nf4"] / med["dense_f32"], 3),
        "first_loss": {k: round(v[0], 4) for k, v in losses.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"backend {result['backend']}, BLAS {result['blas']}")
        print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps each "
              "(median):")
        for k in runs:
            print(f"  {k:10s} {med[k]:7.3f} s/step  {result['tokens_per_s'][k]:8.1f} tok/s  "
                  f"peak {peaks[k]:.2f} GB")
        print(f"  nf4 / dense = {result['ratio_nf4_over_dense']:.3f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
