"""The mlxtune TUI: three views over one state.

- plan: the knobs of a config and the planner's verdict for each memory tier,
- train: one run's live curves, started / stopped / resumed here or attached to,
- runs: the run directories under a runs folder, compared and exported.

The app holds what the views share: the config and the knob edits (as `--set` items),
the runs folder, and the training child process (see process.py). No view does file or
process I/O on the event loop: each uses thread workers and gets the results as messages.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding

from mlxtune.tui.common import QuitDialog
from mlxtune.tui.history import is_run_dir
from mlxtune.tui.plan_view import PlanScreen
from mlxtune.tui.process import ChildProcess
from mlxtune.tui.runs_view import RunsScreen
from mlxtune.tui.train_view import TrainScreen


class MlxtuneApp(App):
    TITLE = "mlxtune"
    CSS = """
    Screen { layout: vertical; }
    """
    MODES = {"plan": PlanScreen, "train": TrainScreen, "runs": RunsScreen}
    BINDINGS = [
        Binding("1", "view('plan')", "Plan", show=False),
        Binding("2", "view('train')", "Train", show=False),
        Binding("3", "view('runs')", "Runs", show=False),
        Binding("q", "quit_app", "Quit"),
    ]

    def __init__(self, target: str | Path | None = None, runs_root: str | Path = "runs",
                 machine_gb: float | None = None, redraw_s: float = 0.5,
                 poll_s: float = 0.25, overrides: dict[str, str] | None = None):
        """`target`: a config file (opens the plan view) or a run directory (the train
        view, attached to it); none: the runs view. `machine_gb` overrides this machine's
        memory in the plan view (for reproducible screenshots)."""
        super().__init__()
        self.runs_root = Path(runs_root)
        self.config_path: Path | None = None
        self.attach_to: Path | None = None
        self.machine_gb = machine_gb
        self.redraw_s, self.poll_s = redraw_s, poll_s
        # Knob edits: dotted key -> YAML value, as --set takes them.
        self.overrides: dict[str, str] = dict(overrides or {})
        self.child: ChildProcess | None = None
        self.child_run_dir: Path | None = None
        if target is not None:
            target = Path(target)
            if is_run_dir(target):
                self.attach_to = target
            else:
                self.config_path = target

    @property
    def override_items(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]

    def on_mount(self) -> None:
        if self.attach_to is not None:
            self.switch_mode("train")
        elif self.config_path is not None:
            self.switch_mode("plan")
        else:
            self.switch_mode("runs")

    def action_view(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)

    async def open_run(self, run_dir: Path) -> None:
        """Show `run_dir` in the train view (attach to it)."""
        self.attach_to = Path(run_dir)
        await self.switch_mode("train")
        screen = self.screen
        if isinstance(screen, TrainScreen):
            screen.attach(Path(run_dir))

    async def start_training_view(self) -> None:
        """The plan view's 'train these knobs': go to the train view and start."""
        await self.switch_mode("train")
        screen = self.screen
        if isinstance(screen, TrainScreen):
            screen.action_start()

    def child_running(self) -> bool:
        return self.child is not None and self.child.alive

    def action_quit_app(self) -> None:
        if not self.child_running():
            self.exit()
            return

        def chosen(choice: str | None) -> None:
            if choice == "leave":
                self.exit()
            elif choice == "stop":
                self.run_worker(self._stop_and_exit, thread=True, group="quit")

        self.push_screen(QuitDialog(), chosen)

    def _stop_and_exit(self) -> None:
        child = self.child
        if child is not None:
            child.interrupt()
            try:
                child.wait(timeout=120)
            except Exception:  # still saving after 2 minutes: leave it to finish alone
                pass
        self.call_from_thread(self.exit)
