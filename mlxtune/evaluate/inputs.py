"""What evaluation reads: the run's config (with eval.* overrides), the adapter to load,
the schema and metric it names, the held-out records (the run's split, or another file's
under the run's split rule) and the train records few-shot examples come from, and each
record's prompt ids and reference answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mlxtune import adapters, config, data
from mlxtune.config import Config
from mlxtune.errors import ConfigError, DataError, ModelError
from mlxtune.evaluate import forgetting
from mlxtune.evaluate.metrics import Schema, load_metric


def load_run_config(run_dir: Path, overrides: dict | None = None) -> Config:
    """The run's resolved config with `eval.*` overrides ({key: value}) applied; None
    values leave the run's setting, except that another data file (`data`) without an
    `examples` override is generated for in full (the run's eval.examples counted its
    own split)."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    # JSON values are YAML, so --set parses each value back exactly.
    overrides = dict(overrides or {})
    if overrides.get("data") and overrides.get("examples") is None:
        overrides["examples"] = "all"
    sets = [f"eval.{k}={json.dumps(None if v == 'all' else v)}"
            for k, v in overrides.items() if v is not None]
    return config.load(path, sets)


def adapter_dir(run_dir: Path, which: str) -> Path:
    """best/ when asked for and present (else the final adapters/), or adapters/."""
    run_dir = Path(run_dir)
    has = {name: (run_dir / name / adapters.ADAPTER_FILE).is_file()
           for name in ("best", "adapters")}
    if which == "best" and has["best"]:
        return run_dir / "best"
    if has["adapters"]:
        return run_dir / "adapters"
    if which == "final" and has["best"]:
        raise ModelError(f"{run_dir}: no final adapter (adapters/{adapters.ADAPTER_FILE}); "
                         "the run did not finish; use --adapter best or resume the run")
    raise ModelError(f"{run_dir}: no adapter to evaluate (neither best/ nor adapters/ holds "
                     f"{adapters.ADAPTER_FILE}); has the run trained and finished?")


def check(cfg: Config) -> tuple[Schema | None, Callable | None]:
    """Load and check the schema file and the user metric the config names (and the
    forgetting check's prompt file, eval.general)."""
    schema = Schema(cfg.eval.schema) if cfg.eval.schema else None
    metric = load_metric(cfg.eval.metric) if cfg.eval.metric else None
    if cfg.eval.forgetting and cfg.eval.general:
        forgetting.load(cfg.eval.general)
    return schema, metric


def held_out(cfg: Config, split: str) -> tuple[list[data.Record], str]:
    """The records to evaluate on and their format: the run's own `split`, or, with
    eval.data, that file's `split` under the run's split rule (all of it when the run
    names its data files instead of splitting one)."""
    return _splits(cfg, split)[:2]


def train_records(cfg: Config) -> tuple[list[data.Record], str]:
    """Where few-shot examples come from: the train split of the data evaluated on (with
    eval.data and a split rule, that file's train split; else the run's own)."""
    if cfg.eval.data and cfg.data.path:
        return _splits(cfg, "train")[:2]
    if cfg.objective.type == "grpo":  # its prompts may lack answers: shots need them
        from mlxtune.data.records import validate
        from mlxtune.datacheck.text import has_answer

        splits, fmt = data.load_splits(cfg.data, cfg.train.seed, prompts=True)
        answered = [(r.data, r.source) for r in splits["train"] if has_answer(r.data, fmt)]
        return (validate(answered)[0], fmt) if answered else ([], fmt)
    splits, fmt = data.load_splits(cfg.data, cfg.train.seed)
    return splits["train"], fmt


def _prompts_have_answers(cfg: Config, split: str) -> None:
    """A grpo run reads prompts, answers optional: evaluation compares with answers, so
    held-out prompts without one are refused in one line that says why."""
    from mlxtune.data.records import read_records
    from mlxtune.data.splits import split_records
    from mlxtune.datacheck.text import has_answer

    if cfg.eval.data:
        records, fmt = read_records(cfg.eval.data, prompts=True)
        if cfg.data.path:
            records = split_records(records, cfg.data.split, cfg.train.seed,
                                    cfg.eval.data)[split]
    else:
        splits, fmt = data.load_splits(cfg.data, cfg.train.seed, prompts=True)
        records = splits[split]
    missing = [r for r in records if not has_answer(r.data, fmt)]
    if missing:
        raise DataError(f"{missing[0].source}: cannot measure loss or answer metrics: "
                        f"{len(missing)} of the {len(records)} {split} prompts of this grpo "
                        "run have no reference answer to compare with (prompt-only records); "
                        "give them their answers, or evaluate a file that has them (--data)")


def _splits(cfg: Config, split: str) -> tuple[list[data.Record], str]:
    if cfg.objective.type == "grpo":
        _prompts_have_answers(cfg, split)
    if cfg.eval.data:
        from mlxtune.data.records import read_records
        from mlxtune.data.splits import split_records

        records, fmt = read_records(cfg.eval.data)
        if cfg.data.path:
            records = split_records(records, cfg.data.split, cfg.train.seed,
                                    cfg.eval.data)[split]
        if not records:
            raise DataError(f"{cfg.eval.data}: its {split} split under this run's data.split "
                            "is empty; evaluate another split with --split")
        return records, fmt
    splits, fmt = data.load_splits(cfg.data, cfg.train.seed)
    records = splits[split]
    if not records:
        how = (f"data.split.{split} is 0" if cfg.data.path else f"data.{split} is not set")
        raise DataError(f"{cfg.source}: the {split} split is empty ({how}); give the run a "
                        f"{split} split, or evaluate another with --split")
    return records, fmt


# ----------------------------------------------------------------------------- prompts


def _render(tokenizer, messages: list[dict], tools) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_and_reference(record: data.Record, fmt: str, tokenizer) -> tuple | None:
    """(prompt ids, reference text, prompt text to show) for a record; None for text data,
    which has no prompt to answer."""
    d = record.data
    if fmt == "text":
        return None
    if fmt == "preference":  # the prompt of the pair; its chosen answer is the reference
        from mlxtune.data.preference import parts

        prompt, chosen, _, tools = parts(record)
        if isinstance(prompt, str):
            d = {"prompt": prompt, "completion": chosen}
            fmt = "completions"
        else:
            d = {"messages": prompt + chosen[-1:], "tools": tools}
    if fmt == "completions":
        if _has_template(tokenizer):
            ids = _render(tokenizer, [{"role": "user", "content": d["prompt"]}], None)
        else:
            ids = list(tokenizer.encode(d["prompt"], add_special_tokens=True))
        return ids, d["completion"], d["prompt"]
    messages = d["messages"]
    try:
        ids = _render(tokenizer, messages[:-1], d.get("tools") or None)
    except Exception as e:  # jinja refuses some conversations
        raise DataError(f"{record.source}: the chat template cannot render this prompt: "
                        f"{e}") from None
    shown = next((m.get("content") or "" for m in reversed(messages[:-1])
                  if m["role"] != "assistant"), "")
    return ids, messages[-1].get("content") or "", shown


def _has_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    return bool(flag) if flag is not None else bool(getattr(tokenizer, "chat_template", None))
