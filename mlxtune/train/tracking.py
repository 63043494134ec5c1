"""Experiment trackers (train.report_to): TensorBoard, Weights & Biases, MLflow, trackio.

events.jsonl stays the source of truth; a tracker is a second reader of the same records,
fed by EventWriter.emit on rank 0 as each is written (`start` opens the trackers named in
the config it carries, `stop` closes them). Each tracker's package is optional and
imported only when named; `check` runs before anything is loaded, so a missing one is one
line naming the pip command. Metric names are those the Hugging Face Trainer / TRL write:

    train event   train/loss, train/learning_rate, train/tokens_per_sec,
                  train/peak_memory_gb, train/num_tokens, train/epoch, and every other
                  number as train/<name> (TRL's rewards/chosen, logps/rejected, nll_loss ...)
    val event     eval/loss and eval/<name> for the rest (eval/rewards/accuracies ...)

at the event's step; the run's config is logged as hyperparameters (nested for W&B and
trackio, dotted keys for TensorBoard's HParams and MLflow's params).

Where each writes:
    tensorboard   RUN_DIR/tensorboard/ (event files; `tensorboard --logdir RUN_DIR`)
    wandb         RUN_DIR/wandb/; project $WANDB_PROJECT or "mlxtune"; WANDB_MODE=offline
                  logs without a network (`wandb sync RUN_DIR/wandb/offline-run-*` later)
    mlflow        MLflow's own default ($MLFLOW_TRACKING_URI, else ./mlflow.db); experiment
                  $MLFLOW_EXPERIMENT_NAME or "mlxtune"
    trackio       trackio's local store ($TRACKIO_DIR, else ~/.cache/huggingface/trackio);
                  project $TRACKIO_PROJECT or "mlxtune"

A tracker that fails to start stops the run before step 1 (one line); one that fails
while logging is dropped with a warning on stderr, and training goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

from mlxtune import DISTRIBUTION
from mlxtune.errors import ConfigError

# tracker -> (module imported, what to pip install)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}

# events.jsonl's field -> the name trackers show (under train/ or eval/)
RENAMED = {"lr": "learning_rate", "tokens": "num_tokens"}
# fields that are not metrics
SKIPPED = {"event", "time", "step", "best", "improved"}


class TrackingError(ConfigError):
    """A tracker named in train.report_to cannot be used."""


def check(names: list[str]) -> None:
    """Every named tracker's package is installed (found, not imported)."""
    for name in names:
        module, dist = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"train.report_to: {name} needs the {dist} package, which is "
                                f"not installed: pip install {dist}  (or pip install "
                                f"'{DISTRIBUTION}[{name}]')")


def metrics(record: dict) -> tuple[int, dict] | None:
    """(step, {name: value}) for a train or val event; None for other events."""
    kind = record.get("event")
    if kind not in ("train", "val"):
        return None
    prefix = "train/" if kind == "train" else "eval/"
    out = {}
    for key, value in record.items():
        if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[prefix + RENAMED.get(key, key)] = value
    return int(record.get("step", 0)), out


def flat_params(config: dict) -> dict:
    """The config as dotted keys with scalar values (lists as JSON text)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is None or isinstance(v, (bool, int, float, str)):
                out[f"{prefix}{k}"] = v
            else:
                out[f"{prefix}{k}"] = json.dumps(v)
    walk(config, "")
    return out


@contextlib.contextmanager
def _quiet_stdout():
    """Trackers print banners; stdout belongs to the CLI (it prints the run directory)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- the trackers -----------------------------------------------------------------------

class TensorBoard:
    """Event files written with tensorboard's own writer and protos (no TensorFlow or
    PyTorch needed): scalars, the config as HParams and as a text summary."""

    def __init__(self, run_dir: Path, config: dict, name: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from tensorboard.plugins.text import summary_v2 as text
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.event_pb2, self.summary_pb2 = event_pb2, summary_pb2
        self.writer = EventFileWriter(str(run_dir / "tensorboard"))
        params = {k: ("" if v is None else v) for k, v in flat_params(config).items()}
        self._write(0, hparams.hparams_pb(params, trial_id=name, start_time_secs=time.time()))
        import yaml

        self._write(0, text.text_pb("config", "```\n" + yaml.safe_dump(config, sort_keys=False)
                                    + "```"))

    def _write(self, step: int, summary) -> None:
        self.writer.add_event(self.event_pb2.Event(wall_time=time.time(), step=step,
                                                   summary=summary))

    def log(self, step: int, values: dict) -> None:
        pb = self.summary_pb2
        self._write(step, pb.Summary(value=[pb.Summary.Value(tag=k, simple_value=float(v))
                                            for k, v in values.items()]))
        self.writer.flush()

    def finish(self, stop: dict | None) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlxtune"), name=name,
                              id=_run_id(run_dir), resume="allow", dir=str(run_dir),
                              config=config, settings=wandb.Settings(console="off"))

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, stop: dict | None) -> None:
        if stop is not None:
            self.run.summary["stop_reason"] = stop.get("reason")
            if stop.get("best_val") is not None:
                self.run.summary["best_eval_loss"] = stop["best_val"]
        self.run.finish(exit_code=0 if stop and stop.get("reason") in OK_STOPS else 1)


class MLflow:
    def __init__(self, run_dir: Path, config: dict, name: str):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlxtune")
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name,
                                             tags={"mlxtune.run_dir": str(run_dir)}).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in values.items()])

    def finish(self, stop: dict | None) -> None:
        reason = stop.get("reason") if stop else None
        if reason is not None:
            self.client.set_tag(self.run_id, "stop_reason", reason)
        status = ("FINISHED" if reason in OK_STOPS else
                  "KILLED" if reason == "interrupted" else "FAILED")
        self.client.set_terminated(self.run_id, status)


class Trackio:
    def __init__(self, run_dir: Path, config: dict, name: str):
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "mlxtune"),
                                name=name, config=config, resume="allow", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, stop: dict | None) -> None:
        import trackio
        from trackio import context_vars

        if context_vars.current_run.get() is self.run:
            trackio.finish()   # also forgets the run, so its exit hook does not finish it again
        else:
            self.run.finish()


OK_STOPS = ("done", "early_stopping")
TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def _run_id(run_dir: Path) -> str:
    """A W&B id that a resumed run (same directory) finds again."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


# -- fed by EventWriter -------------------------------------------------------------------

class Tracking:
    """The trackers of one run, fed every record EventWriter writes."""

    def __init__(self, trackers: dict):
        self.trackers = trackers
        self.stop: dict | None = None

    def log(self, record: dict) -> None:
        if record.get("event") == "stop":
            self.stop = record
        found = metrics(record)
        if found is None or not found[1]:
            return
        step, values = found
        for name, tracker in list(self.trackers.items()):
            try:
                with _quiet_stdout():
                    tracker.log(step, values)
            except Exception as e:  # noqa: BLE001  (a tracker never stops training)
                self._drop(name, e)

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                with _quiet_stdout():
                    tracker.finish(self.stop)
            except Exception as e:  # noqa: BLE001
                self._drop(name, e)
        self.trackers = {}

    def _drop(self, name: str, error: Exception) -> None:
        self.trackers.pop(name, None)
        print(f"mlxtune: warning: train.report_to: {name} stopped logging "
              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''});"
              " events.jsonl has every record", file=sys.stderr)


def start(run_dir: Path, record: dict) -> Tracking | None:
    """The trackers the start event's config names, started; None when it names none."""
    config = record.get("config") or {}
    names = ((config.get("train") or {}).get("report_to")) or []
    if not names:
        return None
    check(names)
    run_dir = Path(run_dir)
    started = {}
    for name in names:
        try:
            with _quiet_stdout():
                started[name] = TRACKERS[name](run_dir, config, run_dir.name)
        except Exception as e:  # noqa: BLE001
            Tracking(started).close()
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            hint = " (WANDB_MODE=offline logs without a network)" if name == "wandb" else ""
            raise TrackingError(f"train.report_to: {name} could not start: {first}{hint}")
    return Tracking(started)
