"""GRPO's rewards: each built-in by hand, the weighted sum with None, user functions and
their errors, config errors."""

import json
import math

import numpy as np
import pytest

from mlxtune import config
from mlxtune.config import RewardConfig
from mlxtune.errors import ConfigError
from mlxtune.objectives import rewards as R


def score(spec: RewardConfig, completions, reference=None, ids=None, **columns):
    rw = R.build([spec])
    ids = ids or [[0] * len(c) for c in completions]
    cols = dict(columns)
    if reference is not None:
        cols["reference"] = reference
    table, total = rw(["p"] * len(completions), completions, ids, cols)
    return [None if math.isnan(v) else v for v in table[:, 0]], total


def test_json_valid():
    got, _ = score(RewardConfig(name="json_valid"),
                   ['{"a": 1}', ' [1, 2] \n', '{"a": 1', '```json\n{}\n```', 'null', ''])
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_json_schema(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"],
                                  "properties": {"a": {"type": "integer"},
                                                 "d": {"type": "string", "format": "date"}}}))
    got, _ = score(RewardConfig(name="json_schema", schema=str(schema)),
                   ['{"a": 1}', '{"a": "1"}', '{"b": 1}', 'nope', '{"a": 2, "d": "2025-13-40"}',
                    '{"a": 2, "d": "2025-01-30"}'])
    assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_field_match():
    ref = json.dumps({"a": 1, "b": "x", "c": [1, 2], "d": True})
    got, _ = score(RewardConfig(name="field_match"),
                   [ref, '{"a": 1, "b": "y", "c": [1, 2], "d": 1}', '{"a": 1.0}', 'bad', '[]',
                    '{"a": 1}'],
                   reference=[ref] * 5 + ["not json"])
    assert got == [1.0, 0.5, 0.25, 0.0, 0.0, None]


def test_field_match_jaccard_lists():
    # lists: jaccard: a list field scores |a & b| / |a | b| over its items as sets; the
    # other fields, and a list against a non-list, as before.
    ref = json.dumps({"a": 1, "tags": ["x", "y", "z"], "none": []})
    spec = RewardConfig(name="field_match", lists="jaccard")
    got, _ = score(spec, [ref,
                          '{"a": 1, "tags": ["x", "y"], "none": []}',         # 2/3
                          '{"a": 1, "tags": ["z", "y", "x"], "none": ["q"]}',  # 1, 0
                          '{"a": 2, "tags": ["x", "w"], "none": []}',          # 1/4
                          '{"a": 1, "tags": "x y z", "none": null}',           # 0, 0
                          '{"a": 1, "tags": [{"k": 1}, "x"]}'],                # 1/4, missing
                   reference=[ref] * 6)
    assert got == pytest.approx([1.0, (1 + 2 / 3 + 1) / 3, (1 + 1 + 0) / 3,
                                 (0 + 1 / 4 + 1) / 3, 1 / 3, (1 + 1 / 4) / 3], abs=1e-12)
    exact, _ = score(RewardConfig(name="field_match", lists="exact"),
                     ['{"a": 1, "tags": ["x", "y"], "none": []}'], reference=[ref])
    assert exact == [pytest.approx(2 / 3)]


def test_exact_match_is_normalised():
    got, _ = score(RewardConfig(name="exact_match"),
                   ["  Hello   World\n", "hello world", "hello  worlds", "x"],
                   reference=["hello world", "HELLO\tWORLD ", "hello world", None])
    assert got == [1.0, 1.0, 0.0, None]


def test_regex_and_chat_completions():
    spec = RewardConfig(name="regex", pattern=r"^\d{4}-\d{2}-\d{2}$")
    got, _ = score(spec, ["2025-01-02", "on 2025-01-02", [{"role": "assistant",
                                                            "content": "1999-12-31"}]])
    assert got == [1.0, 0.0, 1.0]
    got, _ = score(RewardConfig(name="regex", pattern="cat"), ["a cat!", "dog"])
    assert got == [1.0, 0.0]


def test_length_penalty_past_the_target():
    got, _ = score(RewardConfig(name="length", target=4), ["", "", "", ""],
                   ids=[[1, 2], [1] * 4, [1] * 6, [1] * 12])
    assert got == [0.0, 0.0, -0.5, -2.0]


def test_weighted_sum_ignores_none_as_nan(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def half(prompts, completions, **kw):\n"
                 "    return [None if c == 'skip' else 0.5 for c in completions]\n"
                 "def cols(prompts, completions, completion_ids, user, reference, **kw):\n"
                 "    return [float(u == 'u1') + len(i) for u, i in zip(user, completion_ids)]\n")
    rw = R.build([RewardConfig(name="exact_match", weight=2.0),
                  RewardConfig(function=f"{f}:half", weight=-1.0),
                  RewardConfig(function=f"{f}:cols", weight=0.5)])
    assert rw.names == ["exact_match", "half", "cols"]
    table, total = rw(["p", "p"], ["a", "skip"], [[1], [1, 2]],
                      {"reference": ["a", "b"], "user": ["u1", "u2"]})
    assert np.isnan(table[1, 1])
    np.testing.assert_allclose(total, [2 - 0.5 + 0.5 * 2, 0 + 0 + 0.5 * 2])


@pytest.mark.parametrize("body,message", [
    ("    raise KeyError('answer')", "objective.rewards[0] (r.py:fn): raised KeyError: 'answer'"),
    ("    return [1.0]", "objective.rewards[0] (r.py:fn): returned 1 values for 2 completions"),
    ("    return 1.0", "objective.rewards[0] (r.py:fn): returned float, expected a list"),
    ("    return ['a', 1]", "objective.rewards[0] (r.py:fn): value 0 is 'a', not a number"),
])
def test_user_function_errors_name_it(tmp_path, body, message):
    f = tmp_path / "r.py"
    f.write_text(f"def fn(prompts, completions, **kw):\n{body}\n")
    rw = R.build([RewardConfig(function=f"{f}:fn")])
    with pytest.raises(R.RewardError) as e:
        rw(["p", "p"], ["a", "b"], [[1], [2]], {})
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_config_errors_name_the_key(tmp_path):
    def load(objective):
        (tmp_path / "c.yaml").write_text(json.dumps({"data": {"train": "t.jsonl"},
                                                     "objective": objective}))
        return config.load(tmp_path / "c.yaml")

    cases = [
        ({"type": "grpo"}, "objective.rewards: grpo needs at least one reward"),
        ({"type": "grpo", "group_size": 1, "rewards": [{"name": "json_valid"}]},
         "objective.group_size: must be >= 2"),
        ({"type": "grpo", "rewards": [{"name": "jsn_valid"}]},
         "objective.rewards[0].name: unknown reward 'jsn_valid' (did you mean 'json_valid'?)"),
        ({"type": "grpo", "rewards": [{"name": "regex", "pattern": "("}]},
         "objective.rewards[0].pattern: not a regular expression"),
        ({"type": "grpo", "rewards": [{"name": "json_valid"}, {"name": "length"}]},
         "objective.rewards[1].target: the length reward needs it"),
        ({"type": "grpo", "rewards": [{"name": "json_valid", "function": "a.py:f"}]},
         "objective.rewards[0]: give either name"),
        ({"type": "grpo", "rewards": [{"function": "nofunc"}]},
         "objective.rewards[0].function: 'nofunc': expected file.py:function"),
        ({"type": "grpo", "loss_type": "ppo", "rewards": [{"name": "json_valid"}]},
         "objective.loss_type: 'ppo' is not one of: dapo, grpo, dr_grpo"),
        ({"type": "grpo", "rewards": [{"name": "field_match", "lists": "sets"}]},
         "objective.rewards[0].lists: 'sets': expected exact or jaccard"),
        ({"type": "grpo", "rewards": [{"name": "json_valid", "lists": "jaccard"}]},
         "objective.rewards[0].lists: the json_valid reward does not use it"),
        ({"type": "grpo", "rewards": [{"function": "a.py:f", "lists": "jaccard"}]},
         "objective.rewards[0].lists: a function reward takes no lists"),
        ({"type": "sft", "num_iterations": 2}, "objective.num_iterations: a grpo key"),
        ({"type": "dpo", "dense_base": True}, "objective.dense_base: a grpo key"),
    ]
    for objective, message in cases:
        with pytest.raises(ConfigError) as e:
            load(objective)
        assert f"c.yaml: {message}" in str(e.value), (objective, str(e.value))
    # Files: relative to the config; a missing one is named at build time.
    cfg = load({"type": "grpo", "rewards": [{"name": "json_schema", "schema": "s.json"},
                                            {"function": "r.py:fn"}]})
    assert cfg.objective.rewards[0].schema == str(tmp_path / "s.json")
    assert cfg.objective.rewards[1].function == f"{tmp_path / 'r.py'}:fn"
    with pytest.raises(ConfigError, match=r"objective.rewards\[0\].schema: .*not found"):
        R.build(cfg.objective.rewards, "c.yaml")
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"objective.rewards\[1\].function: .*not found"):
        R.build(cfg.objective.rewards, "c.yaml")
