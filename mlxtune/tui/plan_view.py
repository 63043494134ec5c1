"""The plan view: the main knobs of a config and whether it fits, per memory tier; under
the tiers, the data's truncation share and leakage count (mlxtune.datacheck.summary).

Knob edits are kept as `--set` items (app.overrides), the same ones `mlxtune run` and
`mlxtune plan` take; after each edit a worker loads the config with them and asks the
memory planner, so the verdicts follow the knobs. `w` writes the edited config.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import yaml
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Label, Static

from mlxtune.tui.common import MessageLine, NavBar

VERDICT_STYLE = {"fits": "bold green", "tight": "bold yellow", "no": "bold red"}
QUANT_CHOICES = ("as stored", "affine 4-bit", "affine 8-bit", "nf4")


@dataclass(frozen=True)
class Knob:
    label: str
    key: str               # the dotted config key it sets
    ladder: tuple = ()     # the values left / right step through


def _choices(cls, name: str) -> tuple:
    for f in fields(cls):
        if f.name == name:
            return tuple(f.metadata.get("choices", ()))
    return ()


def knobs() -> list[Knob]:
    """The knobs shown; choices come from the config's own field definitions."""
    from mlxtune.config import (PACKAGED_DEFAULT_MODEL, AdapterConfig, ModelConfig,
                                ObjectiveConfig)

    return [
        Knob("model", "model.path", (PACKAGED_DEFAULT_MODEL,)),
        Knob("adapter", "adapter.type", _choices(AdapterConfig, "type")),
        Knob("quantization", "model.quantize", QUANT_CHOICES),
        Knob("objective", "objective.type", _choices(ObjectiveConfig, "type")),
        Knob("rank", "adapter.rank", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
        Knob("batch size", "train.batch_size", (1, 2, 4, 8, 16, 32, 64)),
        Knob("seq length", "data.max_seq_len",
             (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)),
        Knob("checkpointing", "train.grad_checkpoint", (False, True)),
        Knob("dtype", "model.dtype", _choices(ModelConfig, "dtype")),
    ]


def knob_value(cfg, knob: Knob):
    if knob.key == "model.quantize":
        q = cfg.model.quantize
        if q is None or q.format == "none":
            return "as stored"
        return "nf4" if q.format == "nf4" else f"{q.format} {q.bits}-bit"
    node = cfg
    for part in knob.key.split("."):
        node = getattr(node, part)
    return node


def step_value(knob: Knob, current, direction: int):
    """The next value on the knob's ladder (numbers in between snap to the ladder)."""
    ladder = list(knob.ladder)
    if not ladder:
        return current
    if current in ladder:
        i = min(max(ladder.index(current) + direction, 0), len(ladder) - 1)
        return ladder[i]
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if direction > 0:
            return next((v for v in ladder if v > current), ladder[-1])
        return next((v for v in reversed(ladder) if v < current), ladder[0])
    return ladder[0]


def overrides_for(knob: Knob, value) -> dict[str, str]:
    """The --set items (key -> YAML text) that give `knob` this value."""
    if knob.key == "model.quantize":
        if value == "as stored":
            return {"model.quantize": "null"}
        if value == "nf4":
            return {"model.quantize": json.dumps({"format": "nf4"})}
        fmt, bits = str(value).split()
        return {"model.quantize": json.dumps({"format": fmt, "bits": int(bits.split("-")[0])})}
    return {knob.key: json.dumps(value)}


def set_knob(overrides: dict[str, str], knob: Knob, value) -> dict[str, str]:
    # Drop earlier edits of this key and of anything under it (model.quantize.bits).
    kept = {k: v for k, v in overrides.items()
            if k != knob.key and not k.startswith(knob.key + ".")}
    kept.update(overrides_for(knob, value))
    return kept


def parse_typed(text: str):
    """A typed value as --set reads it (YAML scalar)."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def edited_yaml(config_path: Path, overrides: dict[str, str]) -> str:
    """The config file's own mapping with the edits applied (its paths stay relative)."""
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = parse_typed(value)
    return yaml.safe_dump(raw, sort_keys=False)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tier_bar(peak: float, usable: float, width: int) -> Text:
    frac = peak / usable if usable > 0 else float("inf")
    filled = min(int(round(min(frac, 1.0) * width)), width)
    style = "green" if frac <= 0.9 else ("yellow" if frac <= 1.0 else "red")
    return Text("█" * filled, style).append("░" * (width - filled), "grey35")


class KnobTable(DataTable):
    """The knobs, one a row: up/down picks, left/right changes, enter types a value."""

    BINDINGS = [
        Binding("left", "screen.step(-1)", "Less", key_display="←"),
        Binding("right", "screen.step(1)", "More", key_display="→"),
        Binding("enter", "screen.edit", "Type"),
    ]


class PlanScreen(Screen):
    BINDINGS = [
        Binding("s", "start", "Train"),
        Binding("w", "write", "Save"),
        Binding("u", "undo", "Undo edits"),
    ]
    DEFAULT_CSS = """
    PlanScreen #config-line { height: 1; padding: 0 1; }
    PlanScreen #plan-body { height: 1fr; }
    PlanScreen #left { width: 41; height: 1fr; }
    PlanScreen #knobs { height: 1fr; border: round $primary; }
    PlanScreen #data { height: auto; border: round $primary; padding: 0 1; }
    PlanScreen #verdicts { width: 1fr; height: 1fr; border: round $primary; padding: 0 1; }
    """

    class Planned(Message):
        def __init__(self, generation: int, values: dict, plan: dict | None, error: str,
                     data: dict | None = None, data_error: str = "", cfg=None):
            super().__init__()
            self.generation, self.values, self.plan, self.error = (generation, values, plan,
                                                                    error)
            self.data, self.data_error, self.cfg = data, data_error, cfg

    class Truncation(Message):
        def __init__(self, generation: int, result: dict | None, error: str):
            super().__init__()
            self.generation, self.result, self.error = generation, result, error

    def __init__(self):
        super().__init__()
        self.knobs = knobs()
        self.values: dict[str, object] = {}
        self.plan: dict | None = None
        self.error = ""
        self._generation = 0
        # The data (mlxtune.datacheck.summary): examples and leakage with the plan,
        # the truncation share from a worker of its own (it tokenizes once, then caches).
        self.data: dict | None = None
        self.data_error = ""
        self.truncation: dict | None = None
        self.truncation_error = ""

    def compose(self) -> ComposeResult:
        yield NavBar("plan", id="nav")
        yield Static(id="config-line")
        with Horizontal(id="plan-body"):
            with Vertical(id="left"):
                table = KnobTable(id="knobs", cursor_type="row", show_header=False)
                table.add_column("knob", key="knob", width=13)
                table.add_column("value", key="value", width=22)
                for k in self.knobs:
                    table.add_row(k.label, "…", key=k.key)
                yield table
                yield Static(Text("reading…", "dim"), id="data")
            yield Static(id="verdicts")
        yield MessageLine(id="message")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#knobs", DataTable).border_title = "knobs (←/→, enter types)"
        self.query_one("#verdicts", Static).border_title = "memory per tier"
        self.query_one("#data", Static).border_title = "data"
        self.replan()

    # ------------------------------------------------------------------ planning

    def replan(self) -> None:
        app = self.app
        self._generation += 1
        gen, path, items = self._generation, app.config_path, list(app.override_items)
        self._draw_config_line()
        if path is None:
            self.say("no config: mlxtune tui CONFIG opens one here")
            return
        self.run_worker(lambda: self._plan(gen, path, items, app.machine_gb), thread=True,
                        group="plan", exclusive=True)

    def _plan(self, gen: int, path: Path, items: list[str], machine_gb) -> None:
        """Thread: load the config with the edits, then ask the planner."""
        from mlxtune import config
        from mlxtune.errors import MlxtuneError

        try:
            cfg = config.load(path, items)
        except MlxtuneError as e:
            self.post_message(self.Planned(gen, {}, None, f"mlxtune: error: {e}"))
            return
        values = {k.key: knob_value(cfg, k) for k in self.knobs}
        data, data_error = data_summary(cfg, path)
        try:
            plan = plan_config(cfg, machine_gb)
        except MlxtuneError as e:
            self.post_message(self.Planned(gen, values, None, f"mlxtune: error: {e}", data,
                                           data_error, cfg))
            return
        self.post_message(self.Planned(gen, values, plan, "", data, data_error, cfg))

    def _truncate(self, gen: int, cfg, path: Path) -> None:
        """Thread: the train split's truncation share at this max_seq_len."""
        result, error = data_truncation(cfg, path)
        self.post_message(self.Truncation(gen, result, error))

    def on_plan_screen_truncation(self, message: Truncation) -> None:
        if message.generation != self._generation:
            return
        self.truncation, self.truncation_error = message.result, message.error
        self._draw_data()

    def on_plan_screen_planned(self, message: Planned) -> None:
        if message.generation != self._generation:
            return  # a newer edit is being planned
        if message.values:
            self.values = message.values
        self.plan, self.error = message.plan, message.error
        self.data, self.data_error = message.data, message.data_error
        self.truncation, self.truncation_error = None, ""
        if self.data is not None and message.cfg is not None:
            cfg, path, gen = message.cfg, self.app.config_path, message.generation
            self.run_worker(lambda: self._truncate(gen, cfg, path), thread=True,
                            group="truncation", exclusive=True)
        table = self.query_one("#knobs", DataTable)
        edited = self.app.overrides
        for k in self.knobs:
            value = self.values.get(k.key, "?")
            shown = Text(_show(value), "bold" if _is_edited(k, edited) else "")
            if _is_edited(k, edited):
                shown.append(" *", "yellow")
            table.update_cell(k.key, "value", shown)
        message = self.query_one("#message", MessageLine)
        if self.error:
            self.say(self.error, "error")
        elif message.has_class("error"):
            self.say("")  # the edit that caused it has been replaced
        self._draw_verdicts()

    # ------------------------------------------------------------------ editing

    def _knob(self) -> Knob:
        table = self.query_one("#knobs", DataTable)
        return self.knobs[table.cursor_row or 0]

    def action_step(self, direction: int) -> None:
        knob = self._knob()
        if knob.key not in self.values:
            return
        value = step_value(knob, self.values[knob.key], direction)
        if value != self.values[knob.key]:
            self.apply(knob, value)

    def apply(self, knob: Knob, value) -> None:
        self.app.overrides = set_knob(self.app.overrides, knob, value)
        self.values[knob.key] = value
        self.replan()

    def action_edit(self) -> None:
        knob = self._knob()

        def typed(text: str | None) -> None:
            if text is not None:
                self.apply(knob, parse_typed(text) if knob.key != "model.path" else text)

        self.app.push_screen(TypeValue(knob.label, _show(self.values.get(knob.key, ""))),
                             typed)

    def action_undo(self) -> None:
        self.app.overrides = {}
        self.replan()

    async def action_start(self) -> None:
        if self.error:
            self.say(self.error, "error")
            return
        await self.app.start_training_view()

    def action_write(self) -> None:
        path = self.app.config_path
        if path is None:
            return

        def chosen(target: str | None) -> None:
            if target:
                self.run_worker(lambda: self._write(path, Path(target)), thread=True,
                                group="write")

        self.app.push_screen(TypeValue("save the config as", str(path),
                                       note="comments in the file are not kept"), chosen)

    def _write(self, source: Path, target: Path) -> None:
        from mlxtune import config
        from mlxtune.errors import MlxtuneError

        items = list(self.app.override_items)
        try:
            config.load(source, items)  # never save a config that does not load
            if not target.parent.is_dir():
                raise MlxtuneError(f"{target.parent}: no such folder")
            if target.resolve().parent != source.resolve().parent:
                # Relative paths in a config are relative to its folder.
                raise MlxtuneError(f"{target}: save next to {source.name} (relative paths "
                                   "in it are relative to its folder)")
            write_atomic(target, edited_yaml(source, self.app.overrides))
        except (MlxtuneError, OSError) as e:
            self.app.call_from_thread(self.say, f"mlxtune: error: {e}", "error")
            return
        self.app.call_from_thread(self._written, target)

    def _written(self, target: Path) -> None:
        self.app.config_path, self.app.overrides = target, {}
        self.say(f"saved {target}", "ok")
        self.replan()

    def say(self, text: str, level: str = "info") -> None:
        self.query_one("#message", MessageLine).say(text, level)

    # ------------------------------------------------------------------ drawing

    def _draw_config_line(self) -> None:
        app = self.app
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(str(app.config_path or "no config"), "bold")
        if app.overrides:
            line.append(f"  {len(app.overrides)} edit(s): ", "yellow")
            line.append(" ".join(f"{k}={v}" for k, v in app.overrides.items()), "dim")
        self.query_one("#config-line", Static).update(line)
        self.query_one("#nav", NavBar).set_context(str(app.config_path or ""))

    def _draw_verdicts(self) -> None:
        width = max(self.query_one("#verdicts").content_size.width, 30)
        self.query_one("#verdicts", Static).update(
            Text("") if self.error else verdict_text(self.plan, width))
        self._draw_data()

    def _draw_data(self) -> None:
        panel = self.query_one("#data", Static)
        if self.data is not None:
            panel.border_title = f"data ({self.data['format']})"
        panel.update(data_text(self.data, self.data_error, self.truncation,
                               self.truncation_error))


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "-"
    text = str(value)
    return text if len(text) <= 22 else "…" + text[-21:]


def _is_edited(knob: Knob, overrides: dict[str, str]) -> bool:
    return any(k == knob.key or k.startswith(knob.key + ".") for k in overrides)


class TypeValue(ModalScreen[str]):
    """One line of input for a knob (or a file name); escape cancels."""

    DEFAULT_CSS = """
    TypeValue { align: center middle; }
    TypeValue > Vertical { width: 64; height: auto; border: thick $primary;
                           background: $surface; padding: 0 1; }
    """
    BINDINGS = [("escape", "dismiss", "Cancel")]

    def __init__(self, label: str, value: str, note: str = ""):
        super().__init__()
        self.label, self.value, self.note = label, value, note

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.label, "bold"))
            yield Input(self.value, id="value")
            yield Label(Text(self.note or "enter accepts, escape cancels", "dim"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)


def plan_config(cfg, machine_gb: float | None) -> dict:
    """The memory planner's answer for `cfg` (mlxtune.memory.Plan.to_dict(): the same
    object `mlxtune plan --json` prints); `machine_gb` overrides this machine's usable
    memory. Runs in a worker thread."""
    from mlxtune import memory

    return memory.plan(cfg, usable_gb=machine_gb).to_dict()


def _relative(message: str, config_path: Path) -> str:
    """An error with the config's folder left out of its paths (they are relative to it)."""
    folder = str(Path(config_path).resolve().parent) + os.sep
    return message.replace(folder, "")


def data_summary(cfg, config_path: Path) -> tuple[dict | None, str]:
    """(mlxtune.datacheck.summary's examples and leakage, or an error line). Thread."""
    from mlxtune.datacheck.summary import summary
    from mlxtune.errors import MlxtuneError

    try:
        return summary(cfg), ""
    except MlxtuneError as e:
        return None, _relative(str(e), config_path)
    except Exception as e:  # noqa: BLE001  (advice: never take the view down)
        return None, f"{type(e).__name__}: {e}".splitlines()[0]


def data_truncation(cfg, config_path: Path) -> tuple[dict | None, str]:
    """(the train split's truncation at data.max_seq_len, or an error line). Thread."""
    from mlxtune.datacheck.summary import truncation
    from mlxtune.errors import MlxtuneError

    try:
        return truncation(cfg), ""
    except MlxtuneError as e:
        return None, _relative(str(e), config_path)
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}".splitlines()[0]


def _clip(text: str, width: int = 74) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def data_text(data: dict | None, error: str, truncation: dict | None,
              truncation_error: str) -> Text:
    """The data panel: examples per split; the train split's truncation share at
    data.max_seq_len; held-out examples with a copy in train (`mlxtune data` lists them)."""
    out = Text()
    if data is None:
        return out.append(_clip(error) if error else "reading…", "red" if error else "dim")
    n = data["examples"]
    out.append(f"{n['train']:,} train · {n['valid']:,} valid · {n['test']:,} test")
    if truncation is not None:
        out.append(f"\ntruncated at {truncation['max_seq_len']}: ")
        out.append(f"{100 * truncation['share']:.1f}% ({truncation['truncated']:,})",
                   "yellow" if truncation["truncated"] else "green")
    elif truncation_error:
        out.append("\ntruncated: ").append(_clip(truncation_error, 60), "dim")
    else:
        out.append("\ntruncated: counting tokens…", "dim")
    leak = data["leakage"]
    out.append("\nleakage: ")
    if leak["valid"] or leak["test"] or leak["split_key"]:
        parts = [f"{leak[s]} {s}" for s in ("valid", "test") if leak[s]]
        if leak["split_key"]:
            parts.append(f"{leak['split_key']} key values")
        out.append(" + ".join(parts), "bold red").append(" in train", "red")
    else:
        out.append("none", "green")
    return out


# Breakdown items shown one a line; the adapter's three small ones are added together.
_SHOWN = (("base weights", ("base weights",)),
          ("adapter+grads+optim", ("LoRA adapter", "gradients", "optimizer state")),
          ("activations", ("activations",)),
          ("attention", ("attention",)),
          ("logits and loss", ("logits and loss",)),
          ("packing mask", ("packing mask",)),
          ("dequant (CPU)", ("dequantization (CPU)",)),
          ("framework", ("framework",)))


def _tier_line(label: str, detail: dict, width: int) -> Text:
    peak, usable, verdict = detail["peak_gb"], detail["usable_gb"], detail["verdict"]
    numbers = f" {peak:5.1f}/{usable:5.1f} "
    bar_width = max(width - len(label) - len(numbers) - 6, 4)
    line = Text(label, "bold")
    line.append(" ").append_text(tier_bar(peak * 1e9, usable * 1e9, bar_width))
    line.append(numbers)
    line.append(f"{verdict:<5}", VERDICT_STYLE.get(verdict, ""))
    return line


def verdict_text(plan: dict | None, width: int) -> Text:
    """The planner's breakdown (GB) and a bar per tier with its verdict and, for `tight`
    and `no`, the nearest knob that makes it fit."""
    if plan is None:
        return Text("planning…", "dim")
    here = plan["this_machine"]
    out = Text()
    out.append(f"peak {plan['peak_gb']:.2f} GB on a Mac ({plan['compute_dtype']})\n", "bold")
    if here["backend"] != "metal" or here["compute_dtype"] != plan["compute_dtype"]:
        out.append(f"here: {here['peak_gb']:.2f} GB ({here['backend']}, "
                   f"{here['compute_dtype']})\n", "dim")
    mac = plan["breakdown"]
    for label, keys in _SHOWN:
        value = sum(mac.get(k, 0.0) for k in keys)
        if value >= 0.0005:
            out.append(f"{label:<20}{value:>8.2f}\n")
    out.append("\n")
    rows = [(f"{name:>3} GB", plan["tier_details"][name]) for name in plan["tiers"]]
    rows.append(("  here", here))
    label_width = max(len(r[0]) for r in rows)
    for label, detail in rows:
        out.append_text(_tier_line(label.rjust(label_width), detail, width))
        out.append("\n")
    hints = [(label.strip(), d["hint"]) for label, d in rows if d.get("hint")]
    for label, hint in hints:  # "fits with KEY=VALUE (GB)": the knob is what matters here
        out.append(f"{label}: ", "bold")
        out.append(hint.removeprefix("fits with ").removeprefix("fits only with ") + "\n",
                   "yellow")
    out.rstrip()
    return out
