"""Generation metrics: exact match, JSON validity, schema match, a user metric.

- exact match: prediction and reference are equal after stripping leading and trailing
  whitespace (nothing else is normalised).
- JSON valid: the whole prediction, stripped, parses as JSON (strict: no code fences, no
  text around it). Reported when every reference of the split is JSON, or a schema is given.
- schema match: with a JSON Schema file, the parsed prediction validates against it
  (formats such as "date" checked); without one, when every reference is a JSON object,
  the prediction is an object with the reference's keys and, per key, the same JSON type
  (null, boolean, number, string, array, object). Invalid JSON never matches.
- user metric: `module:function` or `path/to/file.py:function`, called as
  function(prediction, reference) -> float and averaged. A call that raises scores 0 and
  is counted (`metric_errors`): untuned models write text a metric may not expect.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

from mlxtune.errors import ConfigError


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


_INVALID = object()


def parse_json(text: str):
    """The JSON value of the whole text (stripped), or _INVALID."""
    try:
        return json.loads(text.strip())
    except ValueError:
        return _INVALID


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def same_shape(prediction, reference: dict) -> bool:
    """Same keys, and per key the same JSON type."""
    return (isinstance(prediction, dict) and prediction.keys() == reference.keys()
            and all(json_type(prediction[k]) == json_type(v) for k, v in reference.items()))


# ----------------------------------------------------------------------------- schema


class Schema:
    """A JSON Schema file, checked when loaded (a bad file is a one-line ConfigError)."""

    def __init__(self, path: str | Path, key: str = "eval.schema"):
        import jsonschema

        self.path = Path(path)
        where = f"{key}: {self.path}"
        if not self.path.is_file():
            raise ConfigError(f"{where}: JSON Schema file not found")
        try:
            schema = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: not a JSON file ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError(f"{where}: not a JSON Schema (a schema is an object or a "
                              f"boolean, this file holds {json_type(schema)})")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            at = "/".join(str(p) for p in e.absolute_path) or "top level"
            raise ConfigError(f"{where}: not a valid JSON Schema ({cls.__name__}): at {at}: "
                              f"{e.message}") from None
        self.validator = cls(schema, format_checker=cls.FORMAT_CHECKER)

    def matches(self, value) -> bool:
        return value is not _INVALID and self.validator.is_valid(value)


# ----------------------------------------------------------------------------- user metric


def load_metric(spec: str, key: str = "eval.metric"):
    """The function named by 'module:function' or 'path/to/file.py:function'."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"{key}: {spec!r}: expected module:function or file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"{key}: {spec}: file {path} not found")
        unique = f"mlxtune_user_metric_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"{key}: {spec}: importing {path} failed: "
                              f"{type(e).__name__}: {e}") from None
    else:
        # A console script does not have the working directory on sys.path.
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"{key}: {spec}: cannot import {module_name} ({e})") from None
        except Exception as e:
            raise ConfigError(f"{key}: {spec}: importing {module_name} failed: "
                              f"{type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{key}: {spec}: {module_name} has no function {func_name}")
    return func


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Decides which metrics apply to a split (from its references) and scores one side's
    predictions against them."""

    def __init__(self, references: list[str], schema: Schema | None = None,
                 metric=None, metric_name: str | None = None):
        self.references = references
        self.schema, self.metric, self.metric_name = schema, metric, metric_name
        parsed = [parse_json(r) for r in references]
        self.ref_json = parsed
        all_json = bool(parsed) and all(p is not _INVALID for p in parsed)
        self.objects = all_json and all(isinstance(p, dict) for p in parsed)
        self.use_json = all_json or schema is not None
        self.use_schema = schema is not None or self.objects
        # References the schema rejects: worth a warning (wrong schema, or wrong data).
        self.ref_schema_failures = (sum(not schema.matches(p) for p in parsed)
                                    if schema is not None else 0)

    def score(self, predictions: list[str]) -> dict:
        n = len(predictions)
        if n == 0:
            return {}
        refs = self.references[:n]
        out = {"exact_match": sum(map(exact_match, predictions, refs)) / n}
        parsed = [parse_json(p) for p in predictions]
        if self.use_json:
            out["json_valid"] = sum(p is not _INVALID for p in parsed) / n
        if self.use_schema:
            if self.schema is not None:
                ok = [self.schema.matches(p) for p in parsed]
            else:
                ok = [same_shape(p, r) for p, r in zip(parsed, self.ref_json)]
            out["schema_match"] = sum(ok) / n
        if self.metric is not None:
            total, errors, first = 0.0, 0, None
            for p, r in zip(predictions, refs):
                try:
                    value = float(self.metric(p, r))
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                    total += value
                except Exception as e:
                    errors += 1
                    first = first or f"{type(e).__name__}: {e}"
            out["metric"] = total / n
            out["metric_errors"] = errors
            if first:
                out["metric_first_error"] = first
        return out
