"""train.report_to: TensorBoard, W&B (offline), MLflow and trackio fed from the events.

A tiny run reports to every tracker; each is read back with its own reader (TensorBoard's
EventAccumulator, the W&B offline run file's protobuf records, MlflowClient, trackio's
SQLite storage) and must hold exactly the numbers events.jsonl holds, under the names
the Hugging Face Trainer / TRL write. Tests that need a tracker's package are marked
`tracking`; they skip where it is missing, except with MLXTUNE_REQUIRE_EXTRAS=1 (CI,
after installing '.[tracking]').
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml

from mlxtune.cli import main
from mlxtune.errors import ConfigError
from mlxtune.train import tracking
from mlxtune.train.events import read_events
from tiny import write_jsonl


def need(module: str):
    if os.environ.get("MLXTUNE_REQUIRE_EXTRAS"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"color {i}?"},
                         {"role": "assistant", "content": f"the color is {i % 5}"}]}


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(16)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 104)])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "name": "tiny",
        "model": {"path": str(tiny_model_dir)},
        "adapter": {"rank": 4, "alpha": 8},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "max_seq_len": 48},
        "train": {"iters": 4, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 2,
                  "save_every": 0, "log_every": 1, "seed": 3},
    }))
    return tmp_path


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr()


# -- names and errors ----------------------------------------------------------------------

def test_metric_names_are_the_trainers():
    step, values = tracking.metrics({
        "event": "train", "time": 1.0, "step": 7, "loss": 0.5, "lr": 1e-4, "tokens": 900,
        "tokens_per_sec": 120.0, "peak_memory_gb": 1.5, "epoch": 0.25,
        "rewards/chosen": 0.1, "logps/rejected": -9.0, "nll_loss": 1.2})
    assert step == 7
    assert values == {"train/loss": 0.5, "train/learning_rate": 1e-4, "train/num_tokens": 900,
                      "train/tokens_per_sec": 120.0, "train/peak_memory_gb": 1.5,
                      "train/epoch": 0.25, "train/rewards/chosen": 0.1,
                      "train/logps/rejected": -9.0, "train/nll_loss": 1.2}
    step, values = tracking.metrics({"event": "val", "time": 1.0, "step": 4, "loss": 0.7,
                                     "best": 0.7, "improved": True,
                                     "rewards/accuracies": 0.75})
    assert (step, values) == (4, {"eval/loss": 0.7, "eval/rewards/accuracies": 0.75})
    assert tracking.metrics({"event": "checkpoint", "step": 4, "path": "x"}) is None


@pytest.mark.parametrize("value, expected", [
    ("tensorboard", ["tensorboard"]),
    (["WandB", "tensorboard", "wandb"], ["wandb", "tensorboard"]),
    ("tensorboard,wandb", ["tensorboard", "wandb"]), ("none", []), ([], [])])
def test_report_to_takes_a_name_or_a_list(value, expected):
    from mlxtune.config import from_dict

    cfg = from_dict({"data": {"train": "x.jsonl"}, "train": {"report_to": value}})
    assert cfg.train.report_to == expected


def test_unknown_tracker_is_named_with_the_key():
    from mlxtune.config import from_dict

    with pytest.raises(ConfigError, match=r"train.report_to\[1\]: unknown tracker 'tensorbord' "
                                          r"\(did you mean 'tensorboard'\?\)"):
        from_dict({"data": {"train": "x.jsonl"},
                   "train": {"report_to": ["wandb", "tensorbord"]}})


def test_missing_package_is_one_line_before_anything_is_written(workdir, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    run_dir = workdir / "run"
    # wandb alone: tensorboard may be missing too where the extras are not installed (the
    # default test run), and the check names the first missing package.
    code, out = run_cli(["run", str(workdir / "config.yaml"), "--run-dir", str(run_dir), "-q",
                         "--set", "train.report_to=[wandb]"], capsys)
    assert code != 0
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert "train.report_to: wandb needs the wandb package" in lines[0]
    assert "pip install wandb" in lines[0]
    assert not run_dir.exists()


def test_a_tracker_that_fails_while_logging_is_dropped(capsys):
    class Broken:
        def log(self, step, values):
            raise OSError("disk full")

        def finish(self, stop):
            raise AssertionError("a dropped tracker is not finished")

    seen = []

    class Fine:
        def log(self, step, values):
            seen.append((step, values))

        def finish(self, stop):
            seen.append(("finish", stop["reason"]))

    t = tracking.Tracking({"broken": Broken(), "fine": Fine()})
    t.log({"event": "train", "step": 1, "loss": 1.0})
    t.log({"event": "train", "step": 2, "loss": 0.5})
    t.log({"event": "stop", "reason": "done", "step": 2})
    t.close()
    assert seen == [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5}), ("finish", "done")]
    err = capsys.readouterr().err
    assert err.count("train.report_to: broken stopped logging (OSError: disk full)") == 1


# -- readers -------------------------------------------------------------------------------

def tensorboard_scalars(logdir: Path) -> tuple[dict, dict]:
    """({tag: [(step, value)]}, hparams) read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    start = metadata.parse_session_start_info_plugin_data(content)
    hparams = {}
    for k, v in start.hparams.items():
        kind = v.WhichOneof("kind")
        hparams[k] = getattr(v, kind)
    return scalars, hparams


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of a W&B offline run file (a LevelDB-style log: a 7-byte
    header, 32 KiB blocks of records: crc32 (4), length (2), type (1: full, 2: first,
    3: middle, 4: last), data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    records = []
    for chunk in chunks:
        r = pb.Record()
        r.ParseFromString(chunk)
        records.append(r)
    return records


def wandb_history(run_dir: Path) -> tuple[dict, dict]:
    """({metric: [(step, value)]}, config) of the offline run."""
    history, config = {}, {}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                   for i in r.history.item}
            step = row.pop("_step")
            for k, v in row.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((step, v))
        elif kind == "run":
            for i in r.run.config.update:
                value = json.loads(i.value_json)
                config[i.key or "/".join(i.nested_key)] = (value.get("value", value)
                                                           if isinstance(value, dict) else value)
    return history, config


def expected_series(events: list[dict]) -> dict:
    out = {}
    for e in events:
        found = tracking.metrics(e)
        if found:
            step, values = found
            for k, v in values.items():
                out.setdefault(k, []).append((step, v))
    return out


def close(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert [s for s, _ in got[k]] == [s for s, _ in want[k]], k
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in want[k]], rel=rel), k


# -- a run reporting to every tracker --------------------------------------------------------

@pytest.mark.tracking
def test_a_run_reports_to_tensorboard_and_wandb_offline(workdir, capsys, monkeypatch):
    """The issue's check: report_to [tensorboard, wandb] with W&B offline writes both, and
    both hold events.jsonl's numbers under the Trainer's names, the config as
    hyperparameters; stdout still holds only the run directory."""
    need("tensorboard")
    need("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = workdir / "run"
    code, out = run_cli(["run", str(workdir / "config.yaml"), "--run-dir", str(run_dir), "-q",
                         "--set", "train.report_to=[tensorboard, wandb]",
                         "--set", "train.learning_rate=2e-3"], capsys)
    assert code == 0, out.err
    assert out.out.strip() == str(run_dir)
    events = read_events(run_dir)
    want = expected_series(events)
    assert {"train/loss", "train/learning_rate", "train/tokens_per_sec",
            "train/peak_memory_gb", "eval/loss"} <= set(want)
    assert len(want["train/loss"]) == 4 and [s for s, _ in want["eval/loss"]] == [0, 2, 4]

    scalars, hparams = tensorboard_scalars(run_dir / "tensorboard")
    close(scalars, want, rel=1e-6)              # float32 in the event file
    assert hparams["train.learning_rate"] == pytest.approx(2e-3)
    assert hparams["train.report_to"] == '["tensorboard", "wandb"]'
    assert hparams["model.path"] == events[0]["config"]["model"]["path"]

    history, config = wandb_history(run_dir)
    close(history, want, rel=1e-12)
    assert config["train"]["learning_rate"] == 2e-3
    assert config["adapter"]["rank"] == 4


@pytest.mark.tracking
def test_mlflow_and_trackio_hold_the_same_numbers(workdir, capsys, monkeypatch, tmp_path):
    need("mlflow")
    need("sqlalchemy")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-tests")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "tiny-tests")
    if "trackio" in sys.modules:          # its store folder is read at import
        pytest.skip("trackio was imported before TRACKIO_DIR was set")
    need("trackio")
    run_dir = workdir / "run"
    code, out = run_cli(["run", str(workdir / "config.yaml"), "--run-dir", str(run_dir), "-q",
                         "--set", "train.report_to=[mlflow, trackio]"], capsys)
    assert code == 0, out.err
    assert out.out.strip() == str(run_dir)
    want = expected_series(read_events(run_dir))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.003"
    assert run.data.tags["stop_reason"] == "done"
    got = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
           for k in run.data.metrics}
    close(got, want, rel=1e-12)

    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio").is_dir()
    logs = SQLiteStorage.get_logs("tiny-tests", "run")
    got = {}
    for row in logs:
        for k, v in row.items():
            if k not in ("step", "timestamp") and not k.startswith("_"):
                got.setdefault(k, []).append((row["step"], v))
    close(got, want, rel=1e-12)
    assert SQLiteStorage.get_run_config("tiny-tests", "run")["train"]["learning_rate"] == 0.003
