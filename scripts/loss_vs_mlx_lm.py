#!/usr/bin/env python
"""mlxtune's training step on mlx-lm's own batches and initial adapter: the same loss?

scripts/bench_vs_mlx_lm.py runs each trainer with its own seed, so the two runs differ in
their initial adapters and in the order of their batches. This script removes both: it
builds mlx-lm's LoRA model and batch iterator exactly as `mlx_lm.lora` does for a seed
(mx.random.seed, linear_to_lora_layers, np.random.seed, iterate_batches), then trains
mlxtune's model (its LoRA layers, blockwise attention, vectorised SwiGLU, chunked loss,
objectives.sft) from that initial adapter on those batches, with mlx-lm's loss positions,
for the same steps with Adam. The held-out loss of the result is measured by the same code
as the benchmark's; compare it with mlx-lm's own run of the same seed there.

--order mlxtune keeps mlx-lm's initial adapter but takes mlxtune's own batches for the
seed (random examples, laid out in rows as a run here lays them out; loss on the last
assistant turn, mlx-lm's tokens): what mlxtune's batches alone do to the loss;
--order mlxtune-grouped its length-grouped batches (data.group_by_length: true). mlx-lm
sorts by CacheDataset.itemlen, the length of the raw JSON row (1 for every chat row), so
its batches are runs of consecutive examples in file order, mixed in length
(docs/performance.md).

    .venv/bin/python scripts/loss_vs_mlx_lm.py --examples 112 --steps 24 \
        [--order mlxtune | --order mlxtune-grouped]
"""

from __future__ import annotations

import argparse
import json
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
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import bench_vs_mlx_lm as bench  # noqa: E402


def mlx_lm_start(model_dir: Path, data: Path, seed: int, steps: int):
    """mlx-lm's initial adapter and its first `steps` batches for `seed`, as mlx_lm.lora
    makes them: (adapter weights, [(tokens, mask over tokens)])."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    mx.random.seed(seed)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": bench.RANK, "scale": bench.SCALE,
                                      "dropout": 0.0, "keys": bench.TARGETS})
    initial = dict(tree_flatten(model.trainable_parameters()))
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    np.random.seed(seed)
    batches = iterate_batches(CacheDataset(ChatDataset(rows, tokenizer, mask_prompt=True)),
                              bench.BATCH, bench.SEQ, loop=True)
    out = []
    for _ in range(steps):
        tokens, spans = next(batches)
        # default_loss's targets: tokens offset .. length (1-based steps over the targets).
        i = mx.arange(tokens.shape[1])[None, :]
        out.append((tokens, ((i >= spans[:, 0:1]) & (i <= spans[:, 1:])).astype(mx.float32)))
    return initial, out


def mlxtune_batches(model_dir: Path, data: Path, seed: int, steps: int, grouped: bool):
    """mlxtune's own first `steps` batches for `seed` (mask_history: mlx-lm's tokens), laid
    out as a run on this machine lays them out (data.batcher.training_batches)."""
    import mlx.core as mx

    from mlxtune import attention, config, data as D, models
    from mlxtune.data.batcher import training_batches
    from mlxtune.run import _pad_id
    from mlxtune.train.loop import PAD_MULTIPLE

    cfg = config.from_dict({"model": {"path": str(model_dir)},
                            "data": {"train": str(data / "train.jsonl"), "max_seq_len": bench.SEQ,
                                     "packing": False, "group_by_length": grouped},
                            "train": {"batch_size": bench.BATCH, "seed": seed}})
    loaded = models.load(cfg.model)
    records, fmt = D.read_records(data / "train.jsonl")
    examples = D.encode(records, loaded.tokenizer, bench.SEQ, True, fmt, True).examples
    batcher = training_batches(examples, False, cfg.data, cfg.train, _pad_id(loaded.tokenizer),
                               PAD_MULTIPLE, loaded.config,
                               attention.skips_other_examples(loaded.model, mx.float32))
    order = batcher.order(0)
    return [batcher.arrays(order[i % len(order)]) for i in range(steps)]


def train_mlxtune(model_dir: Path, initial: dict, batches: list, out: Path) -> list[float]:
    from mlxtune import adapters, models, objectives
    from mlxtune.config import AdapterConfig, ModelConfig

    model = models.load(ModelConfig(path=str(model_dir))).model
    adapter_config = adapters.apply_lora(model, AdapterConfig(
        rank=bench.RANK, alpha=bench.RANK * bench.SCALE,
        targets=[t.split(".")[-1] for t in bench.TARGETS]))
    model.load_weights(list(initial.items()), strict=False)
    opt = optim.Adam(learning_rate=bench.LR)

    def loss_fn(m, *arrays):  # tokens, mask (and segments for rows of several examples)
        total, n = objectives.sft(m, *arrays, chunk=2048)
        return total / n

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    def step(*arrays):
        loss, grads = loss_and_grad(model, *arrays)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    losses = []
    for arrays in batches:
        loss = step(*arrays)
        mx.eval(loss, model.state)
        losses.append(loss.item())
    adapters.save(model, adapter_config, out)
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=112)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("mlx-lm", "mlxtune", "mlxtune-grouped"),
                   default="mlx-lm", help="whose batches: mlx-lm's for the seed (default), "
                   "mlxtune's default (random) or its length-grouped ones")
    args = p.parse_args()

    from bench_step import save_base_folders

    with tempfile.TemporaryDirectory(prefix="mlxtune-loss-vs-mlx-lm-") as tmp:
        work = Path(tmp)
        _, dense = save_base_folders(work)
        data = bench.write_data(work, args.examples)
        initial, batches = mlx_lm_start(dense, data, args.seed, args.steps)
        if args.order != "mlx-lm":
            batches = mlxtune_batches(dense, data, args.seed, args.steps,
                                      args.order == "mlxtune-grouped")
        start = time.perf_counter()
        losses = train_mlxtune(dense, initial, batches, work / "adapters")
        held_out = bench.held_out_loss(dense, data, work / "adapters")[1]
    print(f"mlxtune's step from mlx-lm's seed-{args.seed} initial adapter on "
          f"{args.order}'s seed-{args.seed} batches, {args.steps} steps "
          f"({(time.perf_counter() - start) / args.steps:.1f} s/step)")
    print("train losses:", " ".join(f"{x:.4f}" for x in losses))
    print(f"held-out loss (last assistant message): {held_out:.5f}")


if __name__ == "__main__":
    main()
