"""GRPO's verifiable rewards: a weighted list of functions of the completions.

`objective.rewards` lists the entries, each `{name: BUILT_IN, weight: w, ...}` or
`{function: path/to/file.py:fn, weight: w}`. Every function scores a whole rollout batch
at once, TRL's signature:

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

`prompts` and `completions` are strings for prompt/completion data and, as in TRL, message
lists for chat data (the conversation before its last assistant turn; the completion as
`[{"role": "assistant", "content": text}]`); `columns` are the record's other keys (one
list each, one value per completion) plus `reference`: the answer the data holds (the last
assistant turn, or the completion), None when there is none. A None entry means "does not
apply": it counts as NaN and is left out of the weighted sum (TRL's nansum), so a
completion whose every reward is None scores 0.

Built in (each a number per completion; the reference and the completion are compared
after stripping surrounding whitespace):
- `json_valid`: 1 when the whole completion parses as JSON, else 0.
- `json_schema` (`schema: file.json`): 1 when it parses and validates against the JSON
  Schema file (formats checked, as `mlxtune eval`'s schema match), else 0.
- `field_match`: the share of the reference JSON object's top-level fields that the
  completion (a JSON object) has with an equal value; 0 for invalid JSON; None where the
  reference is not a JSON object. `lists: jaccard` gives a list field partial credit: the
  Jaccard index of the two lists' items taken as sets (1 for two empty lists), where the
  default (`lists: exact`) credits a list only when it equals the reference: one item
  wrong or missing scores as the empty list does.
- `exact_match`: 1 when completion and reference are equal after normalising (case folded,
  runs of whitespace as one space, stripped), else 0; None without a reference.
  These two need reference answers: a run whose prompts have none (prompt-only records) is
  refused before it starts, with one line naming the reward.
- `regex` (`pattern: ...`): 1 when the pattern matches somewhere in the completion
  (`re.search`; anchor it with ^...$ for the whole text), else 0.
- `length` (`target: N`): 0 up to N completion tokens, then -(n - N) / N: a penalty that
  grows with each token past the target.

A function that raises, returns something other than a list of numbers / None, or a list
of the wrong length stops the run with one line naming the entry (`RewardError`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from mlxtune.errors import ConfigError, TrainingStopped

BUILT_IN = ("json_valid", "json_schema", "field_match", "exact_match", "regex", "length")
# The keys each built-in needs (beyond name and weight), and those it may take.
NEEDS = {"json_schema": "schema", "regex": "pattern", "length": "target"}
OPTIONAL = {"field_match": "lists"}
LIST_CREDIT = ("exact", "jaccard")


class RewardError(TrainingStopped):
    """A reward function failed: the message names it; the run stops."""


# ----------------------------------------------------------------------------- helpers


def text_of(completion) -> str:
    """A completion as text: a string, or TRL's conversational [{"role", "content"}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


_INVALID = object()


def _parse(text):
    if text is None:
        return _INVALID
    try:
        return json.loads(text.strip())
    except ValueError:
        return _INVALID


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


# ----------------------------------------------------------------------------- built-ins


def json_valid(prompts, completions, **_):
    return [float(_parse(text_of(c)) is not _INVALID) for c in completions]


def json_schema(prompts, completions, *, schema, **_):
    out = []
    for c in completions:
        value = _parse(text_of(c))
        out.append(float(value is not _INVALID and schema.matches(value)))
    return out


def field_match(prompts, completions, reference=None, *, lists="exact", **_):
    refs = reference if reference is not None else [None] * len(completions)
    credit = _list_credit if lists == "jaccard" else _equal
    out = []
    for c, r in zip(completions, refs):
        ref = _parse(r)
        if not isinstance(ref, dict) or not ref:
            out.append(None)
            continue
        got = _parse(text_of(c))
        if not isinstance(got, dict):
            out.append(0.0)
            continue
        same = sum(credit(got[k], v) for k, v in ref.items() if k in got)
        out.append(same / len(ref))
    return out


def _list_credit(a, b) -> float:
    """Jaccard index of two lists' items (as sets) where both are lists, else equality."""
    if not (isinstance(a, list) and isinstance(b, list)):
        return float(_equal(a, b))
    if _equal(a, b):
        return 1.0
    # Items compared by their JSON text: unhashable items (objects, lists) count too.
    sa = {json.dumps(x, sort_keys=True) for x in a}
    sb = {json.dumps(x, sort_keys=True) for x in b}
    return len(sa & sb) / len(sa | sb)


def _equal(a, b) -> bool:
    """JSON equality (True is not 1, 1 is 1.0)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def exact_match(prompts, completions, reference=None, **_):
    refs = reference if reference is not None else [None] * len(completions)
    return [None if r is None else float(normalise(text_of(c)) == normalise(str(r)))
            for c, r in zip(completions, refs)]


def regex(prompts, completions, *, pattern, **_):
    return [float(pattern.search(text_of(c)) is not None) for c in completions]


def length(prompts, completions, *, target, completion_ids, **_):
    return [-max(0, len(ids) - target) / target for ids in completion_ids]


FUNCTIONS = {"json_valid": json_valid, "json_schema": json_schema, "field_match": field_match,
             "exact_match": exact_match, "regex": regex, "length": length}
# The built-ins that compare with the data's reference answer: a run whose prompts have
# none (prompt-only records) is refused before it starts (grpo_loop.check).
NEEDS_REFERENCE = (field_match, exact_match)


# ----------------------------------------------------------------------------- the list


@dataclass
class Reward:
    name: str        # the metric's name: rewards/<name>/mean
    label: str       # what an error message calls it: objective.rewards[i] (...)
    fn: callable
    weight: float
    options: dict


class Rewards:
    """objective.rewards, loaded: call it on a rollout batch for its [N, R] reward matrix
    (NaN where a function returned None) and the weighted sum per completion [N]."""

    def __init__(self, entries: list[Reward]):
        self.entries = entries
        self.names = [e.name for e in entries]
        self.weights = np.array([e.weight for e in entries], dtype=np.float64)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
        n = len(completions)
        table = np.zeros((n, len(self.entries)), dtype=np.float64)
        for j, e in enumerate(self.entries):
            try:
                got = e.fn(prompts=prompts, completions=completions,
                           completion_ids=completion_ids, **columns, **e.options)
            except Exception as ex:  # noqa: BLE001  (named and stopped, one line)
                raise RewardError(f"{e.label}: raised {type(ex).__name__}: {ex}") from None
            table[:, j] = _check_values(got, n, e.label)
        total = np.nansum(table * self.weights, axis=1)
        return table, total


def _check_values(got, n: int, label: str) -> np.ndarray:
    if isinstance(got, np.ndarray):
        got = got.tolist()
    if not isinstance(got, (list, tuple)):
        raise RewardError(f"{label}: returned {type(got).__name__}, expected a list of "
                          f"{n} floats (or None)")
    if len(got) != n:
        raise RewardError(f"{label}: returned {len(got)} values for {n} completions")
    out = np.empty(n, dtype=np.float64)
    for i, v in enumerate(got):
        if v is None:
            out[i] = math.nan
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{label}: value {i} is {v!r}, not a number or None") from None
    return out


def check(specs: list, where: str = "<config>") -> None:
    """The entries' shape, without loading files (config.py calls it before paths are
    resolved): one ConfigError naming the key."""
    for i, spec in enumerate(specs):
        key = f"objective.rewards[{i}]"
        name, function = spec.name, spec.function
        if bool(name) == bool(function):
            raise ConfigError(f"{where}: {key}: give either name (a built-in reward: "
                              f"{', '.join(BUILT_IN)}) or function (file.py:function)")
        if not math.isfinite(spec.weight):
            raise ConfigError(f"{where}: {key}.weight: must be a finite number")
        if function:
            module, sep, func = str(function).rpartition(":")
            if not sep or not module or not func:
                raise ConfigError(f"{where}: {key}.function: {function!r}: expected "
                                  "file.py:function or module:function")
            extra = [k for k in (*NEEDS.values(), *OPTIONAL.values())
                     if getattr(spec, k) is not None]
            if extra:
                raise ConfigError(f"{where}: {key}.{extra[0]}: a function reward takes no "
                                  f"{extra[0]}")
            continue
        if name not in BUILT_IN:
            close = difflib.get_close_matches(str(name), BUILT_IN, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: {key}.name: unknown reward {name!r}{hint}; built "
                              f"in: {', '.join(BUILT_IN)}, or function: file.py:fn")
        need = NEEDS.get(name)
        if need and getattr(spec, need) is None:
            raise ConfigError(f"{where}: {key}.{need}: the {name} reward needs it")
        optional = OPTIONAL.get(name)
        for other in (*NEEDS.values(), *OPTIONAL.values()):
            if other not in (need, optional) and getattr(spec, other) is not None:
                raise ConfigError(f"{where}: {key}.{other}: the {name} reward does not use it")
        if name == "field_match" and spec.lists is not None and spec.lists not in LIST_CREDIT:
            raise ConfigError(f"{where}: {key}.lists: {spec.lists!r}: expected "
                              f"{' or '.join(LIST_CREDIT)}")
        if name == "regex":
            try:
                re.compile(spec.pattern)
            except re.error as e:
                raise ConfigError(f"{where}: {key}.pattern: not a regular expression "
                                  f"({e})") from None
        if name == "length" and spec.target < 1:
            raise ConfigError(f"{where}: {key}.target: must be >= 1 (tokens)")
    if not specs:
        raise ConfigError(f"{where}: objective.rewards: grpo needs at least one reward "
                          f"(built in: {', '.join(BUILT_IN)}; or function: file.py:fn)")


def build(specs: list, where: str = "<config>") -> Rewards:
    """The rewards of objective.rewards (config.RewardConfig entries, paths resolved),
    loaded: schema files read, user functions imported; bad entries are one ConfigError
    naming the key."""
    check(specs, where)
    entries, seen = [], {}
    for i, spec in enumerate(specs):
        key = f"objective.rewards[{i}]"
        options = {}
        if spec.function:
            from mlxtune.evaluate.metrics import load_metric

            fn = load_metric(spec.function, f"{where}: {key}.function")
            metric = spec.function.rpartition(":")[2]
            label = f"{key} ({spec.function.rpartition('/')[2]})"
        else:
            name = spec.name
            fn, metric, label = FUNCTIONS[name], name, f"{key} ({name})"
            if name == "json_schema":
                from mlxtune.evaluate.metrics import Schema

                options["schema"] = Schema(spec.schema, f"{where}: {key}.schema")
            elif name == "regex":
                options["pattern"] = re.compile(spec.pattern)
            elif name == "length":
                options["target"] = int(spec.target)
            elif name == "field_match" and spec.lists is not None:
                options["lists"] = spec.lists
        seen[metric] = seen.get(metric, 0) + 1
        if seen[metric] > 1:
            metric = f"{metric}_{seen[metric]}"
        entries.append(Reward(metric, label, fn, float(spec.weight), options))
    return Rewards(entries)
