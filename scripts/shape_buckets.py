#!/usr/bin/env python
"""What data.shape_buckets costs and saves: the training batches' shapes and padding, and
the compiled step's tracing and compiling against its running, on a run's own batches.

`layout`: the run's batches as `mlxtune run` lays them out (its data, split, encoding,
layout and seed; only the model's config and attention path are needed), for each
data.shape_buckets value given: the distinct step shapes (rows, width, segment ids or
not) over the batches the run takes, the padding (padded tokens / real tokens) and the
model FLOPs of the padded batches against those of buckets 0.

`time`: the first N batches of the run's order, each through the trainer's compiled
loss-and-gradient step (no optimizer update): the call, which traces and compiles the
step for a shape it has not seen (and only builds the graph for one it has), and the
evaluation, timed apart; the sum of the calls at new shapes is the run's compile cost.
`--no-run` skips the evaluation (tracing and compiling cost the same; useful under
MLXTUNE_PROFILE=gpu, whose bfloat16 steps crawl on a CPU).

CONFIG may be `chat-bench`: docs/performance.md's benchmark (SmolLM2-135M dense float32,
scripts/make_chat_bench_data.py's data, max_seq_len 1,024, batch 4, rank-16 LoRA).

    .venv/bin/python scripts/shape_buckets.py layout configs/quickstart.yaml --buckets 0 4 8
    .venv/bin/python scripts/shape_buckets.py layout chat-bench --buckets 0 4 8 --examples 600
    .venv/bin/python scripts/shape_buckets.py time chat-bench --buckets 0 --batches 12
    MLXTUNE_PROFILE=gpu .venv/bin/python scripts/shape_buckets.py time chat-bench --no-run
"""

from __future__ import annotations

import argparse
import subprocess
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
import yaml  # noqa: E402

from mlxtune import adapters, attention, backend, config, data, forward, models, objectives  # noqa: E402,E501
from mlxtune.data.batcher import training_batches  # noqa: E402
from mlxtune.train.loop import PAD_MULTIPLE, total_steps  # noqa: E402


def chat_bench_config(work: Path, examples: int, seed: int) -> Path:
    """docs/performance.md's setting as a config in `work`."""
    from bench_step import save_base_folders

    _, dense = save_base_folders(work)
    subprocess.run([sys.executable, str(ROOT / "scripts/make_chat_bench_data.py"),
                    str(work / "chat.jsonl"), "--n", str(examples), "--seed", str(seed)],
                   check=True, stdout=subprocess.DEVNULL)
    cfg = {"name": "chat-bench", "model": {"path": str(dense)},
           "adapter": {"rank": 16, "alpha": 32},
           "data": {"train": "chat.jsonl", "max_seq_len": 1024},
           "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-4, "seed": seed,
                     "eval_every": 0}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Setting:
    """A config's model, training examples and attention path, as `mlxtune run` has them."""

    def __init__(self, path: str, sets: list[str], weights: bool):
        self.cfg = config.load(path, sets)
        cfg = self.cfg
        splits, fmt = data.load_splits(cfg.data, cfg.train.seed)
        if fmt == "preference" or cfg.objective.type == "grpo":
            sys.exit("shape_buckets.py: SFT data only (pairs and rollouts are laid out "
                     "elsewhere)")
        self.loaded = models.load(cfg.model)
        tok = self.loaded.tokenizer
        self.examples = data.encode(splits["train"], tok, cfg.data.max_seq_len,
                                    cfg.data.mask_prompt, fmt, cfg.data.mask_history).examples
        self.pad_id = tok.pad_token_id if isinstance(tok.pad_token_id, int) else (
            tok.eos_token_id or 0)
        self.skips = attention.skips_other_examples(
            self.loaded.model, backend.compute_dtype(cfg.model.dtype))
        if not weights:
            del self.loaded.model
        elif cfg.model.adapter:
            adapters.load(self.loaded.model, Path(cfg.model.adapter))
        else:
            adapters.apply_lora(self.loaded.model, cfg.adapter)

    def batches(self, buckets: int):
        self.cfg.data.shape_buckets = buckets
        return training_batches(self.examples, False, self.cfg.data, self.cfg.train,
                                self.pad_id, PAD_MULTIPLE, self.loaded.config, self.skips)

    def run_batches(self, batcher) -> list:
        """The batches the run takes, in order (every epoch it needs)."""
        n = total_steps(self.cfg, batcher.batches_per_epoch()) * self.cfg.train.grad_accumulation
        out, epoch = [], 0
        while len(out) < n:
            out += batcher.order(epoch)[: n - len(out)]
            epoch += 1
        return out


def layout(s: Setting, buckets_list: list[int]) -> None:
    cfg = s.cfg
    lengths = [len(e.tokens) for e in s.examples]
    print(f"{len(s.examples)} examples, {sum(lengths):,} tokens (mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)}); batch {cfg.train.batch_size}, max_seq_len "
          f"{cfg.data.max_seq_len}; attention skips other examples' keys: {s.skips}")
    base_cost = None
    for b in buckets_list:
        batcher = s.batches(b)
        order = s.run_batches(batcher)
        shapes, real, padded, cost, first_new = [], 0, 0, 0.0, []
        seen = set()
        for i, batch in enumerate(order):
            shape = batcher.shape(batch)
            if shape not in seen:
                seen.add(shape)
                first_new.append(i)
            shapes.append(shape)
            real += sum(lengths[j] for row in (batch if batcher.packed else [batch])
                        for j in row)
            padded += shape[0] * shape[1]
            rows, segmented = batcher.rows(batch)
            cost += batcher.cost.of(rows, lengths, batcher.row_widths(segmented), segmented)
        base_cost = base_cost or cost
        widths = sorted({w for _, w, _ in shapes})
        rows = sorted({r for r, _, _ in shapes})
        new_by = {k: sum(1 for i in first_new if i < k) for k in (24, 100) if k < len(order)}
        print(f"shape_buckets {b}: layout {batcher.layout}, {len(order)} batches, "
              f"{len(seen)} distinct shapes ({len(widths)} widths {widths[0]}-{widths[-1]}, "
              f"rows {rows}); padding {padded - real:,} of {padded:,} tokens = "
              f"{(padded - real) / real:.1%} of the real tokens; model FLOPs x"
              f"{cost / base_cost:.3f} of the first setting's; new shapes by batch "
              + ", ".join(f"{k}: {v}" for k, v in new_by.items()))


def time_steps(s: Setting, buckets: int, n: int, run: bool) -> None:
    cfg, model = s.cfg, s.loaded.model
    model.train()
    loss_and_grad = nn.value_and_grad(model, forward.for_gradient(objectives.build(cfg)))
    step = mx.compile(lambda *b: loss_and_grad(model, *b), inputs=[model.state],
                      outputs=[model.state])
    batcher = s.batches(buckets)
    order = s.run_batches(batcher)[:n]
    seen: set = set()
    traced_new = traced_old = ran = 0.0
    print(f"shape_buckets {buckets}, {backend.profile()} profile, "
          f"{backend.dtype_name(backend.compute_dtype(cfg.model.dtype))}, layout "
          f"{batcher.layout}: {len(order)} batches", flush=True)
    for i, batch in enumerate(order):
        arrays = batcher.arrays(batch)
        shape = (*arrays[0].shape, len(arrays) == 3)
        new = shape not in seen
        seen.add(shape)
        start = time.perf_counter()
        out = step(*arrays)  # traces and compiles at a new shape; builds the graph
        traced = time.perf_counter() - start
        if run:
            start = time.perf_counter()
            mx.eval(out)
            evaluated = time.perf_counter() - start
        else:
            evaluated = 0.0
        del out
        if new:
            traced_new += traced
        else:
            traced_old += traced
        ran += evaluated
        print(f"  batch {i + 1}: {shape[0]} x {shape[1]}{' segments' if shape[2] else ''}"
              f"{'  new' if new else '     '}  call {traced:6.2f} s"
              + (f"  run {evaluated:6.2f} s" if run else ""), flush=True)
    total = traced_new + traced_old + ran
    print(f"shape_buckets {buckets}: {len(seen)} shapes in {len(order)} batches; tracing and "
          f"compiling {traced_new:.1f} s ({traced_new / len(seen):.2f} s a new shape), calls "
          f"at seen shapes {traced_old:.2f} s"
          + (f", running {ran:.1f} s: compiling is {traced_new / total:.1%} of the "
             f"{total:.1f} s" if run else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["layout", "time"])
    p.add_argument("config", metavar="CONFIG", help="a config file, or chat-bench")
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 8])
    p.add_argument("--batches", type=int, default=12, help="time: the run's first N batches")
    p.add_argument("--no-run", action="store_true", help="time: trace and compile only")
    p.add_argument("--examples", type=int, default=96, help="chat-bench: examples")
    p.add_argument("--seed", type=int, default=0, help="chat-bench: data seed")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = (chat_bench_config(Path(tmp), args.examples, args.seed)
                if args.config == "chat-bench" else args.config)
        s = Setting(str(path), args.sets, weights=args.what == "time")
        if args.what == "layout":
            layout(s, args.buckets)
        else:
            for b in args.buckets:
                time_steps(s, b, args.batches, not args.no_run)


if __name__ == "__main__":
    main()
