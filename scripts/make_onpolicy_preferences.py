"""On-policy preference pairs: the rejected answer is what the SFT model actually writes.

    python scripts/make_onpolicy_preferences.py --config configs/quickstart-dpo.yaml \
        --pairs data/quickstart/preferences.jsonl \
        --out data/quickstart/preferences-onpolicy.jsonl

Reads a preference run's config for the model, the adapter it starts from (model.adapter:
the SFT run's adapter) and its split rule (data.split, train.seed). For every pair of
`--pairs` in the training and validation splits, it decodes the prompt greedily with
the SFT model; where that answer is wrong (neither the same text as the chosen answer
nor, when both are JSON, the same JSON value, nor empty), the pair's rejected answer becomes the SFT
model's own answer and its "failure" key "sft_generation". Pairs whose prompt the SFT
model already answers right keep their written rejected answer. Test-split pairs are
copied unchanged and never decoded, so the held-out pairs stay what they were.

Every record keeps its place and its other keys: the split by data.split.by of the new file
is the split of the old one (checked before writing). Synthetic failures that the SFT model
no longer makes teach DPO little; its own mistakes are what the policy should move away
from. The file is written atomically; a summary goes to stderr.
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

CHUNK = 128  # prompts per progress line


def same_answer(a: str, b: str) -> bool:
    """Equal text, or equal JSON values when both parse (key order and spacing aside)."""
    if a.strip() == b.strip():
        return True
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def _answer_text(answer) -> str:
    return answer if isinstance(answer, str) else answer[-1].get("content") or ""


def _with_rejected(record, text: str) -> dict:
    data = dict(record.data)
    if isinstance(data["rejected"], str):
        data["rejected"] = text
    else:
        data["rejected"] = [*data["rejected"][:-1], {"role": "assistant", "content": text}]
    data["failure"] = "sft_generation"
    return data


def decode_all(model, tokenizer, prompts: list[list[int]], max_new: int, batch_size: int,
               log) -> list[str]:
    from mlxtune.evaluate import generate, stop_ids

    stops = stop_ids(tokenizer)
    texts: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), CHUNK):
        gens, _ = generate.greedy(model, prompts[i:i + CHUNK], stops, max_new, batch_size)
        texts += [tokenizer.decode(g.tokens) for g in gens]
        done = len(texts)
        rate = done / (time.perf_counter() - start)
        log(f"  decoded {done}/{len(prompts)} prompts ({rate:.2f}/s, "
            f"~{(len(prompts) - done) / rate / 60:.0f} min left)")
    return texts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path,
                   help="the preference run's config (model, model.adapter, data.split)")
    p.add_argument("--pairs", required=True, type=Path, help="the written preference pairs")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: twice the longest chosen answer plus 16 tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args()

    from mlxtune import adapters, backend, config, models
    from mlxtune.data.records import read_records
    from mlxtune.data.splits import split_records
    from mlxtune.errors import MlxtuneError
    from mlxtune.evaluate import generate, prompt_and_reference

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.out.exists() and not args.force:
            raise MlxtuneError(f"{args.out}: exists; pass --force to replace it")
        cfg = config.load(args.config, [])
        if not cfg.model.adapter:
            raise MlxtuneError(f"{args.config}: model.adapter is not set; on-policy pairs "
                               "come from the SFT adapter the preference run starts from")
        if not cfg.data.split:
            raise MlxtuneError(f"{args.config}: data.split is not set; the pairs are split "
                               "by its rule so that test pairs are left alone")
        records, fmt = read_records(args.pairs)
        if fmt != "preference":
            raise MlxtuneError(f"{args.pairs}: {fmt} data, not preference pairs")
        splits = split_records(records, cfg.data.split, cfg.train.seed, str(args.pairs))
        test_ids = {id(r) for r in splits["test"]}
        todo = [r for r in records if id(r) not in test_ids]

        loaded = models.load(cfg.model)
        model, tok = loaded.model, loaded.tokenizer
        if generate.should_densify(model, "auto", backend.compute_dtype(cfg.model.dtype)):
            generate.densify(model, backend.compute_dtype(cfg.model.dtype))
        adapters.load(model, Path(cfg.model.adapter))
        model.eval()
        prompted = [prompt_and_reference(r, fmt, tok) for r in todo]
        max_new = args.max_new_tokens or 16 + 2 * max(
            len(tok.encode(ref, add_special_tokens=False)) for _, ref, _ in prompted)
        log(f"decoding {len(todo)} train/valid prompts with {cfg.model.adapter} "
            f"(test: {len(splits['test'])} pairs left as written)")
        texts = decode_all(model, tok, [ids for ids, _, _ in prompted], max_new,
                           args.batch_size, log)
    except MlxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    answer_of = {id(r): t for r, t in zip(todo, texts)}
    out, replaced = [], {"train": 0, "valid": 0}
    split_of = {id(r): name for name, rs in splits.items() for r in rs}
    for r in records:
        text = answer_of.get(id(r))
        chosen = _answer_text(r.data["chosen"])
        # An empty answer (EOS first) is no rejected answer: keep the written one.
        if text is None or not text.strip() or same_answer(text, chosen):
            out.append(r.data)
        else:
            out.append(_with_rejected(r, text))
            replaced[split_of[id(r)]] += 1

    # The split of the new file must be the split of the old one (same groups, same order).
    from mlxtune.data.records import Record

    new_splits = split_records([Record(d, r.source) for d, r in zip(out, records)],
                               cfg.data.split, cfg.train.seed, str(args.out))
    if any([x.source for x in new_splits[s]] != [x.source for x in splits[s]]
           for s in splits):
        print("error: the new file would split differently; nothing written", file=sys.stderr)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in out)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a data file like any other
    os.replace(tmp, args.out)
    right = len(todo) - sum(replaced.values())
    log(f"wrote {args.out}: {len(out)} pairs; the SFT model's own wrong answer is the "
        f"rejected one in {replaced['train']} train and {replaced['valid']} valid pairs; "
        f"{right} prompts it answered right keep their written pair; "
        f"{len(splits['test'])} test pairs unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
