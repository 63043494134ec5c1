#!/usr/bin/env python
"""A GRPO step's peak memory against an SFT step's over the same tokens (issue 23).

Runs the quickstart's GRPO from the packaged SmolLM2 (rollouts of --batch prompts x
--group completions of at most --completion tokens, json_valid reward, --steps steps),
then trains SFT on exactly the rows GRPO trained on (each row of the saved rollouts
decoded back to text: prompt and completion, as `text` records), with batch = prompts x
group, each batch one row per example, and prints the largest `peak_memory_gb` of each
run's train events (MLX's peak since the model was loaded: GRPO's includes its rollouts)
and their ratio. Both runs hold one copy of the base (GRPO's beta is 0, as TRL's default).
Also prints the planner's peak for the GRPO run, its rows planned at the longest row it
trained on (`grpo_planned_gb`), and whether the step computed each prompt once per group
(`shared_prompts`, the planner's view; the rollout files hold the prompts apart then).

    .venv/bin/python scripts/bench_grpo_memory.py [--batch 2 --group 8 --completion 64]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlxtune  # noqa: E402,F401  (OpenBLAS and malloc settings before mlx.core)


def _peaks(run_dir: Path) -> list[float]:
    from mlxtune.train.events import read_events

    return [e["peak_memory_gb"] for e in read_events(run_dir) if e["event"] == "train"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--dense-base", choices=("auto", "true", "false"), default="auto",
                    help="GRPO's objective.dense_base (auto: the packaged 4-bit base is "
                         "dequantized once on the CPU profile; SFT keeps it quantized)")
    args = ap.parse_args(argv)

    import numpy as np

    from mlxtune import config
    from mlxtune.models import load
    from mlxtune.run import run

    work = args.work or Path(tempfile.mkdtemp(prefix="grpo-memory-"))
    data = ROOT / "data" / "quickstart" / "tasks.jsonl"
    common = {"model": {"path": "smollm2-135m-instruct"}, "adapter": {"rank": 8, "alpha": 16},
              "eval": {"auto": False}}
    grpo = config.from_dict({
        **common, "name": "grpo-memory",
        "data": {"path": str(data), "split": {"by": "user", "valid": 0.1, "test": 0.1},
                 "max_seq_len": 256},
        "objective": {"type": "grpo", "group_size": args.group, "temperature": 1.0,
                      "max_completion_tokens": args.completion, "beta": 0.0,
                      "rewards": [{"name": "json_valid"}],
                      "dense_base": {"auto": "auto", "true": True,
                                     "false": False}[args.dense_base]},
        "train": {"iters": args.steps, "batch_size": args.batch, "eval_every": 0,
                  "save_every": 0, "log_every": 1, "seed": 0}})
    grpo_dir = work / "grpo"
    if not _peaks(grpo_dir) if grpo_dir.exists() else True:  # --work: measured already
        grpo_dir, _ = run(grpo, grpo_dir, quiet=True, evaluate=False, memory_check=False)

    # The rows GRPO trained on, decoded back to text: a micro-batch's arrays are tokens,
    # mask, advantages, and with shared prompts (objectives.grpo) the prompts (less their
    # last token) and their lengths, the rows then starting at the prompt's last token.
    tokenizer = load(grpo.model).tokenizer
    texts, width = [], 0
    for f in sorted((grpo_dir / "rollouts").glob("*.npz")):
        outer = np.load(f)
        inner = np.load(io.BytesIO(outer["rank0"].tobytes()))
        for m in sorted({k.split("_")[0] for k in inner.files}):
            tokens, mask = inner[f"{m}_a0"], inner[f"{m}_a1"]
            shared = f"{m}_a4" in inner.files
            for i, row in enumerate(tokens):
                end = int(np.nonzero(mask[i])[0].max()) + 1 if mask[i].any() else 1
                ids = [int(t) for t in row[:end]]
                if shared:
                    j = i // args.group
                    ids = [int(t) for t in inner[f"{m}_a3"][j][:inner[f"{m}_a4"][j]]] + ids
                width = max(width, len(ids))
                texts.append(tokenizer.decode(ids))
    sft_data = work / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sft = config.from_dict({
        **common, "name": "sft-memory",
        "data": {"train": str(sft_data), "max_seq_len": width + 32, "packing": False,
                 "group_by_length": True},
        "train": {"iters": args.steps, "batch_size": args.batch * args.group,
                  "eval_every": 0, "save_every": 0, "log_every": 1, "seed": 0}})
    sft_dir, _ = run(sft, work / "sft", quiet=True, evaluate=False, memory_check=False)

    from dataclasses import replace

    from mlxtune import memory

    # The planner's peak for this machine, its rows at the longest row GRPO trained on.
    at_width = replace(grpo, data=replace(grpo.data, max_seq_len=width))
    planned = memory.fit(at_width, memory.tiers_mod.this_machine(),
                         memory.resolve_shape(grpo.model), with_hints=False).breakdown
    g, s = max(_peaks(grpo_dir)), max(_peaks(sft_dir))
    print(json.dumps({"grpo_peak_gb": round(g, 3), "sft_peak_gb": round(s, 3),
                      "ratio": round(g / s, 3), "rows": args.batch * args.group,
                      "grpo_dense_base": args.dense_base,
                      "grpo_planned_gb": round(planned.peak / 1e9, 3),
                      "shared_prompts": planned.workload.shared_prompts,
                      "rollout_width": width, "work": str(work)}))


if __name__ == "__main__":
    main()
