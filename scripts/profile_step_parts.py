#!/usr/bin/env python
"""Where a LoRA step's wall time goes at the benchmark's mean batch, in one process.

On SmolLM2-135M (the packaged GGUF, dequantized to float32) with rank-16 LoRA on every
linear layer, at ROWS x TOKENS random tokens (default 4 x 304: ~1,216 positions, like the
mean step of scripts/bench_vs_mlx_lm.py's data), wall time with all cores, compiled as the
trainer compiles its step:

- the trunk's forward pass without and with the adapters, and its forward + backward;
- the whole loss's forward + backward (no optimizer update);
- the loss over the vocabulary alone (hidden states in, gradient out) and its two head
  matmuls alone, in the trainer's chunks;
- the cost of a new batch shape: the first call at a shape against a repeat;
- with --ab-addmm, the step with LoRA's update as one addmm against the separate
  product and add, alternating, so that the machine's drift hits both alike.

    .venv/bin/python scripts/profile_step_parts.py [--rows 4 --tokens 304 --reps 3]

The numbers behind docs/performance.md's "MFU >= 40%: not met". Run it on an idle
machine: the same step's time drifts by ~20% over minutes here even then, so read the
medians and the A/B pairs, not one number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mlxtune  # noqa: E402,F401  (the system OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlxtune import adapters, forward, models  # noqa: E402
from mlxtune.config import AdapterConfig, ModelConfig  # noqa: E402
from mlxtune.objectives.sft import sft  # noqa: E402


def seconds(f, reps: int) -> list[float]:
    mx.eval(f())  # compiled and warmed
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(f())
        out.append(time.perf_counter() - start)
    return out


def report(name: str, times: list[float]) -> None:
    print(f"{name:58s} median {statistics.median(times):6.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)


def compiled_step(model, loss):
    grad = nn.value_and_grad(model, forward.for_gradient(loss))
    return mx.compile(lambda t, m: grad(model, t, m), inputs=[model.state],
                      outputs=[model.state])


def whole_loss(model, tokens, mask):
    return sft(model, tokens, mask, chunk=2048)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=304)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ab-addmm", type=int, default=0, metavar="PAIRS",
                   help="also time PAIRS alternating pairs of steps, addmm against add")
    args = p.parse_args()

    from bench_step import save_base_folders

    with tempfile.TemporaryDirectory() as tmp:
        _, dense = save_base_folders(Path(tmp))
        model = models.load(ModelConfig(path=str(dense))).model
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size

    def batch(length: int):
        return (mx.array(rng.integers(0, vocab, (args.rows, length)).astype(np.int32)),
                mx.ones((args.rows, length)))

    tokens, mask = batch(args.tokens)
    trunk = mx.compile(lambda t: forward.hidden_states(model, t))
    report("trunk forward, no adapters", seconds(lambda: trunk(tokens), args.reps))

    adapters.apply_lora(model, AdapterConfig(rank=16, alpha=32.0, targets=[]))
    trunk = mx.compile(lambda t: forward.hidden_states(model, t), inputs=[model.state])
    report("trunk forward, LoRA r16 on every linear", seconds(lambda: trunk(tokens), args.reps))
    step = compiled_step(model, lambda m, t, k: (forward.hidden_states(m, t) * 1e-3).sum())
    report("trunk forward + backward", seconds(lambda: step(tokens, mask), args.reps))
    step = compiled_step(model, whole_loss)
    report("whole loss forward + backward (no optimizer)",
           seconds(lambda: step(tokens, mask), args.reps))

    # The loss over the vocabulary alone, on the trainer's path (fastmath on the CPU).
    n = args.rows * (args.tokens - 1)
    h = mx.random.normal((n, model.args.hidden_size))
    targets = mx.array(rng.integers(0, vocab, (n,)).astype(np.int32))
    mx.eval(h, targets)
    loss = forward._fast_cross_entropy_with_gradient(model, forward.FAST_CHUNK)
    loss_grad = mx.compile(mx.grad(lambda x: loss(x, targets).sum()))
    report(f"loss over the vocabulary, {n} positions, forward + backward",
           seconds(lambda: loss_grad(h), args.reps))
    head = model.model.embed_tokens.weight if not hasattr(model, "lm_head") \
        else model.lm_head.weight

    def two_head_matmuls(x):
        outs, previous = [], None
        for a in range(0, n, forward.FAST_CHUNK):
            xc = forward._after(x[a:a + forward.FAST_CHUNK], previous)
            previous = ((xc @ head.T) @ head)[:, 0]
            outs.append(previous)
        return mx.concatenate(outs)

    matmuls = mx.compile(two_head_matmuls)
    report(f"  of it: the two head matmuls in chunks of {forward.FAST_CHUNK}",
           seconds(lambda: matmuls(h), args.reps))

    # A new batch shape: traced, compiled and run for the first time.
    first, repeat = [], []
    for length in (args.tokens + 8, args.tokens + 16):
        t, m = batch(length)
        start = time.perf_counter()
        mx.eval(step(t, m))
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        mx.eval(step(t, m))
        repeat.append(time.perf_counter() - start)
    report("a new batch shape, first call", first)
    report("  the same shapes, second call", repeat)

    if args.ab_addmm:
        with_addmm = adapters.LoRALinear._with

        def with_add(self, x, xa, b):
            return self.linear(x) + (self.scale * (xa @ b)).astype(x.dtype)

        steps = {}
        for name, fn in (("addmm", with_addmm), ("add", with_add)):
            adapters.LoRALinear._with = fn
            steps[name] = compiled_step(model, whole_loss)
            mx.eval(steps[name](tokens, mask))  # traced with this version
        adapters.LoRALinear._with = with_addmm
        times = {name: [] for name in steps}
        for _ in range(args.ab_addmm):
            for name, g in steps.items():
                start = time.perf_counter()
                mx.eval(g(tokens, mask))
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            report(f"whole loss, LoRA update with {name}", ts)
        diffs = [a - b for a, b in zip(times["addmm"], times["add"])]
        print(f"addmm - add, per pair: median {statistics.median(diffs):+.2f} s", flush=True)


if __name__ == "__main__":
    main()
