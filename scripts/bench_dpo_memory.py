"""Peak memory of a DPO step against an SFT step over the same sequences.

    python scripts/bench_dpo_memory.py [--config configs/quickstart-dpo.yaml] [--pairs 4]
        [--set KEY=VALUE ...] [--repeat 3] [--json]

Both steps run through the trainer's own code (mlxtune.train.loop.Trainer: its compiled
step, its reference provider), on one fixed batch: the `--pairs` longest pairs of the
config's training data, i.e. 2 x pairs rows (chosen and rejected answers with their
prompts). The SFT step trains on those rows with the loss on the answers; the DPO step
trains on the same rows as pairs, with the reference log-probs computed on the fly (the
default: a reference forward pass per step) or precomputed (looked up). Each mode runs in
a process of its own; the peak (mx.get_peak_memory, reset after loading) is taken over the
first step (compilation included) and over `--repeat` steady steps after it.

The model and adapter are the config's: with model.adapter set, DPO's reference is the base
plus a frozen copy of that adapter (and SFT simply continues it). If the adapter folder is
missing, a fresh adapter is used in both modes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("sft", "dpo", "dpo-precomputed")


def worker(args) -> dict:
    import mlxtune  # noqa: F401  (OpenBLAS before mlx.core)
    import mlx.core as mx

    from mlxtune import adapters, config, data, models
    from mlxtune.data.preference import encode_pairs
    from mlxtune.train.events import EventWriter
    from mlxtune.data.batcher import training_batches
    from mlxtune.train.loop import PAD_MULTIPLE, Trainer
    from mlxtune.train.optim import make_optimizer
    from mlxtune.train.progress import Progress

    sets = list(args.set)
    cfg = config.load(args.config, sets)
    if cfg.model.adapter and not (Path(cfg.model.adapter) / adapters.ADAPTER_FILE).exists():
        cfg.model.adapter = None
    cfg.objective.type = "sft" if args.mode == "sft" else "dpo"
    cfg.objective.precompute_reference = args.mode == "dpo-precomputed"
    cfg.train.batch_size = args.pairs * (2 if args.mode == "sft" else 1)
    # SFT's batch is the pairs' rows, one to a row, padded as DPO's are
    cfg.data.packing, cfg.data.group_by_length = False, True
    splits, fmt = data.load_splits(cfg.data, cfg.train.seed)
    loaded = models.load(cfg.model)
    pairs = encode_pairs(splits["train"], loaded.tokenizer, cfg.data.max_seq_len).pairs
    pairs = sorted(pairs, key=len, reverse=True)[: args.pairs]
    model = loaded.model
    mx.random.seed(cfg.train.seed)
    if cfg.model.adapter:
        adapter_config = adapters.load(model, Path(cfg.model.adapter))
        if args.mode != "sft":
            adapters.freeze_reference(model)
    else:
        adapter_config = adapters.apply_lora(model, cfg.adapter)
    pad_id = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id or 0
    # SFT sees the same rows as examples: every chosen row, then every rejected row.
    train_set = pairs if args.mode != "sft" else [p.chosen for p in pairs] + \
        [p.rejected for p in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, adapter_config, cfg, train_set, [], Path(tmp),
                          EventWriter(Path(tmp), enabled=False), Progress(quiet=True),
                          pad_id=pad_id, batches=training_batches(
                              train_set, args.mode != "sft", cfg.data, cfg.train, pad_id,
                              PAD_MULTIPLE, loaded.config, skips_other_examples=False))
        optimizer = make_optimizer(cfg.train, 100)
        optimizer.init(model.trainable_parameters())
        model.train()
        steps = trainer._build_steps(optimizer)
        if trainer.reference is not None and cfg.objective.precompute_reference:
            trainer.precompute_reference()
        mx.eval(model.parameters())
        resident = mx.get_active_memory()
        out = {"mode": args.mode, "rows": 2 * len(pairs),
               "row_tokens": sorted(len(r.tokens) for p in pairs for r in (p.chosen, p.rejected)),
               "resident_gb": resident / 1e9}
        for phase, n in (("first", 1), ("steady", args.repeat)):
            mx.synchronize()
            mx.reset_peak_memory()
            start = time.perf_counter()
            for _ in range(n):
                trainer.pos.batch = 0  # the one fixed batch, every step
                trainer._train_step(*steps)
            mx.synchronize()
            out[f"{phase}_peak_gb"] = mx.get_peak_memory() / 1e9
            out[f"{phase}_s_per_step"] = (time.perf_counter() - start) / n
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" /
                                            "quickstart-dpo.yaml"))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # worker process
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--config", args.config,
               "--pairs", str(args.pairs), "--repeat", str(args.repeat)]
        for s in args.set:
            cmd += ["--set", s]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{mode}: {done.stderr.strip().splitlines()[-1]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    sft = results["sft"]
    for mode in MODES[1:]:
        for phase in ("first", "steady"):
            results[mode][f"{phase}_peak_ratio"] = (results[mode][f"{phase}_peak_gb"]
                                                    / sft[f"{phase}_peak_gb"])
            results[mode][f"{phase}_above_resident_ratio"] = (
                (results[mode][f"{phase}_peak_gb"] - results[mode]["resident_gb"])
                / (sft[f"{phase}_peak_gb"] - sft["resident_gb"]))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.pairs} pairs = {sft['rows']} rows of {min(sft['row_tokens'])}-"
          f"{max(sft['row_tokens'])} tokens")
    print("| mode | resident GB | peak GB, first step | peak GB, steady | ratio to SFT "
          "(steady) | above resident, ratio | s/step |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        ratio = r.get("steady_peak_ratio", 1.0)
        above = r.get("steady_above_resident_ratio", 1.0)
        print(f"| {mode} | {r['resident_gb']:.3f} | {r['first_peak_gb']:.3f} | "
              f"{r['steady_peak_gb']:.3f} | {ratio:.3f} | {above:.3f} | "
              f"{r['steady_s_per_step']:.1f} |")


if __name__ == "__main__":
    main()
