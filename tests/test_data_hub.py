"""Datasets by Hugging Face id (data.hub), read with the real `datasets` library from its
cache with the hub switched off, and local parquet / csv / json tables.

The datasets are made in the test and put into the datasets cache as `load_dataset(id)`
leaves them after a download: prepared by datasets' own packaged parquet builder (arrow
files and dataset_info.json) under HF_DATASETS_CACHE/owner___name/CONFIG/0.0.0/HASH,
which is where `load_dataset(id)` looks when HF_HUB_OFFLINE=1 (its cached-dataset
factory). Nothing is mocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")

from mlxtune import config  # noqa: E402
from mlxtune.cli import main  # noqa: E402
from mlxtune.data import load_splits, read_records  # noqa: E402
from mlxtune.datacheck import check  # noqa: E402
from mlxtune.errors import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cache_dataset(cache: Path, repo_id: str, splits: dict[str, dict[str, list]],
                  config_name: str = "default") -> Path:
    """Put a dataset into `cache` as load_dataset(repo_id) leaves it once downloaded."""
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    work = cache.parent / "work" / owner / name / config_name
    (work / "src").mkdir(parents=True)
    files = {}
    for split, columns in splits.items():
        pq.write_table(pa.table(columns), work / "src" / f"{split}.parquet")
        files[split] = [f"{split}.parquet"]
    builder = Parquet(data_files=DataFilesDict.from_local_or_remote(
                          files, base_path=str(work / "src")),
                      dataset_name=name, config_name=config_name, hash="0123abcd",
                      cache_dir=str(work / "build"))
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / config_name / "0.0.0" / "0123abcd"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)
    return target


def sharegpt(i: int) -> list[dict]:
    return [{"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": f"What is {i} plus {i}?"},
            {"from": "gpt", "value": f"{2 * i}, since {i} and {i} make {2 * i}."}]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "datasets"
    cache.mkdir()
    cache_dataset(cache, "tester/chatty", {
        "train": {"conversations": [sharegpt(i) for i in range(40)],
                  "user": [f"u{i % 8}" for i in range(40)]},
        "validation": {"conversations": [sharegpt(100 + i) for i in range(6)],
                       "user": ["v"] * 6},
        "test": {"conversations": [sharegpt(200 + i) for i in range(5)] + [sharegpt(3)],
                 "user": ["t"] * 6}})
    cache_dataset(cache, "tester/alpaca", {
        "train": {"instruction": [f"Reverse the word number {i}." for i in range(100)],
                  "input": [f"word{i}" if i % 2 else "" for i in range(100)],
                  "output": [f"{i}drow" for i in range(100)],
                  "user": [f"u{i % 10}" for i in range(100)]}})
    cache_dataset(cache, "tester/multi", {
        "train": {"body": [f"Plain text document number {i} about rivers." for i in range(30)]}},
        config_name="plain")
    cache_dataset(cache, "tester/multi", {
        "train": {"question": [f"Pick a colour {i}" for i in range(30)],
                  "good": [f"blue {i}" for i in range(30)],
                  "bad": [f"grey {i}" for i in range(30)]}},
        config_name="prefs")
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """The hub switched off and the datasets cache pointed at the test's, in process."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def data_cfg(**hub):
    return config.from_dict({"data": {"hub": hub}}).data


def test_chat_dataset_with_sharegpt_messages_and_its_own_splits(offline):
    splits, fmt = load_splits(data_cfg(id="tester/chatty",
                                       columns={"messages": "conversations"}), 0)
    assert fmt == "chat"
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [40, 6, 6]
    first = splits["train"][0]
    assert first.source == "tester/chatty/train:1"
    assert first.data["messages"][1] == {"role": "user", "content": "What is 0 plus 0?"}
    assert first.data["user"] == "u0"  # other columns stay (split keys)
    assert splits["valid"][0].source == "tester/chatty/validation:1"


def test_forgiving_split_names_and_split_expressions(offline):
    cfg = data_cfg(id="tester/chatty", columns={"messages": "conversations"},
                   splits={"train": "training[:30]", "valid": "val", "test": "dev[2:4]+test"})
    splits, _ = load_splits(cfg, 0)
    assert len(splits["train"]) == 30
    assert splits["valid"][0].source == "tester/chatty/validation:1"
    assert [r.source for r in splits["test"][:3]] == [
        "tester/chatty/validation:3", "tester/chatty/validation:4", "tester/chatty/test:1"]


def test_prompt_columns_joined_and_missing_held_out_splits_carved_by_data_split(offline):
    cols = {"prompt": ["instruction", "input"], "completion": "output"}
    cfg = config.from_dict({"data": {"hub": {"id": "tester/alpaca", "columns": cols},
                                     "split": {"by": "user", "valid": 0.1, "test": 0.2}}}).data
    splits, fmt = load_splits(cfg, 0)
    assert fmt == "completions"
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [70, 10, 20]
    users = {name: {r.data["user"] for r in splits[name]} for name in splits}
    assert not users["train"] & (users["valid"] | users["test"])  # whole users
    odd = next(r for r in splits["train"] if r.source.endswith(":2"))
    assert odd.data["prompt"] == "Reverse the word number 1.\n\nword1"
    # An expression for test: valid alone is carved out of train (rows stay absolute).
    cfg = config.from_dict({"data": {"hub": {"id": "tester/alpaca", "columns": cols,
                                             "splits": {"train": "train[:80%]",
                                                        "test": "train[80%:]"}}}}).data
    splits, _ = load_splits(cfg, 0)
    assert splits["test"][0].source == "tester/alpaca/train:81"
    assert len(splits["test"]) == 20 and len(splits["train"]) + len(splits["valid"]) == 80


def test_text_and_preference_configs(offline):
    splits, fmt = load_splits(data_cfg(id="tester/multi", config="plain",
                                       columns={"text": "body"}), 0)
    assert fmt == "text" and sum(map(len, splits.values())) == 30
    assert splits["train"][0].source.startswith("tester/multi/plain/train:")
    splits, fmt = load_splits(data_cfg(id="tester/multi", config="prefs",
                                       columns={"prompt": "question", "chosen": "good",
                                                "rejected": "bad"}), 0)
    assert fmt == "preference"
    assert {"prompt", "chosen", "rejected"} <= set(splits["train"][0].data)


@pytest.mark.parametrize("hub, expected", [
    ({"id": "tester/chatty", "columns": {"messages": "conversations"},
      "splits": {"test": "holdout"}}, None),
    ({"id": "tester/chatty", "columns": {"messages": "convos"}},
     'data.hub.columns.messages: no column "convos"; its columns: conversations, user'),
    ({"id": "tester/chatty", "columns": {"messages": "conversations"},
      "splits": {"valid": "val[:5%"}}, "data.hub.splits.valid: 'val[:5%' is not a split"),
    ({"id": "tester/absent"}, "data.hub.id: tester/absent is not in the local datasets "
                              "cache"),
    ({"id": "tester/multi", "config": "nope"}, "data.hub.config"),
])
def test_bad_hub_input_is_one_line(offline, hub, expected):
    with pytest.raises(DataError) as e:
        load_splits(data_cfg(**hub), 0)
    message = str(e.value)
    assert "\n" not in message
    if expected is None:  # the test split: "holdout" names no split of this dataset
        assert message == ("data.hub.splits.test: no split \"holdout\" in tester/chatty; "
                           "its splits: train, validation, test")
    else:
        assert expected in message
    if "absent" in str(hub):
        assert "HF_HUB_OFFLINE=1" in message
        assert "datasets.load_dataset('tester/absent')" in message


def test_mlxtune_data_on_a_hub_dataset_offline(hub_cache, tmp_path, tiny_model_dir):
    """The command as a user runs it: HF_HUB_OFFLINE=1, the id read from the cache; a
    test conversation copied from train is leakage (exit 1); an id that is not cached is
    one line and exit 2."""
    cfg = {"name": "hub", "model": {"path": str(tiny_model_dir)},
           "data": {"hub": {"id": "tester/chatty", "columns": {"messages": "conversations"}},
                    "max_seq_len": 64}}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(hub_cache)}
    cmd = [sys.executable, "-m", "mlxtune", "data", str(path), "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert [report["splits"][s]["examples"] for s in ("train", "valid", "test")] == [40, 6, 6]
    assert report["leakage"]["test"] == 1 and report["leakage"]["valid"] == 0
    assert report["leakage"]["pairs"][0]["train"] == "tester/chatty/train:4"
    assert report["splits"]["train"]["truncated"] > 0  # 64 tokens of a byte-level tokenizer

    cfg["data"]["hub"]["id"] = "tester/absent"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tester/absent is not in the local datasets cache" in lines[0]


# ----------------------------------------------------------------------------- local tables


def chat_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}"}], "user": f"u{i}"}


def test_parquet_csv_and_json_files(tmp_path):
    import pyarrow.parquet as pq

    rows = [chat_row(i) for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    records, fmt = read_records(tmp_path / "chat.parquet")
    assert fmt == "chat" and records[2].source.endswith("chat.parquet:3")
    assert records[2].data == rows[2]

    csv_text = "question,answer,user\nq0,a0,u0\n\"multi\nline\",a1,u1\nq2,a2,u2\n"
    (tmp_path / "qa.csv").write_text(csv_text)
    cols = config.ColumnsConfig(prompt=["question"], completion="answer")
    records, fmt = read_records(tmp_path / "qa.csv", cols)
    assert fmt == "completions"
    assert [r.source.rpartition(":")[2] for r in records] == ["2", "3", "5"]
    assert records[1].data == {"prompt": "multi\nline", "completion": "a1", "user": "u1"}
    import csv

    with open(tmp_path / "msgs.csv", "w", newline="") as f:  # a cell holding JSON
        csv.writer(f).writerows([["messages"], [json.dumps(rows[0]["messages"])]])
    records, fmt = read_records(tmp_path / "msgs.csv")
    assert fmt == "chat" and records[0].data == {"messages": rows[0]["messages"]}

    (tmp_path / "array.json").write_text("[\n" + ",\n".join(
        json.dumps(r, indent=1) for r in rows) + "\n]\n")
    records, fmt = read_records(tmp_path / "array.json")
    starts = [i + 1 for i, line in enumerate((tmp_path / "array.json").read_text()
                                             .splitlines()) if line.startswith("{")]
    assert [int(r.source.rpartition(":")[2]) for r in records] == starts
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_records(tmp_path / "lines.json")[0]) == 5


def test_bad_tables_are_one_line(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")
    cols = config.ColumnsConfig(prompt=["q"], completion="answer")
    with pytest.raises(DataError, match=r'qa.csv: data.columns.prompt: no column "q"; its '
                                        r"columns: question, answer"):
        read_records(tmp_path / "qa.csv", cols)
    (tmp_path / "bad.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"bad.json:3: invalid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x.parquet: cannot read this parquet file"):
        read_records(tmp_path / "x.parquet")


def test_cli_reports_an_unknown_column_in_one_line(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")
    cfg = {"model": {"path": str(tiny_model_dir)},
           "data": {"train": "qa.csv", "columns": {"prompt": "q", "completion": "answer"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["data", str(tmp_path / "c.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no column "q"; its columns: question, answer' in err[0]


def test_quickstart_style_check_on_hub_data(offline, tiny_model_dir):
    cfg = config.from_dict({"model": {"path": str(tiny_model_dir)},
                            "data": {"hub": {"id": "tester/multi", "config": "prefs",
                                             "columns": {"prompt": "question",
                                                         "chosen": "good",
                                                         "rejected": "bad"}},
                                     "max_seq_len": 64}})
    report = check(cfg).data
    assert report["format"] == "preference" and report["conflicts"] == 0
    assert sum(report["splits"][s]["examples"] for s in report["splits"]) == 30


@pytest.mark.parametrize("data, message", [
    ({"hub": {"id": "a/b"}, "path": "x.jsonl"},
     "data.hub: give either data.hub (a Hugging Face dataset) or data.path, not both"),
    ({"hub": {"config": "x"}}, "data.hub.id: the dataset's id is required"),
    ({"hub": {"id": "a/b", "splits": {"validation": "val"}}},
     "data.hub.splits.validation: unknown key (did you mean 'data.hub.splits.valid'?)"),
    ({"train": "x.jsonl", "columns": {"messages": ["a", "b"]}},
     "data.columns.messages: expected string"),
])
def test_hub_config_errors_name_the_key(data, message):
    from mlxtune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.from_dict({"data": data})
    assert message in str(e.value)
