#!/usr/bin/env python
"""What an epoch costs in each batch layout, by the model's FLOP count (data.packing.RowCost).

On the benchmark's data (scripts/bench_vs_mlx_lm.py: the chat set of
scripts/make_chat_bench_data.py, SmolLM2-135M's tokenizer and sizes, max_seq_len 1024,
batch 4, rows padded to 32), the FLOPs of one epoch of forward passes through the blocks
(linear layers per position, attention per computed (query, key) pair), relative to the
examples' own FLOPs (each example alone, unpadded), for:

- random batches laid out as a run on the CPU with the native attention lays them out
  (one row of up to 4,096 tokens, attention skipping the other examples' keys);
- random batches in rows of max_seq_len without skipping (Metal, CUDA, no native build);
- length-grouped batches (data.group_by_length: true, packing off);
- packed rows (data.packing: true), with and without skipping;
- random batches padded one example a row (what mlx-lm's mixed batches cost).

    .venv/bin/python scripts/layout_cost.py [--examples 112] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mlxtune  # noqa: E402,F401  (the system OpenBLAS before mlx.core)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=112)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()

    import bench_vs_mlx_lm as bench
    from mlxtune import data as D, models
    from mlxtune.config import ModelConfig
    from mlxtune.data.batcher import MIX_ROW_CAP, Batcher, layer_flops
    from mlxtune.data.packing import RowCost
    from mlxtune.train.loop import PAD_MULTIPLE

    loaded = models.load(ModelConfig(path="smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench.write_data(Path(tmp), args.examples)
        records, fmt = D.read_records(folder / "train.jsonl")
    examples = D.encode(records, loaded.tokenizer, bench.SEQ, True, fmt).examples
    per_token, per_pair = layer_flops(loaded.config)
    own = sum(len(e.tokens) * per_token + len(e.tokens) ** 2 / 2 * per_pair for e in examples)
    skipping, plain = RowCost(per_token, per_pair, True), RowCost(per_token, per_pair)
    wide = min(bench.BATCH * bench.SEQ, MIX_ROW_CAP)
    layouts = {
        "random, one row a batch, attention skipping": ("random", wide, skipping),
        f"random, rows of {bench.SEQ}, no skipping": ("random", bench.SEQ, plain),
        "length-grouped, one example a row": ("by_length", bench.SEQ, plain),
        "packed rows, attention skipping": ("packed", bench.SEQ, skipping),
        "packed rows, no skipping": ("packed", bench.SEQ, plain),
        "random, one example a row (mlx-lm's padding)": ("random", None, plain),
    }
    print(f"{len(examples)} examples, {sum(len(e.tokens) for e in examples)} tokens; "
          f"epoch FLOPs over the examples' own, seeds 0-{args.seeds - 1}:")
    for name, (layout, mix, cost) in layouts.items():
        ratios = []
        for seed in range(args.seeds):
            b = Batcher(examples, bench.BATCH, seed, 0, PAD_MULTIPLE, layout, bench.SEQ,
                        mix_row_len=mix or 0, cost=cost)
            if mix is None:  # every example a row of its own, padded to the batch's longest
                total = sum(cost.of([[i] for i in batch], b.lengths, PAD_MULTIPLE, False)
                            for batch in b.order(0))
            else:
                total = b.epoch_cost()
            ratios.append(total / own)
        print(f"  {name:48s} " + " ".join(f"{r:.4f}" for r in ratios))


if __name__ == "__main__":
    main()
