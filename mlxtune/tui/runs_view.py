"""The runs view: every run directory under the runs folder; open, compare, eval, export.

A worker thread re-reads the folder every few seconds (only the new part of each
events.jsonl) and posts plain rows; the table and the curve are drawn from those.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Label, OptionList, Static
from textual.worker import get_current_worker

from mlxtune.tui.common import MessageLine, NavBar, status_text
from mlxtune.tui.curve import (OTHER_TRAIN_COLOR, OTHER_VAL_COLOR, TRAIN_COLOR, VAL_COLOR,
                               Curve, Series, legend)
from mlxtune.tui.history import (EventsTail, RunHistory, format_duration, list_runs,
                                 read_eval)
from mlxtune.tui.process import export_run

EXPORT_FORMATS = ("gguf", "peft", "mlx-fused", "gguf-fused", "ollama")
STALLED_AFTER_S = 600  # a run with no stop event and no event for this long is shown stalled
PERCENT_KEYS = {"exact_match", "json_valid", "schema_match", "reward_accuracy", "stopped"}
COMPARE_COLORS = ((TRAIN_COLOR, VAL_COLOR), (OTHER_TRAIN_COLOR, OTHER_VAL_COLOR))
COLUMNS = ("run", "status", "steps", "best val", "time")


@dataclass(frozen=True)
class RunRow:
    run_dir: Path
    status: str
    step: int
    total: int | None
    best_val: float | None
    duration: float
    train: tuple[tuple[int, float], ...]
    val: tuple[tuple[int, float], ...]
    eval: dict | None

    @property
    def name(self) -> str:
        return self.run_dir.name


SIDES = ("base", "few_shot", "start", "tuned")


def eval_sides(result: dict) -> list[str]:
    """The sides eval.json holds, in eval's order (few_shot shown as 'K-shot')."""
    return [s for s in SIDES if isinstance(result.get(s), dict)]


def side_label(name: str, result: dict) -> str:
    if name == "few_shot":
        return f"{(result.get('few_shot_setup') or {}).get('shots', 'k')}-shot"
    return name


def eval_rows(result: dict) -> list[tuple[str, ...]]:
    """(metric, value per side) for the numbers the tuned side (and the others) report."""
    names = eval_sides(result)
    others = [result[s] for s in names if s != "tuned"]
    tuned = result.get("tuned") or {}
    rows = []
    keys = [k for k in tuned if any(k in o for o in others)] or list(tuned)
    for key in keys:
        values = [result[s].get(key) for s in names]
        if not all(isinstance(v, (int, float)) or v is None for v in values):
            continue

        def fmt(v):
            if v is None:
                return "-"
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if key in PERCENT_KEYS:
                return f"{100 * v:.1f}%"
            return str(v) if isinstance(v, int) else f"{v:.4g}"

        rows.append((key.replace("_", " "), *(fmt(v) for v in values)))
    return rows


def eval_summary(result: dict | None, keys=("loss", "json_valid", "exact_match",
                                            "schema_match", "metric")) -> str:
    """'eval (test): loss 1.44→0.08, ...' (base→tuned); with a verdict (eval.json of
    mlxtune 0.1 onwards), the verdict on a line of its own above it."""
    if not result:
        return ""
    names = eval_sides(result)
    rows = {r[0]: dict(zip(names, r[1:])) for r in eval_rows(result)}
    first = "base" if "base" in names else names[0] if names else None
    parts = [f"{k.replace('_', ' ')} {rows[k.replace('_', ' ')].get(first, '-')}→"
             f"{rows[k.replace('_', ' ')].get('tuned', '-')}"
             for k in keys if k.replace("_", " ") in rows]
    line = f"eval ({result.get('split', '?')}): " + ", ".join(parts[:3])
    forgetting = result.get("forgetting")
    if isinstance(forgetting, dict) and forgetting.get("changed") is not None:
        added = forgetting.get("added_nats_per_token")
        line += (f"; forgetting: {100 * forgetting['changed']:.0f}% of general answers "
                 f"changed" + (f", {added:+.3f} nats/token" if added is not None else ""))
    verdict = result.get("verdict")
    return f"{verdict}\n{line}" if verdict else line


class RunsScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Open"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("v", "eval", "Eval"),
        Binding("e", "export", "Export"),
        Binding("g", "refresh", "Refresh", show=False),
    ]
    DEFAULT_CSS = """
    RunsScreen #table { height: auto; max-height: 10; }
    RunsScreen #overlay { border: round $primary; height: 1fr; }
    RunsScreen #eval-line { height: auto; max-height: 2; padding: 0 1; color: $text-muted;
                            text-wrap: nowrap; text-overflow: ellipsis; }
    """

    class Rows(Message):
        def __init__(self, rows: list[RunRow]):
            super().__init__()
            self.rows = rows

    class Exported(Message):
        def __init__(self, code: int, line: str):
            super().__init__()
            self.code, self.line = code, line

    def __init__(self):
        super().__init__()
        self.rows: list[RunRow] = []
        self.marked: list[Path] = []
        self.comparing: tuple[Path, Path] | None = None
        self._refresh_now = True

    def compose(self) -> ComposeResult:
        yield NavBar("runs", id="nav")
        table = DataTable(id="table", cursor_type="row", zebra_stripes=True)
        for key in COLUMNS:
            table.add_column(key, key=key)
        yield table
        yield Static(id="eval-line")
        yield Curve(id="overlay", empty="no runs here yet")
        yield MessageLine(id="message")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#nav", NavBar).set_context(str(self.app.runs_root))
        self.run_worker(self._watch, thread=True, group="watch", exclusive=True)

    # ------------------------------------------------------------------ reading runs

    def _watch(self) -> None:
        worker = get_current_worker()
        cache: dict[Path, tuple[EventsTail, RunHistory, float, dict | None]] = {}
        last = 0.0
        while not worker.is_cancelled:
            if self._refresh_now or time.monotonic() - last > 2.0:
                self._refresh_now = False
                last = time.monotonic()
                self.post_message(self.Rows(self._read(cache)))
            time.sleep(0.1)

    def _read(self, cache) -> list[RunRow]:
        rows, now = [], time.time()
        for run_dir in list_runs(self.app.runs_root):
            tail, history, eval_mtime, ev = cache.get(run_dir) or (
                EventsTail(run_dir), RunHistory(run_dir), -1.0, None)
            events = tail.read_new()
            if tail.restarted:
                history = RunHistory(run_dir)
            history.add(events)
            try:
                mtime = (run_dir / "eval.json").stat().st_mtime
            except OSError:
                mtime = -1.0
            if mtime != eval_mtime:
                ev = read_eval(run_dir) if mtime >= 0 else None
            cache[run_dir] = (tail, history, mtime, ev)
            status = history.status
            if status == "running" and history.last_time is not None \
                    and now - history.last_time > STALLED_AFTER_S:
                status = "stalled"
            rows.append(RunRow(run_dir, status, history.step, history.total_steps,
                               history.best_val, history.duration(),
                               tuple((p["step"], p["loss"]) for p in history.train),
                               tuple(history.val), ev))
        return rows

    def on_runs_screen_rows(self, message: Rows) -> None:
        table = self.query_one("#table", DataTable)
        selected = self.selected
        same_runs = [r.run_dir for r in message.rows] == [r.run_dir for r in self.rows]
        self.rows = message.rows
        if same_runs:  # update in place: no flicker, the cursor stays
            for row in self.rows:
                for col, value in zip(COLUMNS, self._cells(row)):
                    table.update_cell(str(row.run_dir), col, value)
        else:
            table.clear()
            for row in self.rows:
                table.add_row(*self._cells(row), key=str(row.run_dir))
            if selected is not None:
                for i, row in enumerate(self.rows):
                    if row.run_dir == selected.run_dir:
                        table.move_cursor(row=i, animate=False)
            table.refresh(layout=True)
        self._draw()

    def _cells(self, row: RunRow) -> tuple:
        # The marker's room is kept on every row, so marking never resizes the column.
        name = Text(("● " if row.run_dir in self.marked else "  ") + row.name,
                    "bold" if row.run_dir in self.marked else "")
        steps = f"{row.step}/{row.total}" if row.total else str(row.step)
        best = f"{row.best_val:.4f}" if row.best_val is not None else "-"
        return (name, status_text(row.status), steps, best, format_duration(row.duration))

    # ------------------------------------------------------------------ selection

    @property
    def selected(self) -> RunRow | None:
        table = self.query_one("#table", DataTable)
        if not self.rows or table.cursor_row is None or table.cursor_row >= len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def _row(self, run_dir: Path) -> RunRow | None:
        return next((r for r in self.rows if r.run_dir == run_dir), None)

    def on_data_table_row_highlighted(self, _event) -> None:
        if self.comparing is None:
            self._draw()

    async def on_data_table_row_selected(self, _event) -> None:
        await self.action_open()

    def _draw(self) -> None:
        curve = self.query_one("#overlay", Curve)
        if self.comparing is not None:
            rows = [self._row(p) for p in self.comparing]
            rows = [r for r in rows if r is not None]
        else:
            rows = [self.selected] if self.selected is not None else []
        series = []
        for tag, row, (c_train, c_val) in zip("AB", rows, COMPARE_COLORS):
            prefix = f"{tag} " if self.comparing else ""
            series.append(Series(f"{prefix}train", list(row.train), c_train))
            series.append(Series(f"{prefix}val", list(row.val), c_val, smoothable=False,
                                 markers=True))
        curve.series = series
        curve.smoothing = 0.6
        curve.x_max = max((r.total or 0 for r in rows), default=0) or None
        if self.comparing and len(rows) == 2:
            curve.border_title = f"A {rows[0].name}  vs  B {rows[1].name}"
        else:
            curve.border_title = f"loss · {rows[0].name}" if rows else "loss"
        curve.border_subtitle = legend(series).markup
        curve.refresh()
        line = eval_summary(rows[0].eval) if len(rows) == 1 else ""
        self.query_one("#eval-line", Static).update(
            Text(line or ("c: back to one run" if self.comparing else
                          "space marks runs; c compares two"), no_wrap=True,
                 overflow="ellipsis"))

    # ------------------------------------------------------------------ actions

    def action_refresh(self) -> None:
        self._refresh_now = True

    async def action_open(self) -> None:
        row = self.selected
        if row is not None:
            await self.app.open_run(row.run_dir)

    def action_mark(self) -> None:
        row = self.selected
        if row is None:
            return
        if row.run_dir in self.marked:
            self.marked.remove(row.run_dir)
        else:
            self.marked = (self.marked + [row.run_dir])[-2:]
        table = self.query_one("#table", DataTable)
        for r in self.rows:
            table.update_cell(str(r.run_dir), "run", self._cells(r)[0], update_width=True)

    def action_compare(self) -> None:
        if self.comparing is not None:
            self.comparing = None
            self._draw()
            return
        pair = list(self.marked)
        row = self.selected
        if len(pair) == 1 and row is not None and row.run_dir not in pair:
            pair.append(row.run_dir)
        if len(pair) != 2:
            self.say("mark two runs with space (or one, and select the other), then c")
            return
        self.comparing = (pair[0], pair[1])
        self._draw()
        self.say(f"comparing {pair[0].name} (A) with {pair[1].name} (B)")

    def action_eval(self) -> None:
        row = self.selected
        if row is None:
            return
        if not row.eval:
            self.say(f"{row.name} has no eval.json (mlxtune eval {row.run_dir})")
            return
        self.app.push_screen(EvalDialog(row.name, row.eval))

    def action_export(self) -> None:
        row = self.selected
        if row is None:
            return
        run_dir = row.run_dir

        def chosen(fmt: str | None) -> None:
            if fmt:
                self.say(f"exporting {run_dir.name} to {fmt} ...")
                self.run_worker(lambda: self._export(run_dir, fmt), thread=True,
                                group="export")

        self.app.push_screen(ExportDialog(run_dir.name), chosen)

    def _export(self, run_dir: Path, fmt: str) -> None:
        code, line = export_run(run_dir, fmt)
        self.post_message(self.Exported(code, line))

    def on_runs_screen_exported(self, message: Exported) -> None:
        if message.code == 0:
            self.say(f"exported: {message.line}", "ok")
        else:
            self.say(message.line or f"mlxtune export exited with code {message.code}",
                     "error")

    def say(self, text: str, level: str = "info") -> None:
        self.query_one("#message", MessageLine).say(text, level)


class EvalDialog(ModalScreen):
    DEFAULT_CSS = """
    EvalDialog { align: center middle; }
    EvalDialog > Vertical { width: 70; max-height: 22; height: auto; border: thick $primary;
                            background: $surface; padding: 0 1; }
    EvalDialog DataTable { height: auto; max-height: 16; }
    EvalDialog #verdict, EvalDialog #forgetting { width: 100%; height: auto; }
    """
    BINDINGS = [("escape", "dismiss", "Close"), ("v", "dismiss", "Close")]

    def __init__(self, name: str, result: dict):
        super().__init__()
        self.run_name, self.result = name, result

    def compose(self) -> ComposeResult:
        r = self.result
        with Vertical():
            yield Label(Text(f"eval.json of {self.run_name}", "bold"))
            yield Label(f"{r.get('split', '?')} split, {r.get('split_examples', '?')} "
                        f"examples; adapter {Path(str(r.get('adapter', '?'))).name}/")
            if r.get("verdict"):
                yield Static(Text(r["verdict"]), id="verdict")
            table = DataTable(show_cursor=False)
            table.add_columns("metric", *(side_label(n, r) for n in eval_sides(r)))
            for row in eval_rows(r):
                table.add_row(*row)
            yield table
            f = r.get("forgetting")
            if isinstance(f, dict) and f.get("changed") is not None:
                added = f.get("added_nats_per_token")
                yield Static(Text(f"forgetting ({f.get('prompts', '?')} general prompts): "
                                  f"{100 * f['changed']:.0f}% of answers changed"
                                  + (f", {added:+.3f} nats/token on the base's answers"
                                     if added is not None else "")), id="forgetting")
            yield Label(Text("escape closes", "dim"))


class ExportDialog(ModalScreen[str]):
    DEFAULT_CSS = """
    ExportDialog { align: center middle; }
    ExportDialog > Vertical { width: 50; height: auto; border: thick $primary;
                              background: $surface; padding: 0 1; }
    ExportDialog OptionList { height: auto; }
    """
    BINDINGS = [("escape", "dismiss", "Cancel")]

    def __init__(self, name: str):
        super().__init__()
        self.run_name = name

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(f"export {self.run_name} to", "bold"))
            yield OptionList(*EXPORT_FORMATS, id="formats")
            yield Label(Text("enter exports (mlxtune export), escape cancels", "dim"))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(EXPORT_FORMATS[event.option_index])
