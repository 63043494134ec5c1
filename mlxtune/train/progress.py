"""The live progress line in the terminal: step, loss, tokens/s, ETA, peak memory."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _rewards(r: dict) -> str:
    """Preference runs: reward accuracy and margin (TRL's rewards/accuracies, margins)."""
    if "rewards/accuracies" not in r:
        return ""
    return f"  reward acc {r['rewards/accuracies']:.2f}  margin {r['rewards/margins']:.3f}"


class Progress:
    """Prints to stderr: one updating line on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._t0 = time.perf_counter()
        self._step0 = 0
        self.total = 0
        self._open_line = False
        self._held: list[str] | None = None

    def hold(self) -> None:
        """Keep messages back (until release) while inputs are still being checked."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for text in held:
            self._write(text, final=True)

    def _write(self, text: str, final: bool) -> None:
        if self.quiet:
            return
        if self._held is not None:
            self._held.append(text)
            return
        if self.tty and not final:
            self.stream.write("\r\033[K" + text)
            self._open_line = True
        else:
            if self._open_line:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            self._open_line = False
        self.stream.flush()

    def message(self, text: str) -> None:
        self._write(text, final=True)

    def status(self, text: str) -> None:
        """A progress line: redrawn in place on a terminal, a plain line otherwise."""
        self._write(text, final=not self.tty)

    def start(self, step: int, total: int) -> None:
        self._t0, self._step0, self.total = time.perf_counter(), step, total

    def train(self, r: dict) -> None:
        done = r["step"] - self._step0
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - r["step"]) if done else 0
        self._write(f"step {r['step']}/{self.total}  loss {r['loss']:.4f}{_rewards(r)}  "
                    f"{r['tokens_per_sec']:.0f} tok/s  peak {r['peak_memory_gb']:.2f} GB  "
                    f"ETA {_duration(eta)}", final=not self.tty)

    def val(self, step: int, loss: float, best: float, metrics: dict | None = None) -> None:
        self._write(f"step {step}/{self.total}  val loss {loss:.4f}{_rewards(metrics or {})}  "
                    f"(best {best:.4f})", final=True)

    def close(self) -> None:
        if self._open_line and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
