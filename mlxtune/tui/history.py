"""What the TUI knows about a run, built from its events.jsonl (DESIGN.md section 3).

Plain Python (no Textual, no MLX), so that it can be read and tested on its own: the TUI's
workers tail the file with `EventsTail` and feed the events to a `RunHistory`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

EVENTS_FILE = "events.jsonl"  # same name as mlxtune.train.events (kept import-free here)
EVAL_FILE = "eval.json"
CONFIG_FILE = "config.yaml"


class EventsTail:
    """The events appended to RUN_DIR/events.jsonl since the last call.

    A last line without its newline is held back until the rest arrives; a line that is
    not a JSON object with an "event" (a torn line the writer left when it was killed) is
    skipped. If the file is replaced by a shorter one, `restarted` is set and reading
    starts over.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVENTS_FILE
        self._offset = 0
        self._pending = b""
        self.restarted = False

    def read_new(self) -> list[dict]:
        self.restarted = False
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return []
        if size < self._offset:
            self._offset, self._pending, self.restarted = 0, b"", True
        if size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        events = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                events.append(obj)
        return events


def _number(value) -> float | None:
    # The writer stores NaN / inf as strings ("nan"); a curve skips them.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _checkpoint_step(path: str | None) -> int | None:
    m = re.search(r"step-(\d+)/?$", str(path or ""))
    return int(m.group(1)) if m else None


@dataclass
class RunHistory:
    """A run's curves and state, updated event by event."""

    run_dir: Path | None = None
    train: list[dict] = field(default_factory=list)   # step, loss, lr, tokens_per_sec, ...
    val: list[tuple[int, float]] = field(default_factory=list)
    val_reward: list[tuple[int, float]] = field(default_factory=list)  # grpo: val `reward`
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)
    stop: dict | None = None                          # the stop of the latest session
    eval: dict | None = None                          # the latest eval event
    last_time: float | None = None
    _session_time: list[float] = field(default_factory=list)  # seconds per session

    def add(self, events: list[dict]) -> None:
        for e in events:
            self._add(e)

    def _add(self, e: dict) -> None:
        kind, t = e.get("event"), _number(e.get("time"))
        if kind == "start":
            if self.starts:
                self._session_time.append(self._current_session_time())
            self.starts.append(e)
            self.stop = None
            # A resumed session starts again from its checkpoint: drop what came after it
            # (steps a killed session logged but never saved), so the curve does not fold.
            step = _checkpoint_step(e.get("resumed_from"))
            if step is not None:
                self.train = [p for p in self.train if p["step"] <= step]
                self.val = [p for p in self.val if p[0] <= step]
                self.val_reward = [p for p in self.val_reward if p[0] <= step]
        elif kind == "train":
            loss = _number(e.get("loss"))
            if loss is not None and isinstance(e.get("step"), int):
                self.train.append({"step": e["step"], "loss": loss, "time": t,
                                   "lr": _number(e.get("lr")),
                                   "tokens_per_sec": _number(e.get("tokens_per_sec")),
                                   "peak_memory_gb": _number(e.get("peak_memory_gb")),
                                   "tokens": e.get("tokens"),
                                   # preference objectives (TRL's names)
                                   "reward_accuracy": _number(e.get("rewards/accuracies")),
                                   "reward_margin": _number(e.get("rewards/margins")),
                                   # grpo: the rollout batch's mean reward
                                   "reward": _number(e.get("reward"))})
        elif kind == "val":
            loss = _number(e.get("loss"))
            if loss is not None and isinstance(e.get("step"), int):
                self.val.append((e["step"], loss))
                reward = _number(e.get("reward"))
                if reward is not None:
                    self.val_reward.append((e["step"], reward))
        elif kind == "checkpoint":
            self.checkpoints.append((e.get("step"), e.get("path")))
        elif kind == "stop":
            self.stop = e
        elif kind == "eval" and not e.get("data"):  # not an eval on another data file
            self.eval = e
        if t is not None:
            self.last_time = t

    # ------------------------------------------------------------------ derived facts

    @property
    def name(self) -> str:
        if self.run_dir is not None:
            return Path(self.run_dir).name
        return "(no run)"

    @property
    def config(self) -> dict:
        return self.starts[-1].get("config") or {} if self.starts else {}

    @property
    def status(self) -> str:
        """'empty', 'running' (no stop event yet), or the stop reason."""
        if self.stop is not None:
            return str(self.stop.get("reason", "stopped"))
        return "running" if self.starts else "empty"

    @property
    def step(self) -> int:
        steps = [self.train[-1]["step"]] if self.train else []
        if self.stop is not None and isinstance(self.stop.get("step"), int):
            steps.append(self.stop["step"])
        return max(steps, default=0)

    @property
    def total_steps(self) -> int | None:
        iters = (self.config.get("train") or {}).get("iters")
        return iters if isinstance(iters, int) else None

    @property
    def grpo(self) -> bool:
        """A GRPO run: its train events carry the reward (its val loss is minus the
        reward, docs/design.md)."""
        return (self.config.get("objective") or {}).get("type") == "grpo" or any(
            p["reward"] is not None for p in self.train)

    @property
    def best_val(self) -> float | None:
        return min((v for _, v in self.val), default=None)

    @property
    def planned_peak_gb(self) -> float | None:
        return _number(self.starts[-1].get("planned_peak_gb")) if self.starts else None

    @property
    def peak_memory_gb(self) -> float | None:
        return max((p["peak_memory_gb"] for p in self.train
                    if p["peak_memory_gb"] is not None), default=None)

    @property
    def last_checkpoint(self) -> int | None:
        return self.checkpoints[-1][0] if self.checkpoints else None

    def duration(self, now: float | None = None) -> float:
        """Seconds spent in all sessions (a gap between a stop and a resume not counted);
        the latest session counts until `now` when given (a run still going)."""
        return sum(self._session_time) + (self._current_session_time(now) if self.starts
                                          else 0.0)

    def _current_session_time(self, now: float | None = None) -> float:
        t0 = _number(self.starts[-1].get("time"))
        end = now if now is not None else self.last_time
        if t0 is None or end is None:
            return 0.0
        return max(end - t0, 0.0)

    def seconds_per_step(self) -> float | None:
        """From the latest session's train events (its first step includes start-up)."""
        if not self.starts:
            return None
        t0 = _number(self.starts[-1].get("time"))
        session = [p for p in self.train if p["time"] is not None and t0 is not None
                   and p["time"] >= t0]
        if len(session) >= 2:
            a, b = session[0], session[-1]
        elif session:
            a, b = {"time": t0, "step": _checkpoint_step(
                self.starts[-1].get("resumed_from")) or 0}, session[0]
        else:
            return None
        if b["step"] <= a["step"]:
            return None
        return (b["time"] - a["time"]) / (b["step"] - a["step"])

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Time left until the last step, counted from the latest train event (or `now`)."""
        total, rate = self.total_steps, self.seconds_per_step()
        if self.status != "running" or total is None or rate is None or not self.train:
            return None
        left = rate * (total - self.step)
        if now is not None and self.train[-1]["time"] is not None:
            left -= max(now - self.train[-1]["time"], 0.0)
        return max(left, 0.0)


def load_history(run_dir: Path) -> RunHistory:
    history = RunHistory(Path(run_dir))
    history.add(EventsTail(run_dir).read_new())
    return history


def read_eval(run_dir: Path) -> dict | None:
    """RUN_DIR/eval.json, or None when absent or unreadable (it is written atomically)."""
    try:
        return json.loads((Path(run_dir) / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / EVENTS_FILE).exists() or (path / CONFIG_FILE).exists())


def list_runs(root: Path) -> list[Path]:
    """Run directories directly under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if is_run_dir(p)]

    def mtime(p: Path) -> float:
        for name in (EVENTS_FILE, CONFIG_FILE):
            try:
                return (p / name).stat().st_mtime
            except OSError:
                continue
        return 0.0

    return sorted(runs, key=lambda p: (mtime(p), p.name), reverse=True)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (weight 0: unchanged)."""
    if weight <= 0:
        return list(values)
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = avg * weight + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def now() -> float:
    return time.time()
