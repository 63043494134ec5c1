"""The data pipeline: validation errors, masks per format, truncation, splits, batches, and
the quickstart dataset."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import data
from mlxtune.config import DataConfig, SplitConfig
from mlxtune.data import Record, batch_order, collate, encode, load_splits, read_records
from mlxtune.errors import DataError
from tiny import CHATML, save_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
END = "<|im_end|>"


def chat(*turns: str, system: str | None = None, **extra) -> dict:
    """user, assistant, user, assistant, ... from positional contents."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]
    return {"messages": messages, **extra}


def records(*objs) -> list[Record]:
    return [Record(o, f"mem.jsonl:{i + 1}") for i, o in enumerate(objs)]


def targets(tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example.tokens, example.mask) if m])


def load_tokenizer_with(tmp_path_factory, template):
    from mlx_lm.utils import load_tokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path, chat_template=template)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """The tiny tokenizer without a chat template."""
    return load_tokenizer_with(tmp_path_factory, None)


# ----------------------------------------------------------------------------- encoding


def test_chat_masks_exactly_the_assistant_turn(tiny_tokenizer):
    enc = encode(records(chat("hi there", "hello back", system="be nice")), tiny_tokenizer,
                 512, None, "chat")
    (ex,) = enc.examples
    assert len(ex.tokens) == len(ex.mask) and not ex.mask[0]
    assert tiny_tokenizer.decode(ex.tokens).startswith("<|im_start|>system\nbe nice")
    assert targets(tiny_tokenizer, ex) == "hello back" + END
    assert (enc.format, enc.n_truncated, enc.n_dropped) == ("chat", 0, 0)


def test_multi_turn_chat_masks_every_assistant_turn(tiny_tokenizer):
    (ex,) = encode(records(chat("q1", "first answer", "q2", "second answer")), tiny_tokenizer,
                   512, True, "chat").examples
    assert targets(tiny_tokenizer, ex) == "first answer" + END + "second answer" + END
    # The two spans are apart: the second user turn is not a target.
    spans = np.flatnonzero(np.diff(np.array(ex.mask, dtype=int)) == 1)
    assert len(spans) == 2


def test_mask_history_keeps_only_the_last_assistant_turn(tiny_tokenizer):
    recs = records(chat("q1", "first answer", "q2", "second answer"), chat("q", "only"))
    multi, single = encode(recs, tiny_tokenizer, 512, None, "chat", mask_history=True).examples
    assert targets(tiny_tokenizer, multi) == "second answer" + END
    assert targets(tiny_tokenizer, single) == "only" + END
    every = encode(recs, tiny_tokenizer, 512, None, "chat").examples[0]
    assert multi.tokens == every.tokens  # the earlier turn stays as context
    with pytest.raises(DataError, match=r"^mem\.jsonl:1: data\.mask_history"):
        encode(recs, tiny_tokenizer, 512, False, "chat", mask_history=True)


def test_chat_without_mask_prompt_trains_on_everything(tiny_tokenizer):
    (ex,) = encode(records(chat("q", "a")), tiny_tokenizer, 512, False, "chat").examples
    assert ex.mask == [False] + [True] * (len(ex.tokens) - 1)


def test_completions_use_the_chat_template(tiny_tokenizer):
    (ex,) = encode(records({"prompt": "2+2?", "completion": "four"}), tiny_tokenizer, 512,
                   None, "completions").examples
    assert tiny_tokenizer.decode(ex.tokens).startswith("<|im_start|>user\n2+2?")
    assert targets(tiny_tokenizer, ex) == "four" + END


def test_completions_without_template_concatenate_and_add_eos(plain_tokenizer):
    assert not plain_tokenizer.has_chat_template
    (ex,) = encode(records({"prompt": "Q: 2+2? A:", "completion": " four"}), plain_tokenizer,
                   512, None, "completions").examples
    prompt = plain_tokenizer.encode("Q: 2+2? A:")
    assert ex.tokens[: len(prompt)] == prompt
    assert ex.tokens[-1] == plain_tokenizer.eos_token_id
    assert targets(plain_tokenizer, ex) == " four" + END
    assert not any(ex.mask[: len(prompt)])


def test_chat_data_needs_a_template(plain_tokenizer):
    with pytest.raises(DataError, match=r"^mem\.jsonl:1: .*chat template"):
        encode(records(chat("q", "a")), plain_tokenizer, 512, None, "chat")


def test_text_is_all_targets_with_one_eos(tiny_tokenizer):
    enc = encode(records({"text": "the cat sat"}, {"text": "ends" + END}), tiny_tokenizer, 512,
                 None, "text")
    a, b = enc.examples
    assert tiny_tokenizer.decode(a.tokens) == "the cat sat" + END
    assert a.mask == [False] + [True] * (len(a.tokens) - 1)
    assert tiny_tokenizer.decode(b.tokens) == "ends" + END  # not doubled


def test_mask_prompt_true_on_text_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match=r"^mem\.jsonl:1: data\.mask_prompt"):
        encode(records({"text": "x"}), tiny_tokenizer, 512, True, "text")
    assert encode(records({"text": "xy"}), tiny_tokenizer, 512, False, "text").examples


def test_tools_reach_the_template(tmp_path_factory):
    template = "{% if tools %}TOOLS:{{ tools|length }}\n{% endif %}" + CHATML
    tok = load_tokenizer_with(tmp_path_factory, template)
    rec = chat("weather?", "sunny", tools=[{"type": "function", "function": {"name": "w"}}])
    (ex,) = encode(records(rec), tok, 512, None, "chat").examples
    assert tok.decode(ex.tokens).startswith("TOOLS:1\n")
    assert targets(tok, ex) == "sunny" + END


def test_template_that_breaks_prefixes_falls_back_to_the_last_turn(tmp_path_factory, caplog):
    # Like Qwen3: only the last assistant turn carries a think block.
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer_with(tmp_path_factory, template)
    rows = records(chat("q1", "a1", "q2", "a2"), chat("q3", "a3", "q4", "a4"))
    with caplog.at_level(logging.WARNING, logger="mlxtune.data.encode"):
        enc = encode(rows, tok, 512, None, "chat")
    assert [targets(tok, ex) for ex in enc.examples] == [
        "<think></think>a2" + END, "<think></think>a4" + END]
    warnings = [r for r in caplog.records if "prefixes" in r.getMessage()]
    assert len(warnings) == 1


def test_truncation_and_dropping_are_counted(tiny_tokenizer):
    long_answer = chat("q", "a long answer " * 20)
    long_prompt = chat("a very long question " * 20, "short")
    enc = encode(records(long_answer, long_prompt, chat("q", "ok")), tiny_tokenizer, 40, None,
                 "chat")
    assert (enc.n_truncated, enc.n_dropped) == (2, 1)
    assert [e.source for e in enc.examples] == ["mem.jsonl:1", "mem.jsonl:3"]
    assert all(len(e.tokens) <= 40 and len(e.mask) == len(e.tokens) for e in enc.examples)
    assert len(enc.examples[0].tokens) == 40 and any(enc.examples[0].mask)


# ----------------------------------------------------------------------------- validation

J = json.dumps
GOOD = J(chat("hi", "hello"))


ERRORS = {  # name: (lines of the file, line the error names, words the message contains)
    "invalid_json": ([GOOD, '{"messages": ['], 2, "invalid JSON"),
    "not_an_object": ([GOOD, "[1, 2, 3]"], 2, "JSON object"),
    "no_known_format": ([J({"question": "x", "answer": "y"})], 1, "chat"),
    "mixed_formats": ([GOOD, J({"prompt": "a", "completion": "b"})], 2, "completions"),
    "several_formats": ([J({**chat("a", "b"), "text": "t"})], 1, "several formats"),
    "messages_not_a_list": ([J({"messages": "hi"})], 1, "non-empty list"),
    "messages_empty": ([J({"messages": []})], 1, "non-empty list"),
    "message_not_an_object": ([J({"messages": ["hi", {"role": "assistant", "content": "x"}]})],
                              1, "messages[0]"),
    "unknown_role": ([GOOD, GOOD, J({"messages": [{"role": "narrator", "content": "x"},
                                                  {"role": "assistant", "content": "y"}]})],
                     3, "user, assistant"),
    "missing_content": ([J({"messages": [{"role": "user"},
                                         {"role": "assistant", "content": "y"}]})], 1,
                        "no \"content\""),
    "content_not_a_string": ([J({"messages": [{"role": "user", "content": ["x"]},
                                              {"role": "assistant", "content": "y"}]})], 1,
                             "must be a string"),
    "empty_assistant": ([J(chat("x", " "))], 1, "empty assistant"),
    "last_not_assistant": ([GOOD, J({"messages": [{"role": "user", "content": "x"}]})], 2,
                           "last message"),
    "prompt_not_a_string": ([J({"prompt": 3, "completion": "b"})], 1, "\"prompt\""),
    "completion_missing": ([J({"prompt": "a"})], 1, "\"completion\""),
    "empty_completion": ([J({"prompt": "a", "completion": ""})], 1, "empty \"completion\""),
    "empty_text": ([J({"text": "  "})], 1, "empty \"text\""),
    "text_not_a_string": ([J({"text": None})], 1, "\"text\" must be a string"),
    "blank_lines_keep_numbering": ([GOOD, "", "   ", "{oops"], 4, "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_validation_errors_name_file_and_line(case, tmp_path):
    lines, line, words = ERRORS[case]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message and "\n" not in message


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        read_records(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: no records"):
        read_records(tmp_path / "empty.jsonl")


def test_valid_files_read_with_sources_and_extra_keys(tmp_path):
    tool_call = {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    rows = [chat("a", "b", user="u1"),
            {"messages": [{"role": "user", "content": "x"}, tool_call,
                          {"role": "tool", "content": "42"},
                          {"role": "assistant", "content": "it is 42"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text(J(rows[0]) + "\n\n" + J(rows[1]) + "\n", encoding="utf-8")
    recs, fmt = read_records(path)
    assert fmt == "chat"
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:3"]
    assert recs[0].data["user"] == "u1"


# ----------------------------------------------------------------------------- splits


def grouped_file(tmp_path, n_users=20, per_user=3) -> Path:
    rows = [chat(f"q{u}-{k}", f"a{u}-{k}", user=f"u{u}") for u in range(n_users)
            for k in range(per_user)]
    return write_jsonl(tmp_path / "all.jsonl", rows)


def users_of(split) -> set:
    return {r.data["user"] for r in split}


def test_split_by_key_keeps_groups_together(tmp_path):
    cfg = DataConfig(path=str(grouped_file(tmp_path)), split=SplitConfig("user", 0.2, 0.1))
    splits, fmt = load_splits(cfg, seed=0)
    assert fmt == "chat"
    assert sum(len(s) for s in splits.values()) == 60
    assert [len(users_of(splits[k])) for k in ("train", "valid", "test")] == [14, 4, 2]
    assert not (users_of(splits["train"]) & users_of(splits["valid"]))
    assert not (users_of(splits["train"]) & users_of(splits["test"]))
    assert not (users_of(splits["valid"]) & users_of(splits["test"]))


def test_split_is_deterministic_and_follows_the_seed(tmp_path):
    cfg = DataConfig(path=str(grouped_file(tmp_path)), split=SplitConfig("user", 0.2, 0.1))
    sources = lambda seed: {k: [r.source for r in v]  # noqa: E731
                            for k, v in load_splits(cfg, seed)[0].items()}
    assert sources(0) == sources(0)
    assert sources(0) != sources(1)


def test_split_without_key_splits_records(tmp_path):
    cfg = DataConfig(path=str(grouped_file(tmp_path, 10, 1)), split=SplitConfig(None, 0.2, 0.0))
    splits, _ = load_splits(cfg, seed=5)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [8, 2, 0]


def test_split_errors(tmp_path):
    path = grouped_file(tmp_path, 2, 2)
    with pytest.raises(DataError, match=r"all\.jsonl: data\.split: 2 distinct values"):
        load_splits(DataConfig(path=str(path), split=SplitConfig("user", 0.1, 0.1)), 0)
    with pytest.raises(DataError, match=r"all\.jsonl:1: no \"team\" key"):
        load_splits(DataConfig(path=str(path), split=SplitConfig("team", 0.1, 0.1)), 0)


def test_separate_files(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b")] * 3)
    valid = write_jsonl(tmp_path / "v.jsonl", [chat("c", "d")])
    splits, fmt = load_splits(DataConfig(train=str(train), valid=str(valid)), 0)
    assert (len(splits["train"]), len(splits["valid"]), splits["test"], fmt) == (3, 1, [], "chat")
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"o\.jsonl:1: this file is text data"):
        load_splits(DataConfig(train=str(train), test=str(other)), 0)
    with pytest.raises(DataError, match=r"o\.jsonl:1: data\.mask_prompt"):
        load_splits(DataConfig(train=str(other), mask_prompt=True), 0)


def test_every_file_is_validated_first(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b")])
    (tmp_path / "bad.jsonl").write_text(GOOD + "\n{bad\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_splits(DataConfig(train=str(train), test=str(tmp_path / "bad.jsonl")), 0)


# ----------------------------------------------------------------------------- batches


def test_batch_order_covers_every_index_once_and_is_deterministic():
    lengths = list(np.random.default_rng(0).integers(5, 50, size=23))
    order = batch_order(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in order for i in b) == list(range(23))
    assert sorted(len(b) for b in order) == [3] + [4] * 5  # the short batch is kept
    assert order == batch_order(lengths, 4, seed=1, epoch=0)
    assert order != batch_order(lengths, 4, seed=1, epoch=1)
    # Bucketed: batches are consecutive runs of the indices sorted by (length, index).
    by_length = sorted(range(23), key=lambda i: (lengths[i], i))
    assert sorted(order) == sorted(by_length[i:i + 4] for i in range(0, 23, 4))
    assert batch_order([], 4, 0, 0) == []


def test_collate_pads_and_masks():
    examples = [data.Example([5, 6, 7], [False, True, True], "a"),
                data.Example(list(range(1, 11)), [False] + [True] * 9, "b")]
    tokens, mask = collate(examples, pad_id=0, pad_multiple=8)
    assert tokens.dtype == mx.int32 and mask.dtype == mx.float32
    assert tokens.shape == mask.shape == (2, 16)
    t, m = np.array(tokens), np.array(mask)
    assert t[0, :3].tolist() == [5, 6, 7] and (t[0, 3:] == 0).all()
    assert m[0].tolist() == [0, 1, 1] + [0] * 13
    assert m[1].sum() == 9 and (m[1, 10:] == 0).all()
    assert collate(examples, pad_id=3, pad_multiple=1)[0].shape == (2, 10)


# ----------------------------------------------------------------------------- quickstart

QUICKSTART = ROOT / "data" / "quickstart"
KEYS = ["title", "priority", "status", "due_date", "assignee", "tags"]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_quickstart_data", ROOT / "scripts" / "make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_regenerates_byte_identically(tmp_path):
    _generator().write(tmp_path)
    for name in ("tasks.jsonl", "task.schema.json"):
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name


def test_quickstart_data_validates_and_matches_the_schema():
    recs, fmt = read_records(QUICKSTART / "tasks.jsonl")
    assert fmt == "chat" and 1500 <= len(recs) <= 2500
    assert 60 <= len({r.data["user"] for r in recs}) <= 100
    schema = json.loads((QUICKSTART / "task.schema.json").read_text())
    validate = _schema_validator(schema)
    for r in recs:
        system, user, assistant = r.data["messages"]
        assert [m["role"] for m in (system, user, assistant)] == ["system", "user", "assistant"]
        assert "2025-03-14" in system["content"]
        task = json.loads(assistant["content"])
        assert list(task) == KEYS, r.source  # schema order
        assert assistant["content"] == json.dumps(task, separators=(",", ":"))  # compact
        validate(task)


def test_quickstart_splits_by_user(tmp_path):
    cfg = DataConfig(path=str(QUICKSTART / "tasks.jsonl"), split=SplitConfig("user", 0.1, 0.1))
    splits, _ = load_splits(cfg, seed=0)
    assert all(splits[k] for k in ("train", "valid", "test"))
    assert not users_of(splits["train"]) & (users_of(splits["valid"]) | users_of(splits["test"]))


def _schema_validator(schema):
    try:
        import jsonschema
    except ImportError:
        return lambda task: _check_task_by_hand(task, schema)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return validator.validate


def _check_task_by_hand(task: dict, schema: dict) -> None:
    import datetime as dt

    props = schema["properties"]
    assert set(task) == set(schema["required"])
    assert isinstance(task["title"], str) and task["title"]
    assert task["priority"] in props["priority"]["enum"]
    assert task["status"] in props["status"]["enum"]
    assert task["due_date"] is None or dt.date.fromisoformat(task["due_date"])
    assert task["assignee"] is None or (isinstance(task["assignee"], str) and task["assignee"])
    assert isinstance(task["tags"], list) and all(isinstance(t, str) and t for t in task["tags"])
