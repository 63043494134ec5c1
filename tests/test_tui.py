"""The TUI (mlxtune.tui) driven with Textual's run_test + Pilot, on tiny models.

Training runs as a real `mlxtune run` child process here, as it does for a user.
Snapshots (SVG) of the three views are compared with tests/snapshots/*.svg; after a
deliberate change of the UI, rewrite them with MLXTUNE_UPDATE_SNAPSHOTS=1 and look at
them before committing.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE_SNAPSHOTS = os.environ.get("MLXTUNE_UPDATE_SNAPSHOTS") == "1"


def chat(i: int) -> dict:
    colors = ["red", "green", "blue", "amber", "violet"]
    return {"messages": [
        {"role": "user", "content": f"color {i}?"},
        {"role": "assistant", "content": f"the color is {colors[i % len(colors)]}"}]}


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(24)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 108)])
    return tmp_path


def write_config(workdir: Path, model_dir: Path, name="tiny", **train) -> Path:
    config = {
        "name": name,
        "model": {"path": str(model_dir)},
        "adapter": {"rank": 4, "alpha": 8},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "max_seq_len": 64},
        "train": {"iters": 12, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 4,
                  "save_every": 4, "log_every": 2, "seed": 3, **train},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_app(target=None, runs_root=None, **kw):
    from mlxtune.tui.app import MlxtuneApp

    return MlxtuneApp(target, runs_root=runs_root or "runs", machine_gb=24.0,
                      redraw_s=0.1, poll_s=0.05, **kw)


async def wait_for(pilot, condition, timeout=90.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def screen_text(app) -> str:
    """The screen as plain text, line by line."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def run_app(app, body, size=(80, 24)):
    async def main():
        async with app.run_test(size=size) as pilot:
            await body(pilot)
    asyncio.run(main())


# ---------------------------------------------------------------------- history (no UI)


def test_events_tail_holds_a_torn_line_and_skips_garbage(tmp_path):
    from mlxtune.tui.history import EventsTail

    path = tmp_path / "events.jsonl"
    tail = EventsTail(tmp_path)
    assert tail.read_new() == []  # no file yet
    path.write_bytes(b'{"event": "start", "time": 1}\n{"event": "train", "st')
    assert [e["event"] for e in tail.read_new()] == ["start"]
    with open(path, "ab") as f:  # the rest of the line arrives
        f.write(b'ep": 1, "loss": 2.0, "time": 2}\n{"event": "tra')
    got = tail.read_new()
    assert [(e["event"], e["step"]) for e in got] == [("train", 1)]
    with open(path, "ab") as f:  # the writer was killed; a resumed one starts a new line
        f.write(b'\n{"event": "start", "time": 3}\nnot json\n[1, 2]\n')
    assert [e["event"] for e in tail.read_new()] == ["start"]
    path.write_bytes(b'{"event": "start", "time": 9}\n')  # replaced by a shorter file
    assert [e["time"] for e in tail.read_new()] == [9] and tail.restarted


def test_run_history_resume_drops_steps_after_the_checkpoint():
    from mlxtune.tui.history import RunHistory

    h = RunHistory()
    cfg = {"train": {"iters": 10}}
    h.add([{"event": "start", "time": 100.0, "config": cfg, "planned_peak_gb": 2.5}]
          + [{"event": "train", "time": 100.0 + s, "step": s, "loss": 3.0 / s, "lr": 1e-3,
              "tokens_per_sec": 50.0, "peak_memory_gb": 1.0 + s / 10} for s in (1, 2, 3, 4, 5)]
          + [{"event": "val", "time": 104.5, "step": 4, "loss": 0.9},
             {"event": "checkpoint", "time": 104.6, "step": 4, "path": "/r/checkpoints/step-4"}])
    assert h.status == "running" and h.step == 5 and h.total_steps == 10
    assert h.seconds_per_step() == pytest.approx(1.0)
    assert h.eta_seconds() == pytest.approx(5.0)
    assert h.planned_peak_gb == 2.5 and h.peak_memory_gb == pytest.approx(1.5)
    # Killed after step 5 (no stop event), resumed from step 4 at t=200.
    h.add([{"event": "start", "time": 200.0, "config": cfg,
            "resumed_from": "/r/checkpoints/step-4"},
           {"event": "train", "time": 202.0, "step": 5, "loss": 0.5},
           {"event": "stop", "time": 203.0, "step": 6, "reason": "interrupted"}])
    assert [p["step"] for p in h.train] == [1, 2, 3, 4, 5]
    assert h.train[-1]["loss"] == 0.5 and h.status == "interrupted" and h.step == 6
    assert h.duration() == pytest.approx(4.6 + 3.0)  # the gap between sessions not counted
    assert h.eta_seconds() is None  # not running
    h.add([{"event": "train", "time": 204.0, "step": 7, "loss": "nan"}])  # skipped
    assert len(h.train) == 5


def test_smoothing_matches_a_debiased_ema():
    from mlxtune.tui.history import smooth

    values = [4.0, 2.0, 1.0, 3.0]
    w = 0.6
    expected, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = w * avg + (1 - w) * v
        expected.append(avg / (1 - w ** i))
    assert smooth(values, w) == pytest.approx(expected)
    assert smooth(values, 0.0) == values
    assert smooth([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])


def _dot_rows(chart) -> list[int]:
    """For each column of a chart's plot area, the row of its first drawn cell."""
    rows = chart.plain().splitlines()[:-1]
    start = rows[0].index("┤") + 1
    cols = []
    for c in range(start, len(rows[0])):
        hit = [r for r, line in enumerate(rows) if c < len(line) and line[c] not in " "]
        cols.append(hit[0] if hit else None)
    return cols


def test_plot_draws_a_falling_curve_and_log_scale_labels():
    from mlxtune.tui.curve import Series, plot

    pts = [(s, 10.0 * 0.9 ** s) for s in range(1, 41)]
    chart = plot([Series("train", pts)], width=50, height=10)
    assert len(chart.rows) == 10 and all(len(r) <= 50 for r in chart.plain().splitlines())
    rows = [r for r in _dot_rows(chart) if r is not None]
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] == 8  # falls top to bottom
    assert chart.plain().splitlines()[0].split("┤")[0].strip() == f"{10 * 0.9:.4g}"
    # On a log axis an exponential decay is a straight line: equal drops per column.
    log_chart = plot([Series("train", pts)], width=50, height=10, log_y=True)
    labels = [ln.split("┤")[0].strip() for ln in log_chart.plain().splitlines() if "┤" in ln]
    assert float(labels[1]) == pytest.approx(math.sqrt(9.0 * 10 * 0.9 ** 40), rel=1e-3)
    # x_max leaves room on the right for the steps still to come.
    half = plot([Series("train", pts)], width=50, height=10, x_max=80)
    drawn = [c for c, r in enumerate(_dot_rows(half)) if r is not None]
    assert max(drawn) < 0.55 * len(_dot_rows(half))
    assert plot([], 40, 5).plain().startswith("no data yet")


# ---------------------------------------------------------------------- the engine stays UI-free


def test_engine_imports_without_textual():
    code = ("import sys, mlxtune, mlxtune.cli, mlxtune.config, mlxtune.run, mlxtune.train.loop, "
            "mlxtune.data, mlxtune.models, mlxtune.evaluate, mlxtune.export\n"
            "try:\n    import mlxtune.memory\nexcept ImportError:\n    pass\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'mlxtune') "
            "and (m.startswith('textual') or m.startswith('mlxtune.tui')))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tui_command_is_listed_and_checks_its_argument(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlxtune", "tui", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------- train view


def test_start_shows_the_curve_growing_then_stop_leaves_a_checkpoint_and_resume(
        workdir, tiny_model_dir):
    from mlxtune.tui.curve import Curve
    from mlxtune.tui.history import list_runs, load_history
    from mlxtune.tui.train_view import TrainScreen

    config = write_config(workdir, tiny_model_dir, iters=100000, log_every=1, eval_every=20,
                          save_every=0)
    runs = workdir / "runs"
    app = make_app(config, runs)

    async def body(pilot):
        await pilot.press("2")
        screen = app.screen
        assert isinstance(screen, TrainScreen)
        await pilot.press("s")
        await wait_for(pilot, lambda: len(screen.history.train) >= 3, what="train events")
        curve = screen.query_one("#loss", Curve)
        await wait_for(pilot, lambda: len(curve.series[0].points) >= 3, what="curve drawn")
        first = len(curve.series[0].points)
        await wait_for(pilot, lambda: len(curve.series[0].points) > first + 5,
                       what="the curve to grow")
        assert screen.status == "running"
        assert app.child is not None and app.child.alive
        assert screen.run_dir.parent == runs and screen.run_dir.name.startswith("tiny-")

        await pilot.press("x")  # graceful stop: SIGINT, the trainer checkpoints
        await wait_for(pilot, lambda: not app.child.alive, what="the child to exit")
        assert app.child.popen.returncode == 130
        await wait_for(pilot, lambda: screen.history.status == "interrupted", what="stop")
        # The message follows the stop event on the UI's next refresh.
        await wait_for(pilot, lambda: "stopped at step" in screen.query_one("#message").text,
                       what="the stop message")
        message = screen.query_one("#message").text
        step = screen.history.step
        assert f"stopped at step {step}; checkpoint step-{step} saved" in message
        assert (screen.run_dir / "checkpoints" / f"step-{step}" / "state.json").exists()

        await pilot.press("r")  # resume from that checkpoint, same run directory
        await wait_for(pilot, lambda: len(screen.history.starts) == 2, what="resumed start")
        assert screen.history.starts[1]["resumed_from"].endswith(f"step-{step}")
        await wait_for(pilot, lambda: screen.history.train[-1]["step"] > step + 2,
                       what="training after resume")
        await pilot.press("x")
        await wait_for(pilot, lambda: not app.child.alive, what="the second stop")
        assert app.child.popen.returncode == 130

    run_app(app, body)
    (run_dir,) = list_runs(runs)
    h = load_history(run_dir)
    assert "interrupted" in (runs / ".logs" / f"{run_dir.name}.log").read_text()  # the log
    steps = [p["step"] for p in h.train]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # resumed, not restarted


def test_quit_while_training_asks_and_can_stop_the_run(workdir, tiny_model_dir):
    from mlxtune.tui.common import QuitDialog

    config = write_config(workdir, tiny_model_dir, iters=100000, log_every=1, eval_every=0,
                          save_every=0)
    app = make_app(config, workdir / "runs")

    async def body(pilot):
        await pilot.press("2", "s")
        await wait_for(pilot, lambda: len(app.screen.history.train) >= 2, what="training")
        await pilot.press("q")
        await pilot.pause(0.2)
        assert isinstance(app.screen, QuitDialog)
        await pilot.click("#stop")
        await wait_for(pilot, lambda: not app.is_running, what="the app to quit")

    run_app(app, body)
    assert app.child.wait(timeout=60) == 130
    assert list((app.child_run_dir / "checkpoints").glob("step-*"))


def test_curve_redraws_at_a_bounded_rate_however_fast_events_arrive(tmp_path, monkeypatch):
    import threading

    from mlxtune.tui.curve import Curve

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "fast"
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text(json.dumps(
        {"event": "start", "time": T0, "config": {"train": {"iters": 4000}}}) + "\n")
    renders = []
    original = Curve.render
    monkeypatch.setattr(Curve, "render", lambda self: renders.append(1) or original(self))
    app = make_app(run_dir, tmp_path / "runs")
    app.redraw_s = 0.25

    def writer():  # 4000 train events in 40 bursts over about 2 s
        with open(run_dir / "events.jsonl", "a") as f:
            for burst in range(40):
                for i in range(100):
                    step = burst * 100 + i + 1
                    f.write(json.dumps({"event": "train", "time": T0 + step, "step": step,
                                        "loss": 3.0 / step ** 0.5}) + "\n")
                f.flush()
                time.sleep(0.05)

    async def body(pilot):
        screen = app.screen
        await pilot.pause(0.5)
        before, start = len(renders), time.monotonic()
        thread = threading.Thread(target=writer)
        thread.start()
        await wait_for(pilot, lambda: len(screen.history.train) == 4000, what="all events")
        await pilot.pause(0.6)
        elapsed = time.monotonic() - start
        thread.join()
        curve = screen.query_one("#loss", Curve)
        assert len(curve.series[0].points) == 4000
        assert len(renders) - before <= elapsed / 0.25 + 3, (len(renders) - before, elapsed)

    run_app(app, body)


def test_a_bad_config_shows_the_engines_one_line_error(workdir, tiny_model_dir):
    config = write_config(workdir, tiny_model_dir, learning_rate="fast")
    app = make_app(config, workdir / "runs")

    async def body(pilot):
        await pilot.press("2", "s")
        message = app.screen.query_one("#message")
        await wait_for(pilot, lambda: "error" in message.text, timeout=30)
        assert message.text == (f"mlxtune: error: {config}: train.learning_rate: expected "
                                "number, got 'fast'")
        assert message.has_class("error")

    run_app(app, body)
    assert not (workdir / "runs").exists()


def test_bad_data_fails_in_the_child_and_its_last_line_is_shown(workdir, tiny_model_dir):
    (workdir / "train.jsonl").write_text('{"messages": []}\n')
    config = write_config(workdir, tiny_model_dir)
    app = make_app(config, workdir / "runs")

    async def body(pilot):
        await pilot.press("2", "s")
        message = app.screen.query_one("#message")
        await wait_for(pilot, lambda: message.has_class("error"), what="the child's error")
        assert message.text.startswith(f"mlxtune: error: {workdir / 'train.jsonl'}:1")
        assert app.child.popen.returncode == 2

    run_app(app, body)


def test_attach_to_a_finished_run_directory(workdir, tiny_model_dir):
    config = write_config(workdir, tiny_model_dir)
    run_dir = workdir / "runs" / "done"
    out = subprocess.run([sys.executable, "-m", "mlxtune", "run", str(config), "--run-dir",
                          str(run_dir), "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # A torn last line, as a writer killed mid-write leaves it.
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"event": "train", "step": 13, "lo')
    app = make_app(run_dir, workdir / "runs")

    async def body(pilot):
        from mlxtune.tui.train_view import TrainScreen

        screen = app.screen
        assert isinstance(screen, TrainScreen)
        await wait_for(pilot, lambda: screen.history.status == "done", what="events read")
        h = screen.history
        assert [p["step"] for p in h.train] == [2, 4, 6, 8, 10, 12]
        assert [s for s, _ in h.val] == [0, 4, 8, 12]
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "step 12/12" in text and "done" in text
        await pilot.press("r")
        assert "nothing to resume" in screen.query_one("#message").text
        curve = screen.query_one("#loss")
        assert (curve.log_y, curve.smoothing) == (False, 0.6)
        await pilot.press("l", "m")
        assert (curve.log_y, curve.smoothing) == (True, 0.9)
        assert "smoothing 0.9 · log" in str(curve.border_title)
        await pilot.press("x")
        assert "no run of this TUI" in screen.query_one("#message").text

    run_app(app, body)


# ---------------------------------------------------------------------- runs view


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two finished tiny runs (different learning rates); the first one evaluated."""
    work = tmp_path_factory.mktemp("two-runs")
    write_jsonl(work / "train.jsonl", [chat(i) for i in range(24)])
    write_jsonl(work / "valid.jsonl", [chat(i) for i in range(100, 108)])
    runs = work / "runs"
    dirs = []
    for name, lr in (("slow", 1e-4), ("fast", 3e-3)):
        config = write_config(work, tiny_model_dir, name=name, learning_rate=lr)
        run_dir = runs / name
        out = subprocess.run([sys.executable, "-m", "mlxtune", "run", str(config),
                              "--run-dir", str(run_dir), "-q"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        dirs.append(run_dir)
    out = subprocess.run([sys.executable, "-m", "mlxtune", "eval", str(dirs[1]), "--split",
                          "valid", "--limit", "2", "--max-new-tokens", "4", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return runs, dirs


def _row_index(screen, name):
    return [r.name for r in screen.rows].index(name)


def test_runs_view_lists_runs_compares_two_and_shows_eval(two_runs):
    from mlxtune.tui.curve import Curve
    from mlxtune.tui.history import load_history
    from mlxtune.tui.runs_view import RunsScreen

    runs, (slow, fast) = two_runs
    app = make_app(None, runs)

    async def body(pilot):
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 2, what="the runs")
        # The table is drawn after the rows arrive; on a loaded machine that takes a while.
        await wait_for(pilot, lambda: all(r.name in screen_text(app) for r in (slow, fast)),
                       what="the runs drawn")
        text = screen_text(app)
        for run_dir in (slow, fast):
            h = load_history(run_dir)
            line = next(ln for ln in text.splitlines() if run_dir.name in ln)
            assert "done" in line and "12/12" in line and f"{h.best_val:.4f}" in line

        table = screen.query_one("#table")
        table.move_cursor(row=_row_index(screen, "slow"))
        await pilot.press("space")
        table.move_cursor(row=_row_index(screen, "fast"))
        await pilot.press("c")
        curve = screen.query_one("#overlay", Curve)
        labels = [s.label for s in curve.series]
        assert labels == ["A train", "A val", "B train", "B val"]
        assert curve.series[0].points == [(p["step"], p["loss"])
                                          for p in load_history(slow).train]
        assert curve.series[3].points == list(load_history(fast).val)
        await pilot.pause(0.2)
        assert "A slow  vs  B fast" in screen_text(app)
        await pilot.press("c")  # back to the selected run alone
        assert [s.label for s in curve.series] == ["train", "val"]

        result = json.loads((fast / "eval.json").read_text())
        line = screen.query_one("#eval-line").render()
        assert f"loss {result['base']['loss']:.4g}→{result['tuned']['loss']:.4g}" in str(line)
        await pilot.press("v")
        await pilot.pause(0.2)
        text = screen_text(app)
        assert "eval.json of fast" in text
        loss_line = next(ln for ln in text.splitlines() if " loss " in f" {ln} ")
        assert f"{result['base']['loss']:.4g}" in loss_line
        assert f"{result['tuned']['loss']:.4g}" in loss_line
        await pilot.press("escape")

        table.move_cursor(row=_row_index(screen, "slow"))
        await pilot.press("v")
        assert "has no eval.json" in screen.query_one("#message").text

        await pilot.press("enter")  # open: the train view, attached to it
        from mlxtune.tui.train_view import TrainScreen
        assert isinstance(app.screen, TrainScreen)
        await wait_for(pilot, lambda: app.screen.history.status == "done", what="attach")
        assert app.screen.run_dir == slow

    run_app(app, body)


def test_runs_view_exports_with_the_exporter(two_runs):
    runs, (_, fast) = two_runs
    app = make_app(None, runs)

    async def body(pilot):
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.rows) == 2, what="the runs")
        screen.query_one("#table").move_cursor(row=_row_index(screen, "fast"))
        await pilot.press("e")
        await pilot.pause(0.2)
        await pilot.press("down", "enter")  # the second format: peft
        message = screen.query_one("#message")
        await wait_for(pilot, lambda: message.text.startswith("exported"), timeout=120,
                       what="the export")
        path = Path(message.text.split(": ", 1)[1])
        assert path.is_dir() and (path / "adapter_config.json").exists()
        assert path.is_relative_to(fast)

    run_app(app, body)


# ---------------------------------------------------------------------- plan view


def _knob_row(screen, key):
    return [k.key for k in screen.knobs].index(key)


def test_plan_view_knobs_edit_the_config_and_bad_values_show_the_config_error(
        workdir, tiny_model_dir):
    from mlxtune import config as config_module
    from mlxtune.tui.plan_view import PlanScreen

    config = write_config(workdir, tiny_model_dir)
    app = make_app(config, workdir / "runs")

    async def body(pilot):
        screen = app.screen
        assert isinstance(screen, PlanScreen)
        await wait_for(pilot, lambda: screen.values, what="the config's values")
        assert screen.values["adapter.rank"] == 4 and screen.values["train.batch_size"] == 4
        table = screen.query_one("#knobs")
        table.move_cursor(row=_knob_row(screen, "adapter.rank"))
        await pilot.press("right")  # 4 -> 8 on the ladder
        await wait_for(pilot, lambda: screen.values["adapter.rank"] == 8)
        assert app.overrides == {"adapter.rank": "8"}
        table.move_cursor(row=_knob_row(screen, "model.quantize"))
        await pilot.press("right", "right")  # as stored -> affine 4-bit -> affine 8-bit
        await wait_for(pilot, lambda: screen.values["model.quantize"] == "affine 8-bit")
        cfg = config_module.load(config, app.override_items)
        assert (cfg.adapter.rank, cfg.model.quantize.format, cfg.model.quantize.bits) == (
            8, "affine", 8)
        table.move_cursor(row=_knob_row(screen, "train.grad_checkpoint"))
        await pilot.press("right")
        await wait_for(pilot, lambda: screen.values["train.grad_checkpoint"] is True)
        await pilot.pause(0.2)
        assert "on *" in screen_text(app)  # an edited knob is marked

        table.move_cursor(row=_knob_row(screen, "train.batch_size"))
        await pilot.press("enter")
        await pilot.pause(0.2)
        await pilot.press("ctrl+a", "ctrl+k", *"lots", "enter")
        message = screen.query_one("#message")
        await wait_for(pilot, lambda: message.has_class("error"), what="the config error")
        assert message.text == (f"mlxtune: error: {config}: train.batch_size: expected "
                                "integer, got 'lots'")
        await pilot.press("s")  # a config that does not load does not start
        assert app.child is None
        await pilot.press("enter")
        await pilot.pause(0.2)
        await pilot.press("ctrl+a", "ctrl+k", *"2", "enter")
        await wait_for(pilot, lambda: screen.values["train.batch_size"] == 2
                       and not message.has_class("error"))

        await pilot.press("w")  # save as, next to the original
        await pilot.pause(0.2)
        await pilot.press("ctrl+a", "ctrl+k", *str(workdir / "edited.yaml"), "enter")
        await wait_for(pilot, lambda: message.text.startswith("saved"), what="the save")
        assert app.config_path == workdir / "edited.yaml" and app.overrides == {}

    run_app(app, body)
    saved = config_module.load(workdir / "edited.yaml")
    assert (saved.adapter.rank, saved.model.quantize.bits, saved.train.grad_checkpoint,
            saved.train.batch_size) == (8, 8, True, 2)
    assert yaml.safe_load((workdir / "edited.yaml").read_text())["data"]["train"] == \
        "train.jsonl"  # relative paths stay relative


def test_plan_view_starts_training_with_the_edited_knobs(workdir, tiny_model_dir,
                                                        monkeypatch):
    import threading

    from mlxtune import config as config_module
    from mlxtune.tui import history, plan_view, process, runs_view
    from mlxtune.tui.history import list_runs, load_history
    from mlxtune.tui.train_view import TrainScreen

    # Every file or process call of the TUI is recorded with the thread it ran on.
    calls = []

    def record(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append((name, threading.current_thread() is threading.main_thread()))
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    record(config_module, "load")
    record(plan_view, "plan_config")
    record(history.EventsTail, "read_new")
    record(process.subprocess, "Popen")
    record(process.ChildProcess, "poll")
    record(runs_view, "list_runs")

    config = write_config(workdir, tiny_model_dir)
    app = make_app(config, workdir / "runs", overrides={"train.iters": "6"})

    async def body(pilot):
        await wait_for(pilot, lambda: app.screen.values, what="the config's values")
        app.screen.query_one("#knobs").move_cursor(row=_knob_row(app.screen, "adapter.rank"))
        await pilot.press("left")  # 4 -> 2
        await wait_for(pilot, lambda: app.screen.values["adapter.rank"] == 2)
        await pilot.press("s")
        assert isinstance(app.screen, TrainScreen)
        await wait_for(pilot, lambda: app.child is not None and not app.child.alive,
                       what="the run to finish")
        assert app.child.popen.returncode == 0

        await pilot.press("3")  # the runs view lists it
        await wait_for(pilot, lambda: len(app.screen.rows) == 1, what="the runs view")

    run_app(app, body)
    app_calls = list(calls)  # what the app did (the checks below read files too)
    (run_dir,) = list_runs(workdir / "runs")
    h = load_history(run_dir)
    assert h.status == "done" and h.step == 6
    assert h.config["adapter"]["rank"] == 2
    names = {name for name, _ in app_calls}
    assert {"load", "plan_config", "read_new", "Popen", "poll", "list_runs"} <= names
    assert [name for name, on_ui_thread in app_calls if on_ui_thread] == []


# ---------------------------------------------------------------------- snapshots (SVG)

T0 = 1_750_000_000.0  # fixed event times: the screens must not depend on the clock


def fake_run(run_dir: Path, iters: int, stop_at: int, reason: str, lr: float,
             eval_result: dict | None = None, planned: float | None = 2.8) -> Path:
    """A run directory whose events follow DESIGN.md section 3, with fixed numbers."""
    run_dir.mkdir(parents=True)
    cfg = {"name": "quickstart", "model": {"path": "smollm2-135m-instruct"},
           "train": {"iters": iters, "learning_rate": lr}}
    events = [{"event": "start", "time": T0, "config": cfg, "trainable_params": 2442240,
               "total_params": 136957248, "backend": "cpu", "planned_peak_gb": planned}]
    for step in range(0, stop_at + 1):
        t = T0 + 5 + 4.5 * step
        if step and step % 5 == 0:
            loss = 0.1 + 1.1 * math.exp(-step / (12 if lr > 2e-4 else 25)) \
                + 0.03 * math.sin(step)
            events.append({"event": "train", "time": t, "step": step, "loss": loss,
                           "lr": lr * (0.5 + 0.5 * math.cos(math.pi * step / iters)),
                           "tokens": 166 * step, "tokens_per_sec": 36 + 3 * math.sin(step / 7),
                           "peak_memory_gb": 2.2 + 0.4 * (1 - math.exp(-step / 10))})
        if step % 20 == 0:
            val = 0.11 + 1.35 * math.exp(-step / (14 if lr > 2e-4 else 30))
            events.append({"event": "val", "time": t + 1, "step": step, "loss": val})
        if step and step % 40 == 0 or step == stop_at:
            events.append({"event": "checkpoint", "time": t + 2, "step": step,
                           "path": str(run_dir / "checkpoints" / f"step-{step}")})
    events.append({"event": "stop", "time": T0 + 10 + 4.5 * stop_at, "step": stop_at,
                   "reason": reason, "message": ""})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    if eval_result:
        (run_dir / "eval.json").write_text(json.dumps(eval_result))
    return run_dir


def fake_runs(root: Path) -> Path:
    runs = root / "runs"
    fake_run(runs / "quickstart-lr3e-4", 80, 80, "done", 3e-4, eval_result={
        "split": "test", "split_examples": 192, "adapter": str(runs / "quickstart-lr3e-4/best"),
        "base": {"loss": 1.4392, "perplexity": 4.217, "json_valid": 0.0, "exact_match": 0.0},
        "tuned": {"loss": 0.1068, "perplexity": 1.113, "json_valid": 1.0,
                  "exact_match": 0.75}})
    fake_run(runs / "quickstart-lr1e-4", 80, 40, "interrupted", 1e-4)
    for i, name in enumerate(("quickstart-lr1e-4", "quickstart-lr3e-4")):
        os.utime(runs / name / "events.jsonl", (T0 + i, T0 + i))  # newest first: lr3e-4
    return runs


def check_snapshot(app, name: str) -> None:
    """The screen as SVG equals tests/snapshots/NAME.svg (MLXTUNE_UPDATE_SNAPSHOTS=1
    rewrites it; look at the new file before committing it)."""
    svg = app.export_screenshot(title=name)
    path = SNAPSHOTS / f"{name}.svg"
    if UPDATE_SNAPSHOTS:
        path.parent.mkdir(exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with MLXTUNE_UPDATE_SNAPSHOTS=1"
    if path.read_text(encoding="utf-8") != svg:
        actual = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}.actual.svg"
        actual.write_text(svg, encoding="utf-8")
        raise AssertionError(f"the {name} view changed: compare {actual} with {path}; if "
                             "the change is meant, rerun with MLXTUNE_UPDATE_SNAPSHOTS=1")


def test_train_view_shows_preference_metrics(tmp_path):
    run_dir = tmp_path / "runs" / "dpo"
    run_dir.mkdir(parents=True)
    events = [{"event": "start", "time": T0, "config": {"objective": {"type": "dpo"},
                                                       "train": {"iters": 10}}}]
    events += [{"event": "train", "time": T0 + s, "step": s, "loss": 0.69 - 0.01 * s,
                "rewards/accuracies": 0.5 + 0.05 * s, "rewards/margins": 0.1 * s}
               for s in (1, 2, 3)]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    app = make_app(run_dir, tmp_path / "runs")

    async def body(pilot):
        await wait_for(pilot, lambda: len(app.screen.history.train) == 3, what="events")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "rew. acc 65.0%" in text and "margin   0.3 " in text

    run_app(app, body)


def fake_grpo_run(run_dir: Path, iters: int = 60) -> Path:
    """A GRPO run's events: the rollouts' reward rising, greedy val rewards (val loss is
    minus the reward), fixed numbers."""
    run_dir.mkdir(parents=True)
    cfg = {"name": "quickstart-grpo", "model": {"path": "smollm2-135m-instruct"},
           "objective": {"type": "grpo"}, "train": {"iters": iters}}
    events = [{"event": "start", "time": T0, "config": cfg, "trainable_params": 2442240,
               "total_params": 136957248, "backend": "cpu", "planned_peak_gb": 3.1}]
    for step in range(0, iters + 1):
        t = T0 + 5 + 9 * step
        if step:
            reward = 1.2 + 0.6 * (1 - math.exp(-step / 15)) + 0.08 * math.sin(1.7 * step)
            events.append({"event": "train", "time": t, "step": step,
                           "loss": 0.02 * math.sin(step) - 0.004, "lr": 1e-5,
                           "tokens": 900 * step, "tokens_per_sec": 120.0,
                           "peak_memory_gb": 2.9, "reward": reward, "reward_std": 0.3})
        if step % 20 == 0:
            val = 1.25 + 0.55 * (1 - math.exp(-step / 18))
            events.append({"event": "val", "time": t + 1, "step": step, "loss": -val,
                           "reward": val, "rewards/json_schema/mean": 0.9,
                           "completions/mean_length": 40.0})
    events.append({"event": "checkpoint", "time": T0 + 9 * iters + 7, "step": iters,
                   "path": str(run_dir / "checkpoints" / f"step-{iters}")})
    events.append({"event": "stop", "time": T0 + 9 * iters + 8, "step": iters,
                   "reason": "done", "message": ""})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def test_train_view_plots_the_reward_beside_the_loss_for_grpo(tmp_path, monkeypatch):
    """GRPO: a reward chart beside the loss (train reward, val markers), val points off
    the loss chart (its val loss is minus the reward), the reward in the side panel. An
    SFT run keeps the loss chart alone (test_snapshot_train_view's unchanged snapshot)."""
    from mlxtune.tui.curve import Curve

    monkeypatch.chdir(tmp_path)
    fake_grpo_run(Path("runs/quickstart-grpo"))
    app = make_app(Path("runs/quickstart-grpo"), Path("runs"))

    async def body(pilot):
        await wait_for(pilot, lambda: app.screen.history.status == "done", what="events")
        await pilot.pause(0.3)
        loss, reward = (app.screen.query_one(f"#{n}", Curve) for n in ("loss", "reward"))
        assert reward.display and reward.size.width > 20 and loss.size.width > 20
        assert [s.label for s in loss.series] == ["train"]
        assert [s.label for s in reward.series] == ["reward", "val (greedy)"]
        assert len(reward.series[0].points) == 60 and len(reward.series[1].points) == 4
        assert reward.series[1].points[0] == (0, 1.25)
        text = screen_text(app)
        assert "reward · smoothing" in text and "val rew. 1.7" in text, text
        assert "best val 1.7" in text
        check_snapshot(app, "train_view_grpo")

    run_app(app, body, size=(100, 24))


def test_snapshot_train_view(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths on screen
    runs = fake_runs(tmp_path)
    app = make_app(Path("runs/quickstart-lr3e-4"), Path("runs"))

    async def body(pilot):
        await wait_for(pilot, lambda: app.screen.history.status == "done", what="events")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "step 80/80" in text and "best val 0.1145" in text and "2.60 GB" in text, text
        assert not app.screen.query_one("#reward").display  # sft: the loss alone
        check_snapshot(app, "train_view")

    assert runs.is_dir()
    run_app(app, body)


def test_snapshot_runs_view_comparing_two_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_runs(tmp_path)
    app = make_app(None, Path("runs"))

    async def body(pilot):
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.rows) == 2, what="the runs")
        assert [r.name for r in screen.rows] == ["quickstart-lr3e-4", "quickstart-lr1e-4"]
        await pilot.press("space", "down", "c")
        await pilot.pause(0.3)
        assert "A quickstart-lr3e-4  vs  B quickstart-lr1e-4" in screen_text(app)
        check_snapshot(app, "runs_view")

    run_app(app, body)


# ---------------------------------------------------------------------- plan view: memory


def write_plan_config(workdir: Path, **train) -> Path:
    """A config for a model the planner knows offline (its shape is in mlxtune's
    catalogue); planning loads nothing, so the hub id need not be downloaded."""
    config = {
        "name": "llama8b",
        "model": {"path": "meta-llama/Llama-3.1-8B-Instruct",
                  "quantize": {"format": "affine", "bits": 4, "group_size": 64}},
        "adapter": {"rank": 16, "alpha": 32},
        "data": {"train": "train.jsonl", "max_seq_len": 2048},
        "train": {"batch_size": 1, **train},
    }
    path = workdir / "llama8b.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_plan_view_verdicts_follow_the_knobs(tmp_path):
    from mlxtune.tui.plan_view import PlanScreen

    config = write_plan_config(tmp_path)
    app = make_app(config, tmp_path / "runs")

    async def body(pilot):
        screen = app.screen
        assert isinstance(screen, PlanScreen)
        await wait_for(pilot, lambda: screen.plan is not None, what="the plan")
        first = screen.plan
        assert first["tiers"]["32"] == "no" and first["tiers"]["128"] == "fits"
        assert first["tier_details"]["32"]["hint"].startswith("fits with")
        await pilot.pause(0.2)
        text = screen_text(app)
        assert " 32 GB" in text and "here" in text
        assert "32 GB: train.grad_checkpoint=true" in text  # the hint, under the bars

        table = screen.query_one("#knobs")
        table.move_cursor(row=_knob_row(screen, "train.grad_checkpoint"))
        await pilot.press("right")  # checkpointing on: the 32 GB Mac now fits
        await wait_for(pilot, lambda: screen.plan is not first
                       and screen.values["train.grad_checkpoint"] is True, what="replan")
        assert screen.plan["tiers"]["32"] == "fits"
        assert screen.plan["peak_gb"] < first["peak_gb"]
        await pilot.pause(0.2)
        assert "grad_checkpoint=true" not in screen_text(app)  # nothing left to advise

        table.move_cursor(row=_knob_row(screen, "data.max_seq_len"))
        for _ in range(4):  # 2048 -> 32768: too long for any tier
            await pilot.press("right")
        await wait_for(pilot, lambda: screen.values["data.max_seq_len"] == 32768
                       and screen.plan["tiers"]["128"] != "fits", what="longer rows")
        assert screen.plan["tiers"]["32"] == "no"

        table.move_cursor(row=_knob_row(screen, "model.quantize"))
        await pilot.press("left")  # back to the stored (bf16) weights: heavier still
        await wait_for(pilot, lambda: screen.values["model.quantize"] == "as stored",
                       what="bf16 base")
        await wait_for(pilot, lambda: screen.plan["breakdown"]["base weights"] > 15,
                       what="replan")

    run_app(app, body)


def test_snapshot_plan_view(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # "this machine" planned with mlxtune's CPU kernels wherever the test runs
    monkeypatch.setattr("mlxtune.native.expected", lambda: True)
    monkeypatch.delenv("MLXTUNE_FASTMATH", raising=False)
    write_plan_config(tmp_path)
    app = make_app(Path("llama8b.yaml"), Path("runs"))

    async def body(pilot):
        screen = app.screen
        await wait_for(pilot, lambda: screen.plan is not None and screen.values,
                       what="the plan")
        table = screen.query_one("#knobs")
        table.focus()  # the knobs' keys in the footer, however loaded the machine is
        await wait_for(pilot, lambda: app.focused is table, what="focus")
        # drawn: on a loaded machine the panels can paint after the plan is computed
        await wait_for(pilot, lambda: "memory per tier" in screen_text(app)
                       and "Less" in screen_text(app), what="the plan drawn")
        await pilot.pause(0.5)
        text = screen_text(app)
        assert "memory per tier" in text and "Less" in text and "2048" in text
        check_snapshot(app, "plan_view")

    run_app(app, body)
