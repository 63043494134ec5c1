"""Measure a preference-tuned run against the adapter it started from (e.g. DPO vs SFT).

    python scripts/eval_preference.py RUN_DIR [--adapter best|final] [--split test]
        [--prompts RUN|FILE.jsonl ...] [--schema FILE] [--metric FILE.py:function]
        [--examples N] [--out RESULT.json]

One model in memory: the base with the starting adapter (the run's model.adapter) as a
frozen reference copy and the run's adapter as the policy (mlxtune.adapters), so "start"
below is the reference pass and "tuned" the policy.

1. Held-out pairs (the run's data, --split): per pair, the summed answer log-probs under
   both (mlxtune.objectives.reference.score_pairs). Reported:
   - preference accuracy: the tuned model gives the chosen answer a higher log-prob than
     the rejected one (and the same for the starting adapter, as the baseline);
   - reward accuracy: DPO's implicit reward margin (tuned - start on chosen, minus the
     same on rejected) is > 0 (TRL's rewards/accuracies);
   each also per value of the records' "failure" key when they have one.
2. Greedy generations for the prompts of the held-out pairs (their chosen answer as the
   reference) and, with --prompts FILE.jsonl, for the chat records of another file's same
   split (e.g. the SFT data, split as the run's config splits): exact match, JSON valid,
   schema match (--schema), the user metric (--metric), for start and tuned.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlxtune  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlxtune import adapters, backend, data, models
from mlxtune.data.preference import encode_pairs, parts
from mlxtune.evaluate import adapter_dir, generate, load_run_config, stop_ids
from mlxtune.evaluate.metrics import Schema, Scorer, load_metric
from mlxtune.objectives.reference import score_pairs


def render(tokenizer, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def pair_prompts(records) -> tuple[list[list[dict]], list[str]]:
    prompts, refs = [], []
    for r in records:
        prompt, chosen, _, _ = parts(r)
        if isinstance(prompt, str):
            prompt, chosen = [{"role": "user", "content": prompt}], [
                {"role": "assistant", "content": chosen}]
        prompts.append(prompt)
        refs.append(chosen[-1]["content"])
    return prompts, refs


def chat_prompts(path: str, cfg, split: str) -> tuple[list[list[dict]], list[str]]:
    """The chat records of `path`, split as the run's config splits its own data."""
    dcfg = type(cfg.data)(path=path, split=cfg.data.split)
    splits, fmt = data.load_splits(dcfg, cfg.train.seed)
    if fmt != "chat":
        sys.exit(f"{path}: --prompts needs chat records, this file is {fmt} data")
    recs = splits[split]
    return [r.data["messages"][:-1] for r in recs], [r.data["messages"][-1]["content"]
                                                      for r in recs]


def accuracy_table(scores: dict, failures: list[str | None]) -> dict:
    start = scores["reference_chosen"] > scores["reference_rejected"]
    tuned = scores["policy_chosen"] > scores["policy_rejected"]
    reward = (scores["policy_chosen"] - scores["reference_chosen"]) > \
        (scores["policy_rejected"] - scores["reference_rejected"])
    out = {"pairs": len(start), "start_logp_accuracy": float(start.mean()),
           "tuned_logp_accuracy": float(tuned.mean()), "reward_accuracy": float(reward.mean()),
           "start_logps_chosen": float(scores["reference_chosen"].mean()),
           "tuned_logps_chosen": float(scores["policy_chosen"].mean()),
           "by_failure": {}}
    groups = defaultdict(list)
    for i, f in enumerate(failures):
        if f is not None:
            groups[f].append(i)
    for f, idx in sorted(groups.items()):
        out["by_failure"][f] = {"pairs": len(idx), "start": float(start[idx].mean()),
                                "tuned": float(tuned[idx].mean()),
                                "reward": float(reward[idx].mean())}
    return out


def generate_side(model, tok, prompts, scorer, batch_size, max_new) -> tuple[dict, list[str]]:
    ids = [render(tok, p) for p in prompts]
    gens, seconds = generate.greedy(model, ids, stop_ids(tok), max_new, batch_size)
    texts = [tok.decode(g.tokens) for g in gens]
    out = scorer.score(texts)
    out["generation_s"] = seconds
    return out, texts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--adapter", default="best", choices=["best", "final"])
    ap.add_argument("--split", default="test", choices=["test", "valid"])
    ap.add_argument("--prompts", action="append", default=[],
                    help="'run' (the held-out pairs' prompts) or a chat JSONL file; repeatable")
    ap.add_argument("--schema", help="JSON Schema file for schema match")
    ap.add_argument("--metric", help="user metric, file.py:function")
    ap.add_argument("--examples", type=int, default=None, help="generate for the first N only")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    cfg = load_run_config(args.run_dir)
    if not cfg.model.adapter:
        sys.exit(f"{args.run_dir}: the run did not start from an adapter (model.adapter); "
                 "this script compares against that starting adapter")
    which = adapter_dir(args.run_dir, args.adapter)
    splits, fmt = data.load_splits(cfg.data, cfg.train.seed)
    records = splits[args.split]
    loaded = models.load(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    dtype = backend.compute_dtype(cfg.model.dtype)
    if generate.should_densify(model, "auto", dtype):
        generate.densify(model, dtype)
    adapters.load(model, Path(cfg.model.adapter))
    adapters.freeze_reference(model)  # start = the reference pass
    weights = mx.load(str(which / adapters.ADAPTER_FILE))
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    result = {"run_dir": str(args.run_dir), "adapter": str(which),
              "start_adapter": cfg.model.adapter, "split": args.split}

    start = time.perf_counter()
    pairs = encode_pairs(records, tok, cfg.data.max_seq_len).pairs
    scores = score_pairs(model, pairs, _pad_id(tok), batch_size=8, chunk=cfg.train.loss_chunk)
    failures = [r.data.get("failure") for r in records]
    result["pairs"] = accuracy_table(scores, failures)
    log(f"pairs: {len(pairs)} scored in {time.perf_counter() - start:.0f} s")

    schema = Schema(args.schema, "--schema") if args.schema else None
    metric = load_metric(args.metric, "--metric") if args.metric else None
    result["generation"] = {}
    for source in args.prompts or ["run"]:
        prompts, refs = (pair_prompts(records) if source == "run"
                         else chat_prompts(source, cfg, args.split))
        if args.examples is not None:
            prompts, refs = prompts[:args.examples], refs[:args.examples]
        scorer = Scorer(refs, schema, metric)
        sides, samples = {}, {}
        for side in ("start", "tuned"):
            log(f"generating {len(prompts)} answers ({source}, {side}) ...")
            if side == "start":
                with adapters.reference_pass(model):
                    sides[side], samples[side] = generate_side(model, tok, prompts, scorer,
                                                               args.batch_size,
                                                               args.max_new_tokens)
            else:
                sides[side], samples[side] = generate_side(model, tok, prompts, scorer,
                                                           args.batch_size, args.max_new_tokens)
            log(f"  {json.dumps({k: round(v, 4) for k, v in sides[side].items() if isinstance(v, float)})}")
        sides["examples"] = len(prompts)
        sides["schema_failures"] = {
            side: [t for t in samples[side] if schema is not None and not _schema_ok(schema, t)]
            for side in ("start", "tuned")}
        result["generation"][source] = sides
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _schema_ok(schema, text: str) -> bool:
    try:
        return schema.matches(json.loads(text.strip()))
    except ValueError:
        return False


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


if __name__ == "__main__":
    main()
