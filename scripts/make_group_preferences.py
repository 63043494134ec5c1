"""On-policy preference pairs from a GRPO config: sample a group, best against worst.

    python scripts/make_group_preferences.py --config configs/quickstart-grpo.yaml \
        --group 4 --train 320 --valid 48 --set objective.max_completion_tokens=64 \
        --out data/quickstart/preferences-group

Reads a grpo run's config for the model, the adapter it starts from (model.adapter: the
SFT run's adapter), the data and its split, the sampling (group_size or --group,
temperature, top_p, max_completion_tokens) and the rewards. For `--train` prompts of the
train split and `--valid` of the valid split (drawn at random with train.seed), it samples
group_size completions of each from the SFT model, as a GRPO rollout does
(mlxtune.decode), and scores them as it does (rollout.score) with objective.rewards
against the prompt's reference. A group whose best total reward beats its worst gives one
pair: chosen = the best completion, rejected = the worst (ties: the first sampled); a
group without a spread gives none. Both answers are the model's own: the pair says what
the rewards prefer among things the policy writes, not about answers it would never write
(the written pairs' weakness: README, "The quickstart's DPO"). The test split is never
read.

Writes OUT-train.jsonl and OUT-valid.jsonl (prompt, chosen, rejected as conversations;
the record's other keys, e.g. "user"; and "rewards": the two totals), and OUT-heldout.jsonl:
the config's test split of its data as it is (the requests a DPO run on these pairs is
measured on: `mlxtune eval RUN --data OUT-heldout.jsonl`; a run on explicit train / valid
files has no split rule of its own to find them with). Atomically; progress and a summary
go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS_PER_DECODE = 16  # prompts x group_size rows decoded together


def pick_pairs(totals, group: int) -> list[tuple[int, int] | None]:
    """Per group of `group` consecutive totals: (best, worst) indices, or None when every
    completion scored the same."""
    out = []
    for g in range(len(totals) // group):
        scores = list(totals[g * group:(g + 1) * group])
        best = max(range(group), key=lambda i: (scores[i], -i))
        worst = min(range(group), key=lambda i: (scores[i], i))
        out.append((g * group + best, g * group + worst) if scores[best] > scores[worst]
                   else None)
    return out


def _write(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; this is data
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="a grpo run's config")
    p.add_argument("--train", type=int, default=320, help="train prompts to sample")
    p.add_argument("--valid", type=int, default=48, help="valid prompts to sample")
    p.add_argument("--out", required=True, type=Path,
                   help="prefix: writes OUT-train.jsonl and OUT-valid.jsonl")
    p.add_argument("--group", type=int, default=None,
                   help="completions per prompt (default: objective.group_size)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, as mlxtune run --set")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args()

    import numpy as np

    from mlxtune import adapters, backend, config, data, models
    from mlxtune.errors import MlxtuneError
    from mlxtune.evaluate import generate, stop_ids
    from mlxtune.objectives import rewards as grpo_rewards
    from mlxtune.objectives import rollout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    outs = {s: args.out.with_name(f"{args.out.name}-{s}.jsonl")
            for s in ("train", "valid", "heldout")}
    try:
        for path in outs.values():
            if path.exists() and not args.force:
                raise MlxtuneError(f"{path}: exists; pass --force to replace it")
        cfg = config.load(args.config, args.overrides)
        o = cfg.objective
        group = args.group or o.group_size
        if group < 2:
            raise MlxtuneError(f"--group: {group}; a pair needs at least two completions")
        if o.type != "grpo":
            raise MlxtuneError(f"{args.config}: objective.type is {o.type}; this script "
                               "samples and scores as a grpo config says")
        if not cfg.model.adapter:
            raise MlxtuneError(f"{args.config}: model.adapter is not set; the pairs come "
                               "from the SFT adapter the preference run starts from")
        rewards = grpo_rewards.build(o.rewards, cfg.source)
        splits, fmt = data.load_splits(cfg.data, cfg.train.seed, prompts=True)
        loaded = models.load(cfg.model)
        model, tok = loaded.model, loaded.tokenizer
        dtype = backend.compute_dtype(cfg.model.dtype)
        if generate.should_densify(model, o.dense_base, dtype):
            generate.densify(model, dtype)
        adapters.load(model, Path(cfg.model.adapter))
        model.eval()
        stops = stop_ids(tok)
        rng = np.random.default_rng(cfg.train.seed)
        written = {}
        for split, wanted in (("train", args.train), ("valid", args.valid)):
            enc = rollout.encode_prompts(splits[split], fmt, tok, cfg.data.max_seq_len,
                                         o.max_completion_tokens)
            items = [enc.examples[i] for i in
                     rng.permutation(len(enc.examples))[:wanted]]
            if any(it.reference is None for it in items):
                raise MlxtuneError(f"{args.config}: {split} has prompts without a reference "
                                   "answer; the rewards compare with it")
            rows, start, tokens = [], time.perf_counter(), 0
            for k in range(0, len(items), PROMPTS_PER_DECODE):
                part = items[k:k + PROMPTS_PER_DECODE]
                gens = rollout.sample(model, [it.tokens for it in part], group, stops,
                                      o.max_completion_tokens, o.temperature, o.top_p,
                                      seed=cfg.train.seed + k + (0 if split == "train" else 10**6))
                owner, texts, _, total = rollout.score(tok, rewards, part, gens, group)
                for pair in pick_pairs(total, group):
                    if pair is None:
                        continue
                    best, worst = pair
                    it = owner[best]
                    rows.append({"prompt": it.prompt,
                                 "chosen": [{"role": "assistant", "content": texts[best]}],
                                 "rejected": [{"role": "assistant", "content": texts[worst]}],
                                 **{c: v for c, v in it.columns.items()
                                    if c not in ("prompt", "chosen", "rejected")},
                                 "rewards": [float(total[best]), float(total[worst])]})
                tokens += sum(len(g.tokens) for g in gens)
                done = k + len(part)
                rate = tokens / (time.perf_counter() - start)
                log(f"  {split}: sampled {done}/{len(items)} prompts x {group} "
                    f"({rate:.0f} tokens/s), {len(rows)} pairs")
            written[split] = (rows, len(items))
        for split, (rows, _) in written.items():
            _write(outs[split], rows)
        _write(outs["heldout"], [r.data for r in splits["test"]])
    except MlxtuneError as e:
        log(f"error: {e}")
        return 2
    for split, (rows, n) in written.items():
        log(f"{outs[split]}: {len(rows)} pairs from {n} prompts ({n - len(rows)} groups "
            "without a spread)")
    log(f"{outs['heldout']}: the {len(splits['test'])} test requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
