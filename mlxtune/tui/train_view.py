"""The train view: one run's live curves; start, stop (checkpoint saved) and resume.

A GRPO run gets a second chart beside the loss: the reward (the rollout batches' mean, and
the greedy validation reward as markers); its validation points leave the loss chart, as
its val loss is minus the reward. Other runs show the loss alone.

A watcher thread tails RUN_DIR/events.jsonl and polls the child process; it posts what it
finds as messages. The curves are redrawn from a timer, at most every `redraw_s`
seconds, however fast events arrive.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Sparkline, Static
from textual.worker import get_current_worker

from mlxtune.tui.common import MessageLine, NavBar, status_text
from mlxtune.tui.curve import (REWARD_COLOR, TRAIN_COLOR, VAL_COLOR, Curve, Series,
                                legend)
from mlxtune.tui.history import EventsTail, RunHistory, format_duration
from mlxtune.tui.process import ChildProcess, start_training

SMOOTHING = (0.0, 0.6, 0.9)


def new_run_dir(runs_root: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = runs_root / f"{name}-{stamp}", 1
    while run_dir.exists():
        n += 1
        run_dir = runs_root / f"{name}-{stamp}-{n}"
    return run_dir


def progress_text(step: int, total: int | None, elapsed: float, eta: float | None,
                  width: int) -> Text:
    out = Text(no_wrap=True, overflow="crop")
    head = f"step {step}/{total}" if total else f"step {step}"
    tail = f"  {format_duration(elapsed)} elapsed"
    if eta is not None:
        tail += f"  ETA {format_duration(eta)}"
    out.append(head, "bold")
    bar_w = width - len(head) - len(tail) - 7
    if total and bar_w >= 8:
        frac = min(max(step / total, 0.0), 1.0)
        filled = int(round(frac * bar_w))
        out.append(" ")
        out.append("━" * filled, "green")
        out.append("━" * (bar_w - filled), "grey35")
        out.append(f" {100 * frac:3.0f}%")
    out.append(tail, "dim")
    return out


def memory_bar(peak: float | None, planned: float | None, width: int) -> Text:
    """Measured peak against the planner's prediction (the start event's planned_peak_gb)."""
    out = Text(no_wrap=True, overflow="crop")
    if planned is None:
        return out.append("no plan in the run", "dim")
    if peak is None:
        return out.append(f"planned {planned:.2f} GB", "dim")
    frac = peak / planned if planned > 0 else 0.0
    bar_w = max(width - 5, 4)
    filled = min(int(round(min(frac, 1.0) * bar_w)), bar_w)
    style = "green" if frac <= 1.0 else "red"
    out.append("█" * filled, style).append("░" * (bar_w - filled), "grey35")
    out.append(f"{100 * frac:4.0f}%", style)
    return out


class TrainScreen(Screen):
    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("x", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
        Binding("l", "toggle_log", "Log y"),
        Binding("m", "smoothing", "Smooth"),
    ]
    DEFAULT_CSS = """
    TrainScreen #run-line, TrainScreen #progress { height: 1; padding: 0 1; }
    TrainScreen #body { height: 1fr; }
    TrainScreen #loss { width: 1fr; border: round $primary; }
    TrainScreen #reward { width: 1fr; border: round $primary; display: none; }
    TrainScreen #side { width: 28; padding: 0 1; border: round $primary-darken-2; }
    TrainScreen #side Static { height: auto; }
    TrainScreen #side Sparkline { height: 1; margin-bottom: 1; }
    """

    class Events(Message):
        def __init__(self, generation: int, events: list[dict], restarted: bool):
            super().__init__()
            self.generation, self.events, self.restarted = generation, events, restarted

    class Exited(Message):
        def __init__(self, generation: int, code: int, last_line: str):
            super().__init__()
            self.generation, self.code, self.last_line = generation, code, last_line

    class Started(Message):
        def __init__(self, run_dir: Path, child: ChildProcess | None, error: str = ""):
            super().__init__()
            self.run_dir, self.child, self.error = run_dir, child, error

    def __init__(self):
        super().__init__()
        self.history = RunHistory()
        self.run_dir: Path | None = None
        self.child: ChildProcess | None = None   # the child of *this* run, if started here
        self.smoothing_index = 1
        self.log_y = False
        self._generation = 0
        self._target: tuple[int, EventsTail, ChildProcess | None] | None = None
        self._dirty = True
        self._busy = False  # a start / resume is being launched

    def compose(self) -> ComposeResult:
        yield NavBar("train", id="nav")
        yield Static(id="run-line")
        yield Static(id="progress")
        with Horizontal(id="body"):
            yield Curve(id="loss", empty="no training events yet: s starts the config, "
                                         "or open a run (3)")
            yield Curve(id="reward", empty="no rollouts yet")
            with Vertical(id="side"):
                yield Static(id="stats")
                yield Static(id="lr-label")
                yield Sparkline([], id="lr")
                yield Static(id="tps-label")
                yield Sparkline([], id="tps")
                yield Static(id="mem-label")
                yield Static(id="mem")
        yield MessageLine(id="message")
        yield Footer()

    def on_mount(self) -> None:
        self.run_worker(self._watch, thread=True, group="watch", exclusive=True)
        self.set_interval(self.app.redraw_s, self._redraw)
        self.set_interval(1.0, self._tick)
        if self.app.attach_to is not None and self.run_dir is None:
            self._show_run(self.app.attach_to)
        self._redraw(force=True)

    # ------------------------------------------------------------------ watching a run

    def attach(self, run_dir: Path, child: ChildProcess | None = None) -> None:
        """Show `run_dir`: read its events from the start, then follow them."""
        run_dir = Path(run_dir)
        if not self.is_mounted:  # on_mount attaches to app.attach_to
            self.app.attach_to = run_dir
            return
        self._show_run(run_dir, child)

    def _show_run(self, run_dir: Path, child: ChildProcess | None = None) -> None:
        if child is None and self.app.child is not None and self.app.child_run_dir == run_dir:
            child = self.app.child
        self._generation += 1
        self.run_dir, self.child = run_dir, child
        self.history = RunHistory(run_dir)
        self._target = (self._generation, EventsTail(run_dir), child)
        self.query_one("#nav", NavBar).set_context(str(run_dir))
        self.say(f"attached to {run_dir}" if child is None else f"started {run_dir}")
        self._dirty = True

    def _follow_child(self, child: ChildProcess) -> None:
        """Keep the events read so far (same run directory), and watch a new child."""
        if self._target is not None:
            gen, tail, _ = self._target
            self._generation += 1
            self._target = (self._generation, tail, child)
        self.child = child

    def _watch(self) -> None:
        """Thread: tail the events file and poll the child; post what changed."""
        worker = get_current_worker()
        reported: set[int] = set()
        while not worker.is_cancelled:
            target = self._target
            if target is not None:
                gen, tail, child = target
                events = tail.read_new()
                if events or tail.restarted:
                    self.post_message(self.Events(gen, events, tail.restarted))
                if child is not None and gen not in reported and child.poll() is not None:
                    more = tail.read_new()  # the last events written before it exited
                    if more:
                        self.post_message(self.Events(gen, more, False))
                    self.post_message(self.Exited(gen, child.popen.returncode,
                                                  child.last_line()))
                    reported.add(gen)
            time.sleep(self.app.poll_s)

    def on_train_screen_events(self, message: Events) -> None:
        if message.generation != self._generation:
            return
        if message.restarted:
            self.history = RunHistory(self.run_dir)
        self.history.add(message.events)
        self._dirty = True

    def on_train_screen_exited(self, message: Exited) -> None:
        if message.generation != self._generation:
            return
        h, code = self.history, message.code
        if code == 0:
            best = f", best val loss {h.best_val:.4f}" if h.best_val is not None else ""
            if h.grpo and h.val_reward:
                best = f", best val reward {max(r for _, r in h.val_reward):.4f}"
            self.say(f"{h.status.replace('_', ' ')} at step {h.step}{best}", "ok")
        elif code == 130:
            ck = h.last_checkpoint
            saved = f"checkpoint step-{ck} saved" if ck is not None else "no checkpoint"
            self.say(f"stopped at step {h.step}; {saved}; r resumes", "ok")
        elif code < 0:
            self.say(f"the training process was killed by signal {-code}"
                     f"{' (out of memory?)' if code == -9 else ''}; "
                     f"{message.last_line}".rstrip("; "), "error")
        else:
            self.say(message.last_line or f"mlxtune run exited with code {code}", "error")
        self._dirty = True

    # ------------------------------------------------------------------ actions

    def action_start(self) -> None:
        app = self.app
        if app.child_running():
            self.say(f"a run is already going: {app.child_run_dir}", "error")
            return
        if app.config_path is None:
            self.say("no config to start: mlxtune tui CONFIG, or open a run (3)", "error")
            return
        if self._busy:
            return
        self._busy = True
        self.say(f"starting {app.config_path} ...")
        self.run_worker(lambda: self._launch(app.config_path, list(app.override_items)),
                        thread=True, group="launch")

    def _launch(self, config_path: Path, overrides: list[str]) -> None:
        """Thread: validate the config (for its name and a quick error), start the child."""
        from mlxtune import config
        from mlxtune.errors import MlxtuneError

        try:
            cfg = config.load(config_path, overrides)
        except MlxtuneError as e:
            self.post_message(self.Started(Path(), None, f"mlxtune: error: {e}"))
            return
        run_dir = new_run_dir(self.app.runs_root, cfg.name)
        try:
            child = start_training(config_path, run_dir, overrides)
        except OSError as e:
            self.post_message(self.Started(run_dir, None, f"cannot start mlxtune run: {e}"))
            return
        self.post_message(self.Started(run_dir, child))

    def _launch_resume(self, run_dir: Path) -> None:
        try:
            child = start_training(run_dir / "config.yaml", run_dir, resume=True)
        except OSError as e:
            self.post_message(self.Started(run_dir, None, f"cannot start mlxtune run: {e}"))
            return
        self.post_message(self.Started(run_dir, child, error="resume"))

    def on_train_screen_started(self, message: Started) -> None:
        self._busy = False
        if message.child is None:
            self.say(message.error, "error")
            return
        self.app.child, self.app.child_run_dir = message.child, message.run_dir
        if message.error == "resume" and self.run_dir == message.run_dir:
            self._follow_child(message.child)
            self.say(f"resuming {message.run_dir} from checkpoint step-"
                     f"{self.history.last_checkpoint}")
        else:
            self.attach(message.run_dir, message.child)
        self._dirty = True

    def action_stop(self) -> None:
        child = self.child
        if child is None:
            if self.run_dir is not None and self.history.status == "running":
                self.say("this run was not started here: stop it where it runs (Ctrl-C)",
                         "error")
            else:
                self.say("no run of this TUI is going")
            return
        if not child.alive:
            self.say("the run is not going")
            return
        first = child.signals_sent == 0
        self.run_worker(child.interrupt, thread=True, group="stop")
        self.say("stopping: saving a checkpoint (x again kills it)" if first
                 else "killing the training process")

    def action_resume(self) -> None:
        h = self.history
        if self.run_dir is None:
            self.say("no run to resume: open one in the runs view (3)")
            return
        if self.app.child_running():
            self.say(f"a run is already going: {self.app.child_run_dir}", "error")
            return
        ours = self.child is not None  # we started it and it has exited
        if h.status == "running" and not ours:
            self.say("this run has no stop event: it may still be going elsewhere", "error")
            return
        if h.status in ("done", "early_stopping"):
            self.say(f"the run finished ({h.status.replace('_', ' ')}): nothing to resume")
            return
        if h.last_checkpoint is None:
            self.say("no checkpoint to resume from", "error")
            return
        if self._busy:
            return
        self._busy = True
        run_dir = self.run_dir
        self.say(f"resuming {run_dir} ...")
        self.run_worker(lambda: self._launch_resume(run_dir), thread=True, group="launch")

    def action_toggle_log(self) -> None:
        self.log_y = not self.log_y
        self._redraw(force=True)

    def action_smoothing(self) -> None:
        self.smoothing_index = (self.smoothing_index + 1) % len(SMOOTHING)
        self._redraw(force=True)

    def say(self, text: str, level: str = "info") -> None:
        self.query_one("#message", MessageLine).say(text, level)

    # ------------------------------------------------------------------ drawing

    @property
    def status(self) -> str:
        status = self.history.status
        if self.child is not None and self.child.alive and status in ("done", "early_stopping"):
            return "evaluating"  # `mlxtune run` evaluates base vs tuned after training
        if status == "empty" and self.child is not None and self.child.alive:
            return "starting"
        return status

    @property
    def _live(self) -> bool:
        """A child of ours is running this run: the clock runs on between events."""
        return self.child is not None and self.child.alive

    def _tick(self) -> None:
        self._draw_header()

    def _draw_header(self) -> None:
        h = self.history
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(h.name if self.run_dir else "no run", "bold")
        line.append("  ")
        line.append_text(status_text(self.status))
        if h.starts:
            cfg = h.config
            model = Path(str((cfg.get("model") or {}).get("path", "?"))).name
            line.append(f"  {model}", "dim")
            trainable = h.starts[-1].get("trainable_params")
            if isinstance(trainable, int):
                line.append(f"  {trainable / 1e6:.2f}M trainable", "dim")
            line.append(f"  {h.starts[-1].get('backend', '')}", "dim")
        self.query_one("#run-line", Static).update(line)
        width = self.query_one("#progress", Static).size.width or 78
        now = time.time()
        eta = h.eta_seconds(now)
        self.query_one("#progress", Static).update(
            progress_text(h.step, h.total_steps, h.duration(now if self._live else None),
                          eta, width))

    def _redraw(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        self._dirty = False
        h = self.history
        curve = self.query_one("#loss", Curve)
        series = [Series("train", [(p["step"], p["loss"]) for p in h.train], TRAIN_COLOR)]
        if not h.grpo:  # grpo's val loss is minus its reward: on the reward chart
            series.append(Series("val", list(h.val), VAL_COLOR, smoothable=False,
                                 markers=True))
        curve.series = series
        curve.log_y, curve.smoothing = self.log_y, SMOOTHING[self.smoothing_index]
        curve.x_max = h.total_steps
        curve.border_title = (f"loss · smoothing {curve.smoothing:g} · "
                              f"{'log' if self.log_y else 'linear'}")
        curve.border_subtitle = legend(series).markup
        curve.refresh()
        self._draw_reward()
        self._draw_header()
        self._draw_side()

    def _draw_reward(self) -> None:
        """GRPO: the reward beside the loss (linear: rewards may be 0 or negative)."""
        h = self.history
        curve = self.query_one("#reward", Curve)
        curve.display = h.grpo
        if not h.grpo:
            return
        series = [Series("reward", [(p["step"], p["reward"]) for p in h.train
                                    if p["reward"] is not None], REWARD_COLOR),
                  Series("val (greedy)", list(h.val_reward), VAL_COLOR, smoothable=False,
                         markers=True)]
        curve.series = series
        curve.smoothing = SMOOTHING[self.smoothing_index]
        curve.x_max = h.total_steps
        curve.border_title = f"reward · smoothing {curve.smoothing:g}"
        curve.border_subtitle = legend(series).markup
        curve.refresh()

    def _draw_side(self) -> None:
        h = self.history
        last = h.train[-1] if h.train else None
        stats = Text(no_wrap=True, overflow="ellipsis")
        stats.append("loss     ", "dim").append(f"{last['loss']:.4f}" if last else "-")
        if h.grpo:  # the reward, and validation's (greedy) reward
            rewards = h.val_reward
            stats.append("\nreward   ", "dim").append(
                f"{last['reward']:.4f}" if last and last["reward"] is not None else "-")
            stats.append("\nval rew. ", "dim").append(f"{rewards[-1][1]:.4f}" if rewards
                                                      else "-")
            stats.append("\nbest val ", "dim").append(
                f"{max(r for _, r in rewards):.4f}" if rewards else "-")
        else:
            stats.append("\nval      ", "dim").append(f"{h.val[-1][1]:.4f}" if h.val else "-")
            stats.append("\nbest val ", "dim").append(
                f"{h.best_val:.4f}" if h.best_val is not None else "-")
        if last and last["reward_accuracy"] is not None:  # dpo / orpo / simpo
            stats.append("\nrew. acc ", "dim").append(f"{100 * last['reward_accuracy']:.1f}%")
            if last["reward_margin"] is not None:
                stats.append("\nmargin   ", "dim").append(f"{last['reward_margin']:.4g}")
        ck = h.last_checkpoint
        stats.append("\nsaved    ", "dim").append(f"step {ck}" if ck is not None else "-")
        self.query_one("#stats", Static).update(stats)
        lrs = [p["lr"] for p in h.train if p["lr"] is not None]
        tps = [p["tokens_per_sec"] for p in h.train if p["tokens_per_sec"] is not None]
        self.query_one("#lr-label", Static).update(
            Text("lr       ", "dim").append(f"{lrs[-1]:.2e}" if lrs else "-", "default"))
        self.query_one("#lr", Sparkline).data = lrs[-48:]
        self.query_one("#tps-label", Static).update(
            Text("tokens/s ", "dim").append(f"{tps[-1]:.0f}" if tps else "-", "default"))
        self.query_one("#tps", Sparkline).data = tps[-48:]
        peak, planned = h.peak_memory_gb, h.planned_peak_gb
        label = Text("peak mem ", "dim")
        label.append(f"{peak:.2f} GB" if peak is not None else "-")
        if planned is not None:
            label.append(f" / {planned:.2f}", "dim")
        self.query_one("#mem-label", Static).update(label)
        self.query_one("#mem", Static).update(memory_bar(peak, planned, 24))
