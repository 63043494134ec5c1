"""Tables and Hugging Face datasets -> rows for ``records.validate``.

Besides JSONL, a data file may be a table: parquet (needs pyarrow, which the `hub` extra
brings), csv (one row a record; cells holding JSON lists, such as a "messages" column, are
parsed) or json (an array of objects, or one object a line). ``data.hub`` names a Hugging
Face dataset instead, read with the `datasets` library (``pip install 'mlxtune-lora[hub]'``):
online it is downloaded into the datasets cache as `datasets.load_dataset` does; with
``HF_HUB_OFFLINE=1`` it is read from that cache, and an id that is not there is a one-line
error saying how to fetch it.

Columns are renamed into record fields by a ``ColumnsConfig`` (``data.columns`` for files,
``data.hub.columns`` for the hub): ``{prompt: question, completion: answer}``,
``{messages: conversations}``, ``{text: content}``, ``{prompt: ..., chosen: ...,
rejected: ...}``; a list of prompt columns is joined with a blank line. Message lists in
ShareGPT's shape (``from`` / ``value``, roles human / gpt) become role / content messages.
Every row keeps its "source" (``file:line`` or ``owner/name/split:row``, rows counted from
1), which errors and `mlxtune data` name.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

from mlxtune.errors import DataError

# Our split -> the names datasets use for it (first match wins), for forgiving lookups.
SPLIT_NAMES = {
    "train": ("train", "training"),
    "valid": ("validation", "valid", "val", "dev", "development", "eval", "evaluation"),
    "test": ("test", "testing"),
}
# Record fields that decide a record's format (records._FORMAT_KEYS).
FORMAT_FIELDS = ("messages", "prompt", "completion", "text", "chosen", "rejected")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "bot": "assistant", "model": "assistant", "system": "system", "tool": "tool",
              "function_response": "tool", "observation": "tool", "ipython": "tool"}


# ----------------------------------------------------------------------------- columns


class Columns:
    """A ColumnsConfig as a function: row -> record fields. `names` (the table's columns,
    when known up front) are checked at once; otherwise each row is checked."""

    def __init__(self, columns, key: str, what: str, names: list[str] | None = None):
        self.spec: dict[str, list[str]] = {}
        if columns is not None:
            for f in dataclasses.fields(columns):
                value = getattr(columns, f.name)
                cols = value if isinstance(value, list) else ([value] if value else [])
                if len(cols) > 1 and f.name != "prompt":
                    raise DataError(f"{key}.{f.name}: one column only (a list joins text "
                                    "columns for prompt alone)")
                if cols:
                    self.spec[f.name] = [str(c) for c in cols]
        self.key, self.what = key, what
        self.sources = {c for cols in self.spec.values() for c in cols}
        if names is not None:
            for name, cols in self.spec.items():
                for c in cols:
                    if c not in names:
                        raise DataError(f"{what}: {key}.{name}: no column \"{c}\"; its "
                                        f"columns: {', '.join(names) or 'none'}")

    def __call__(self, row: dict, where: str) -> dict:
        if not self.spec:
            return {k: _message_list(k, v) for k, v in row.items()}
        out = {k: v for k, v in row.items()
               if k not in self.sources and k not in FORMAT_FIELDS}
        for name, cols in self.spec.items():
            missing = [c for c in cols if c not in row]
            if missing:
                raise DataError(f"{where}: no \"{missing[0]}\" key ({self.key}.{name}); "
                                f"keys: {', '.join(sorted(row)) or 'none'}")
            if len(cols) == 1:
                out[name] = _message_list(name, row[cols[0]])
            else:
                parts = [row[c] for c in cols]
                bad = [c for c, p in zip(cols, parts) if p is not None and not isinstance(p, str)]
                if bad:
                    raise DataError(f"{where}: column \"{bad[0]}\" ({self.key}.{name}) is not "
                                    "text; only text columns can be joined")
                out[name] = "\n\n".join(p for p in parts if p and p.strip())
        return out


def _message_list(field: str, value):
    """JSON text in a csv cell -> its list; ShareGPT messages -> role / content."""
    if field not in ("messages", "chosen", "rejected", "prompt"):
        return value
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        value = parsed if isinstance(parsed, list) else value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and "role" not in m and "from" in m for m in value):
        value = [{"role": ROLE_NAMES.get(str(m["from"]).lower(), m["from"]),
                  "content": m.get("value")} for m in value]
    return value


def _no_nulls(row: dict) -> dict:
    """A table has every column in every row; a null cell is an absent key."""
    return {k: v for k, v in row.items() if v is not None}


# ----------------------------------------------------------------------------- files


def read_table(path: Path, columns=None):
    """(record fields, "file:N") for each row of a parquet, csv or json file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, columns)
    if suffix == ".csv":
        return _csv_rows(path, columns)
    return _json_rows(path, columns)


def _parquet_rows(path: Path, columns):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs pyarrow: pip install "
                        "'mlxtune-lora[hub]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors for a corrupt or non-parquet file
        raise DataError(f"{path}: cannot read this parquet file: {_first_line(e)}") from None
    rename = Columns(columns, "data.columns", str(path), table.column_names)
    for i, row in enumerate(table.to_pylist(), start=1):
        where = f"{path}:{i}"
        yield rename(_no_nulls(row), where), where


def _csv_rows(path: Path, columns):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8; save the file as UTF-8") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    names = list(reader.fieldnames or [])
    if not names:
        raise DataError(f"{path}:1: no header row (the first line names the columns)")
    rename = Columns(columns, "data.columns", str(path), names)
    start = 2
    try:
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in row:
                raise DataError(f"{where}: more cells than the header's {len(names)} columns")
            yield rename({k: v for k, v in row.items() if v is not None}, where), where
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _json_rows(path: Path, columns):
    """An array of objects (each named by the line it starts on), or JSON Lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8; save the file as UTF-8") from None
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":  # JSON Lines in a .json file, as datasets reads it
        rename = Columns(columns, "data.columns", str(path))
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            obj = _decode(line, 0, where)[0]
            yield rename(obj, where), where
        return
    rename = Columns(columns, "data.columns", str(path))
    decoder = json.JSONDecoder()
    i, line, counted = start + 1, 1, 0
    while True:
        i = _skip_space(text, i)
        if text[i:i + 1] == "]":
            break
        line += text.count("\n", counted, i)
        counted = i
        where = f"{path}:{line}"
        obj, i = _decode(text, i, where, decoder)
        yield rename(obj, where), where
        i = _skip_space(text, i)
        if text[i:i + 1] == ",":
            i += 1
        elif text[i:i + 1] != "]":
            line += text.count("\n", counted, i)
            counted = i
            raise DataError(f"{path}:{line}: invalid JSON: expected ',' or ']' after an "
                            "array element")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _decode(text: str, i: int, where: str, decoder=json.JSONDecoder()):
    try:
        obj, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object ({{...}}) per record")
    return obj, end


# ----------------------------------------------------------------------------- the hub


@dataclasses.dataclass
class HubRows:
    """Rows per split of ours; None for a held-out split the dataset does not have."""
    train: list
    valid: list | None
    test: list | None
    name: str  # "owner/name" (+ "/config")


def hub_rows(hub) -> HubRows:
    """Read data.hub's dataset (a HubConfig) and pick our splits out of its splits."""
    datasets = _import_datasets()
    name = hub.id + (f"/{hub.config}" if hub.config else "")
    dd = _load(datasets, hub)
    available = list(dd.keys())
    sizes = {k: len(dd[k]) for k in available}
    out = {}
    for ours in ("train", "valid", "test"):
        expr = getattr(hub.splits, ours)
        if expr is None:
            found = _find_split(ours, available)
            if found is None and ours == "train" and len(available) == 1:
                found = available[0]
            if found is None:
                if ours == "train":
                    raise DataError(f"data.hub.splits.train: {hub.id} has no split named "
                                    f"train (its splits: {', '.join(available)}); name the "
                                    "one to train on")
                out[ours] = None
                continue
            expr = found
        instructions = _instructions(datasets, str(expr), ours, hub.id, available, sizes)
        columns = Columns(hub.columns, "data.hub.columns", f"{hub.id}",
                          dd[instructions[0][0]].column_names)
        rows = []
        for split, lo, hi in instructions:
            part = dd[split].select(range(lo, hi)) if (lo, hi) != (0, sizes[split]) \
                else dd[split]
            for i, row in enumerate(part.to_list(), start=lo + 1):
                where = f"{name}/{split}:{i}"
                rows.append((columns(_no_nulls(row), where), where))
        out[ours] = rows
    return HubRows(out["train"], out["valid"], out["test"], name)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data.hub: reading Hugging Face datasets needs the datasets "
                        "library: pip install 'mlxtune-lora[hub]'") from None
    datasets.utils.logging.set_verbosity_error()  # no "using the cached version" notes
    datasets.disable_progress_bars()
    return datasets


def _load(datasets, hub):
    try:
        return datasets.load_dataset(hub.id, hub.config, revision=hub.revision)
    except ConnectionError:
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
        reason = ("the hub is switched off (HF_HUB_OFFLINE=1)" if offline else
                  "the hub cannot be reached")
        args = repr(hub.id) + (f", {hub.config!r}" if hub.config else "")
        raise DataError(f"data.hub.id: {hub.id} is not in the local datasets cache "
                        f"({datasets.config.HF_DATASETS_CACHE}) and {reason}; fetch it once "
                        f"where the hub is reachable: python -c \"import datasets; "
                        f"datasets.load_dataset({args})\"") from None
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds; one line each)
        kind = type(e).__name__
        text = _first_line(e)
        if kind == "DatasetNotFoundError":
            raise DataError(f"data.hub.id: {hub.id}: {text}") from None
        if "config" in text.lower() and isinstance(e, ValueError):
            raise DataError(f"data.hub.config: {hub.id}: {text}") from None
        raise DataError(f"data.hub.id: {hub.id}: cannot load the dataset: {kind}: "
                        f"{text}") from None


def _find_split(ours: str, available: list[str]) -> str | None:
    lower = {a.lower(): a for a in available}
    for candidate in SPLIT_NAMES[ours]:
        if candidate in lower:
            return lower[candidate]
    return None


_PART = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[.*\])?\s*$")


def _instructions(datasets, expr: str, ours: str, hub_id: str, available: list[str],
                  sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """A split expression ("train", "validation[:10%]", "train[:50]+test") -> (split, from,
    to) row ranges; split names are matched forgivingly (val -> validation)."""
    key = f"data.hub.splits.{ours}"
    parts = []
    for part in expr.split("+"):
        m = _PART.match(part)
        if not m:
            raise DataError(f"{key}: {expr!r} is not a split expression (e.g. train, "
                            "train[:90%], validation[100:200])")
        name, sl = m.group(1), m.group(2) or ""
        resolved = name if name in available else None
        if resolved is None:
            for group in SPLIT_NAMES.values():
                if name.lower() in group:
                    resolved = next((a for a in available if a.lower() in group), None)
        if resolved is None:
            raise DataError(f"{key}: no split \"{name}\" in {hub_id}; its splits: "
                            f"{', '.join(available)}")
        parts.append(resolved + sl)
    try:
        instruction = datasets.ReadInstruction.from_spec("+".join(parts))
        absolute = instruction.to_absolute(sizes)
    except (ValueError, AssertionError) as e:
        raise DataError(f"{key}: {expr!r}: {_first_line(e)}") from None
    out = [(a.splitname, a.from_, a.to) for a in absolute]
    if not any(hi > lo for _, lo, hi in out):
        raise DataError(f"{key}: {expr!r} selects no rows of {hub_id}")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
