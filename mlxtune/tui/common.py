"""Pieces every view shares: the navigation bar, the message line, the quit dialog."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

VIEWS = (("plan", "1", "Plan"), ("train", "2", "Train"), ("runs", "3", "Runs"))
STATUS_STYLE = {"running": "bold green", "done": "bold cyan", "early_stopping": "bold cyan",
                "interrupted": "bold yellow", "error": "bold red", "nan": "bold red",
                "empty": "dim", "evaluating": "bold green"}


class NavBar(Static):
    """One line: the views with their keys, the current one highlighted, and a context."""

    DEFAULT_CSS = """
    NavBar { height: 1; background: $panel; }
    """

    def __init__(self, current: str, **kwargs):
        super().__init__(**kwargs)
        self.current = current
        self.context = ""

    def set_context(self, context: str) -> None:
        self.context = context
        self.refresh()

    def render(self) -> Text:
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(" mlxtune ", "bold")
        for mode, key, label in VIEWS:
            style = "reverse bold" if mode == self.current else ""
            out.append(f" {key} {label} ", style)
        if self.context:
            room = self.size.width - out.cell_len - 2
            if room > 3:
                ctx = self.context if len(self.context) <= room else "…" + self.context[-room + 1:]
                out.append("  " + ctx, "dim")
        return out


class MessageLine(Static):
    """The view's last message: engine errors appear here as their one-line text."""

    DEFAULT_CSS = """
    MessageLine { height: 1; padding: 0 1; }
    MessageLine.error { color: $error; text-style: bold; }
    MessageLine.ok { color: $success; }
    """

    def say(self, text: str, level: str = "info") -> None:
        self.set_classes(level if level in ("error", "ok") else "")
        self.text = text
        self.update(Text(text, no_wrap=True, overflow="ellipsis"))

    text: str = ""


def status_text(status: str) -> Text:
    return Text(status.replace("_", " "), STATUS_STYLE.get(status, "bold"))


class QuitDialog(ModalScreen[str]):
    """Asked when quitting while a run started here is still going."""

    DEFAULT_CSS = """
    QuitDialog { align: center middle; }
    QuitDialog > Vertical { width: 60; height: auto; border: thick $warning;
                            background: $surface; padding: 1 2; }
    QuitDialog Horizontal { height: auto; margin-top: 1; }
    QuitDialog Button { margin-right: 1; }
    """
    BINDINGS = [("escape", "dismiss('cancel')", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("A run started here is still training.")
            yield Label("Leave it running (attach later with mlxtune tui RUN_DIR), or stop "
                        "it (a checkpoint is saved) and quit?")
            with Horizontal():
                yield Button("Leave running", id="leave", variant="primary")
                yield Button("Stop and quit", id="stop", variant="warning")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)
