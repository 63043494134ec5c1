"""Training and exporting as child processes of the TUI.

A run is `mlxtune run ...` in its own process (and process group), never a thread of the
UI: a crash or an out-of-memory kill in training cannot take the UI down, and the UI can
quit while the run goes on. Its standard input is /dev/null; its output goes to a log
file, RUNS/.logs/NAME.log (not a pipe, which would break the child's writes once the UI is
gone), whose last line is the engine's one-line message when it fails. Stop is SIGINT: the trainer saves a
checkpoint and exits 130.

Every call here may block on the file system or on process creation: the TUI calls
them from worker threads, never from its event loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def mlxtune_command(*args: str) -> list[str]:
    """The same interpreter and package as this process (no PATH lookup)."""
    return [sys.executable, "-m", "mlxtune", *args]


def run_command(config_path: Path, run_dir: Path, overrides: list[str] = (),
                resume: bool = False) -> list[str]:
    cmd = ["run", str(config_path), "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    return mlxtune_command(*cmd)


def last_line(path: Path, limit: int = 64 * 1024) -> str:
    """The last non-empty line of a log file (read from its end only)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - limit, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # Progress lines on a terminal end in \r; the log has plain lines, but be tolerant.
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class ChildProcess:
    """A `mlxtune` subcommand running in its own process group, output to a log file."""

    def __init__(self, argv: list[str], log_path: Path | None = None, cwd: Path | None = None):
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="mlxtune-tui-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.argv = argv
        self.log_path = Path(log_path)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=cwd,
                                          start_new_session=True)
        self.signals_sent = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def alive(self) -> bool:
        """As of the last poll() or wait(): no system call (safe on the UI thread)."""
        return self.popen.returncode is None

    def interrupt(self) -> str:
        """First call: SIGINT (the trainer checkpoints and exits). A second call: SIGTERM,
        which the trainer no longer catches after the first signal."""
        if not self.running:
            return "not running"
        sig = signal.SIGINT if self.signals_sent == 0 else signal.SIGTERM
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return "not running"
        self.signals_sent += 1
        return signal.Signals(sig).name

    def last_line(self) -> str:
        return last_line(self.log_path)

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def training_log(run_dir: Path) -> Path:
    """Where a run's output goes: beside the run directory (which `mlxtune run` wants
    empty or absent at the start), in the runs folder's .logs/."""
    run_dir = Path(run_dir)
    return run_dir.parent / ".logs" / f"{run_dir.name}.log"


def start_training(config_path: Path, run_dir: Path, overrides: list[str] = (),
                   resume: bool = False) -> ChildProcess:
    log = training_log(run_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    return ChildProcess(run_command(config_path, run_dir, list(overrides), resume), log)


def export_run(run_dir: Path, fmt: str) -> tuple[int, str]:
    """`mlxtune export RUN_DIR --to FMT`, waited for: (exit code, its last line), which is
    the exported path on success and the one-line error otherwise."""
    child = ChildProcess(mlxtune_command("export", str(run_dir), "--to", fmt))
    code = child.wait()
    line = child.last_line()
    child.log_path.unlink(missing_ok=True)
    return code, line
