"""events.jsonl: one JSON object per line, appended and flushed as it happens.

Every line has "event" and "time" (unix seconds); DESIGN.md section 3 lists the kinds and
their fields. Readers tolerate a torn last line: the writer may be killed mid-write.
The writer also feeds the experiment trackers a run's train.report_to names
(mlxtune.train.tracking): the start event's config opens them, close() closes them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


def _clean(value):
    # JSON has no NaN/inf; write them as strings so the line stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled
        self._file = None
        self.tracking = None  # mlxtune.train.tracking.Tracking, opened by the start event
        if enabled:
            self._file = open(self.path, "a", encoding="utf-8")
            # A torn last line from a killed writer would swallow our first record.
            if self._file.tell() > 0 and not self.path.read_bytes().endswith(b"\n"):
                self._file.write("\n")

    def emit(self, event: str, **fields) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **_clean(fields)}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if event == "start" and self.tracking is None:
                from mlxtune.train import tracking

                self.tracking = tracking.start(self.path.parent, record)
            if self.tracking is not None:
                self.tracking.log(record)
        return record

    def close(self) -> None:
        if self.tracking is not None:
            self.tracking.close()
            self.tracking = None
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> list[dict]:
    """All complete events; a torn or garbled line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    events = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return events
    except IsADirectoryError:  # the run directory was made after is_dir() looked
        return read_events(path / EVENTS_FILE)
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "event" in obj:
            events.append(obj)
    return events
