#!/usr/bin/env python
"""Quality of the 4-bit formats on SmolLM2-135M: reconstruction error and perplexity.

The only SmolLM2 weights to be had here are the packaged Q4_1 GGUF (no hub), so:

1. SmolLM2 as shipped: the linear layers of its 30 blocks requantized from the shipped
   weights (dequantized) to NF4 (double-quantized) and to MLX affine 4-bit (group 64);
   the embeddings stay as shipped (Q8_0, tied output). Reconstruction error is relative
   to the shipped weights, so it measures what requantizing costs on top of Q4_1 (whose
   own row is 0 by construction); perplexity is measured on held-out English text.
2. The same formats on synthetic Gaussian weights with the shapes and per-row scales of
   those layers, where the truth is known, so Q4_1 gets a real row too (quantized with
   gguf-py's Q4_1 quantizer, llama.cpp's reference algorithm).

Held-out text: the GNU GPL v3 (/usr/share/common-licenses/GPL-3 on Debian), not part of
any training split of ours; the model may well have seen it in pretraining, which affects
all rows alike.

    .venv/bin/python scripts/quant_quality.py [--tokens 4096] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxtune  # noqa: E402,F401  (OpenBLAS before mlx.core)

TEXT = Path("/usr/share/common-licenses/GPL-3")


def is_block_linear(path: str, m) -> bool:
    import mlx.nn as nn

    return isinstance(m, nn.Linear) and ".layers." in f".{path}"


def variants():
    """name -> (model, bits per weight of the block linears)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    from mlxtune import quant
    from mlxtune.models import packaged_path
    from mlxtune.models.gguf import load_gguf

    path = packaged_path("smollm2-135m-instruct")

    def fresh(dense: bool):
        model, tokenizer, _ = load_gguf(path)
        return (dequantize_model(model) if dense else model), tokenizer

    shipped, tokenizer = fresh(False)
    nf4, _ = fresh(True)
    quant.quantize_nf4(nf4)
    affine, _ = fresh(True)
    nn.quantize(affine, group_size=64, bits=4, class_predicate=is_block_linear)
    dense, _ = fresh(True)
    out = {"shipped Q4_1": (shipped, 5.0), "NF4 (double quant)": (nf4, 4 + 8 / 64 + 32 / 64 / 256),
           "MLX affine 4-bit g64": (affine, 4 + 32 / 64)}
    for model, _ in list(out.values()) + [(dense, 0)]:
        quant.cast_floats(model, mx.float32)
        quant.use_cpu_path(model)
        mx.eval(model.parameters())
    return out, dense, tokenizer


def block_weights(model) -> dict:
    """Dense float32 weight of every linear layer in the blocks, by path."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxtune.quant import QuantLinear

    out = {}
    for path, m in model.named_modules():
        if ".layers." not in f".{path}":
            continue
        if isinstance(m, QuantLinear):
            out[path] = m.dense_weight()
        elif isinstance(m, nn.QuantizedLinear):
            out[path] = mx.dequantize(m["weight"], m["scales"], m["biases"],
                                      group_size=m.group_size, bits=m.bits)
        elif isinstance(m, nn.Linear):
            out[path] = m.weight
    return out


def relative_error(weights: dict, reference: dict) -> float:
    import mlx.core as mx

    num = den = 0.0
    for k, ref in reference.items():
        num += mx.sum((weights[k] - ref) ** 2).item()
        den += mx.sum(ref ** 2).item()
    return math.sqrt(num / den)


def perplexity(model, ids: list[int], window: int) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = mx.array(ids[start:start + window + 1])[None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1])
        loss = nn.losses.cross_entropy(logits, chunk[:, 1:], reduction="sum")
        total += loss.item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def synthetic(reference: dict, seed: int = 0) -> dict:
    """Relative RMS error of each format on Gaussian weights shaped and scaled like the
    model's block linears (per-row standard deviations of the shipped weights)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    import mlx.core as mx
    from mlxtune.quant import formats

    rng = np.random.default_rng(seed)
    sums = {k: [0.0, 0.0] for k in ("Q4_1", "NF4 (double quant)", "NF4 (float32 absmax)",
                                    "MLX affine 4-bit g64")}
    for name, w in reference.items():
        std = np.array(mx.sqrt(mx.mean(w ** 2, axis=1)))
        truth = (rng.standard_normal(w.shape) * std[:, None]).astype(np.float32)
        p = formats.nf4_quantize(truth)
        blocks = truth.reshape(-1, 64)
        absmax = np.abs(blocks).max(1)
        nearest = np.abs((blocks / absmax[:, None])[..., None] - formats.NF4).argmin(-1)
        q, s, b = mx.quantize(mx.array(truth), group_size=64, bits=4)
        got = {
            "Q4_1": dequantize(quantize(truth, T.Q4_1), T.Q4_1).reshape(truth.shape),
            "NF4 (double quant)": formats.nf4_dequantize(p),
            "NF4 (float32 absmax)": (formats.NF4[nearest] * absmax[:, None]).reshape(truth.shape),
            "MLX affine 4-bit g64": np.array(mx.dequantize(q, s, b, group_size=64, bits=4)),
        }
        for k, v in got.items():
            sums[k][0] += float(((v - truth) ** 2).sum())
            sums[k][1] += float((truth ** 2).sum())
    return {k: math.sqrt(a / b) for k, (a, b) in sums.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not TEXT.exists():
        raise SystemExit(f"{TEXT} not found (Debian's base-files ships it)")

    models, dense, tokenizer = variants()
    ids = tokenizer.encode(TEXT.read_text())[:args.tokens + 1]
    reference = block_weights(dense)
    rows = []
    for name, (model, bpw) in models.items():
        rows.append({"format": name, "bits_per_weight": round(bpw, 3),
                     "rel_error_vs_shipped": round(relative_error(block_weights(model),
                                                                  reference), 4),
                     "perplexity": round(perplexity(model, ids, args.window), 3)})
    synth = synthetic(reference)
    result = {"tokens": len(ids) - 1, "window": args.window, "model": rows,
              "synthetic_rel_error": {k: round(v, 4) for k, v in synth.items()}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"SmolLM2-135M, block linear layers; perplexity on {len(ids) - 1} tokens of "
          f"{TEXT.name} in windows of {args.window}\n")
    print("| format | bits/weight | rel. error vs shipped | perplexity |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['bits_per_weight']} | {r['rel_error_vs_shipped']} | "
              f"{r['perplexity']} |")
    print("\nSynthetic Gaussian weights with the same shapes and row scales:\n")
    print("| format | rel. RMS error |")
    print("|---|---|")
    for k, v in synth.items():
        print(f"| {k} | {v:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
