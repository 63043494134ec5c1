"""Data files -> validated records.

JSONL files are read here; parquet, csv and json tables and Hugging Face datasets come
through ``mlxtune.data.hub`` as rows and are validated the same way (``validate``). Every line is checked before anything is tokenized, and the first problem is reported as
one line, ``file:line: reason``, which is what the CLI prints. Three record shapes are
accepted (mlx-lm's): chat (``messages``), completions (``prompt`` + ``completion``) and
text (``text``), plus TRL's preference pairs (``prompt`` + ``chosen`` + ``rejected``, as
strings or message lists; see ``check_preference``). Extra keys are allowed (a ``user``
tag for splitting, say), but a record must match exactly one shape, and a file must use
one shape throughout.

Read for prompts (``prompts=True``: GRPO samples its own answers), a record needs no
answer: a chat conversation may end with a user (or tool) turn, a completions record may
hold ``prompt`` alone, and ``prompt`` may be TRL's conversational form (a message list
that does not end with the assistant; its ``completion``, if any, a string or assistant
messages). An answer that is there is the reference for rewards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import DataError


class EmptyAnswer(DataError):
    """A record whose answer is empty or whitespace: nothing to learn from. A run stops on
    the first; `mlxtune data` lists them all (read_records with `skipped`)."""


FORMATS = ("chat", "completions", "text", "preference")
ROLES = ("system", "user", "assistant", "tool")
# The keys that make a record one format or another.
_FORMAT_KEYS = {"chat": ("messages",), "completions": ("prompt", "completion"), "text": ("text",),
                "preference": ("chosen", "rejected")}


@dataclass
class Record:
    data: dict  # the JSON object, as read
    source: str  # "path/to/file.jsonl:LINE" (1-based)


TABLE_SUFFIXES = (".parquet", ".csv", ".json")


def read_records(path, columns=None, skipped: list | None = None,
                 prompts: bool = False) -> tuple[list[Record], str]:
    """Read and validate a data file; return its records and their format.

    JSONL is read line by line; parquet, csv and json (an array of objects) files are
    tables (mlxtune.data.hub.read_table); `columns` (a ColumnsConfig) renames keys or
    columns into record fields. With a `skipped` list, records with an empty answer are appended to
    it (as (Record, message)) and left out instead of stopping the read. `prompts`: records
    are read for their prompts, and need no answer (module docstring)."""
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        from mlxtune.data.hub import read_table

        rows = read_table(path, columns)
    elif columns is not None:
        from mlxtune.data.hub import Columns

        rename = Columns(columns, "data.columns", str(path))
        rows = ((rename(obj, where), where) for obj, where in _jsonl_rows(path))
    else:
        rows = _jsonl_rows(path)
    records, fmt = validate(rows, skipped, prompts)
    if fmt is None:
        raise DataError(f"{path}:1: no records (the file is empty or has only blank lines)")
    if not records:
        raise DataError(f"{path}: every record has an empty answer (nothing to learn from)")
    return records, fmt


def _jsonl_rows(path: Path):
    for lineno, raw in enumerate(_read_lines(path), start=1):
        where = f"{path}:{lineno}"
        obj = _parse_line(raw, where)
        if obj is not None:  # None: a blank line
            yield obj, where


def validate(rows, skipped: list | None = None,
             prompts: bool = False) -> tuple[list[Record], str | None]:
    """(JSON object, "source:N") pairs -> validated records and their one format
    (`prompts`: read for their prompts, answers optional)."""
    records: list[Record] = []
    fmt = first = None
    for obj, where in rows:
        this = detect_format(obj, where)
        if fmt is None:
            fmt, first = this, where
        elif this != fmt:
            line = first.rpartition(":")[2]
            raise DataError(f"{where}: this record is {this} data but line {line} is "
                            f"{fmt} data; one file must use one format")
        try:
            if prompts and this in PROMPT_CHECKS:
                PROMPT_CHECKS[this](obj, where)
            else:
                CHECKS[this](obj, where)
        except EmptyAnswer as e:
            if skipped is None:
                raise
            skipped.append((Record(obj, where), str(e)))
            continue
        records.append(Record(obj, where))
    return records, fmt


def _read_lines(path: Path) -> list[bytes]:
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    return data.split(b"\n")


def _parse_line(raw: bytes, where: str) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line); save the "
                        "file as UTF-8") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object ({{...}}) per line, got "
                        f"{_json_type(obj)}")
    return obj


def detect_format(obj: dict, where: str) -> str:
    matches = [f for f, keys in _FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if "preference" in matches and "completions" in matches and "completion" not in obj:
        matches.remove("completions")  # a preference pair's "prompt" is its own
    if not matches:
        found = ", ".join(sorted(obj)) or "none"
        raise DataError(f"{where}: no known format: expected \"messages\" (chat), \"prompt\" "
                        f"and \"completion\" (completions), \"text\" (text) or \"prompt\", "
                        f"\"chosen\" and \"rejected\" (preference); keys found: {found}")
    if len(matches) > 1:
        raise DataError(f"{where}: the record matches several formats ({', '.join(matches)}); "
                        "keep the keys of exactly one")
    return matches[0]


# ----------------------------------------------------------------------------- per format


def _check_conversation(obj: dict, where: str) -> list:
    """A conversation's messages and tools, each message checked; returns the messages."""
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _json_type(messages)
        raise DataError(f"{where}: \"messages\" must be a non-empty list of messages, got {got}")
    if "tools" in obj and obj["tools"] is not None and not isinstance(obj["tools"], list):
        raise DataError(f"{where}: \"tools\" must be a list, got {_json_type(obj['tools'])}")
    for i, message in enumerate(messages):
        _check_message(message, f"{where}: messages[{i}]")
    return messages


def check_chat(obj: dict, where: str) -> None:
    messages = _check_conversation(obj, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be from the assistant (it is what the "
                        f"model learns to write), got role \"{messages[-1]['role']}\" (a "
                        "conversation without its answer is a prompt for objective.type grpo)")


def _check_message(message, where: str) -> None:
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected an object with \"role\" and \"content\", got "
                        f"{_json_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        got = "no role" if role is None else f"role {json.dumps(role)}"
        raise DataError(f"{where}: unknown role: {got}; allowed roles: {', '.join(ROLES)}")
    content = message.get("content")
    # An assistant turn that calls tools may carry no text.
    if role == "assistant" and message.get("tool_calls"):
        if not isinstance(message["tool_calls"], list):
            raise DataError(f"{where}: \"tool_calls\" must be a list")
        if content is None or isinstance(content, str):
            return
    if content is None:
        raise DataError(f"{where}: {role} message has no \"content\"")
    if not isinstance(content, str):
        raise DataError(f"{where}: \"content\" must be a string, got {_json_type(content)}")
    if role == "assistant" and not content.strip():
        raise EmptyAnswer(f"{where}: empty assistant content (nothing to learn from)")


def check_completions(obj: dict, where: str) -> None:
    for key in ("prompt", "completion"):
        if key not in obj:
            hint = " (a prompt alone is for objective.type grpo)" if key == "completion" else ""
            raise DataError(f"{where}: completions record has no \"{key}\" (needs both "
                            f"\"prompt\" and \"completion\"){hint}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: \"{key}\" must be a string, got {_json_type(obj[key])}")
    if not obj["completion"].strip():
        raise EmptyAnswer(f"{where}: empty \"completion\" (nothing to learn from)")


def check_chat_prompt(obj: dict, where: str) -> None:
    """A conversation read for its prompt: a last assistant turn is the reference (the
    prompt is what comes before it); one that ends with a user or tool turn is all prompt."""
    messages = _check_conversation(obj, where)
    last = messages[-1]["role"]
    if last == "system":
        raise DataError(f"{where}: the conversation ends with a system message: a prompt "
                        "needs a user (or tool) turn to answer")
    if last == "assistant" and len(messages) == 1:
        raise DataError(f"{where}: no prompt: this conversation has only the assistant's "
                        "answer")


def check_completions_prompt(obj: dict, where: str) -> None:
    """A completions record read for its prompt: "prompt" a string or a message list (TRL's
    conversational prompt), "completion" (the reference) optional."""
    if "prompt" not in obj:
        raise DataError(f"{where}: completions record has no \"prompt\"")
    prompt = obj["prompt"]
    if isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            _check_message(message, f"{where}: prompt[{i}]")
        if prompt[-1]["role"] in ("assistant", "system"):
            raise DataError(f"{where}: the prompt's last message is from the "
                            f"{prompt[-1]['role']}: "
                            "a prompt needs a user (or tool) turn to answer")
    elif not isinstance(prompt, str):
        got = "an empty list" if prompt == [] else _json_type(prompt)
        raise DataError(f"{where}: \"prompt\" must be a string or a non-empty list of "
                        f"messages, got {got}")
    elif not prompt.strip():
        raise DataError(f"{where}: empty \"prompt\"")
    if "tools" in obj and obj["tools"] is not None and not isinstance(obj["tools"], list):
        raise DataError(f"{where}: \"tools\" must be a list, got {_json_type(obj['tools'])}")
    completion = obj.get("completion")
    if completion is None:
        return
    if isinstance(completion, list) and completion:
        for i, message in enumerate(completion):
            _check_message(message, f"{where}: completion[{i}]")
            if message["role"] != "assistant":
                raise DataError(f"{where}: completion[{i}]: the completion's messages must be "
                                f"the assistant's, got role \"{message['role']}\"")
    elif not isinstance(completion, str):
        raise DataError(f"{where}: \"completion\" must be a string or a list of assistant "
                        f"messages, got {_json_type(completion)}")
    elif not completion.strip():
        raise EmptyAnswer(f"{where}: empty \"completion\" (a prompt without a reference "
                          "answer leaves \"completion\" out)")


def check_text(obj: dict, where: str) -> None:
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: \"text\" must be a string, got {_json_type(text)}")
    if not text.strip():
        raise EmptyAnswer(f"{where}: empty \"text\"")


def check_preference(obj: dict, where: str) -> None:
    """TRL's preference shapes: "prompt", "chosen", "rejected" as strings (standard) or as
    message lists (conversational: the prompt's messages, then the answer's assistant
    turns), or "chosen" / "rejected" as whole conversations sharing their leading
    messages (implicit prompt)."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: preference record has no \"{key}\" (needs \"chosen\" "
                            "and \"rejected\", and a \"prompt\" unless both are whole "
                            "conversations)")
    if "tools" in obj and obj["tools"] is not None and not isinstance(obj["tools"], list):
        raise DataError(f"{where}: \"tools\" must be a list, got {_json_type(obj['tools'])}")
    prompt, chosen, rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
    if isinstance(prompt, str) or (prompt is None and isinstance(chosen, str)):
        if prompt is None:
            raise DataError(f"{where}: preference record has no \"prompt\" (string answers "
                            "need one; only message lists can carry the prompt inside them)")
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: \"{key}\" must be a string like \"prompt\", got "
                                f"{_json_type(obj[key])}")
            if not obj[key].strip():
                raise EmptyAnswer(f"{where}: empty \"{key}\" answer")
        if chosen == rejected:
            raise DataError(f"{where}: \"chosen\" and \"rejected\" are identical (nothing "
                            "to prefer)")
        return
    for key in ("chosen", "rejected"):
        value = obj[key]
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else _json_type(value)
            raise DataError(f"{where}: \"{key}\" must be a non-empty list of messages (or a "
                            f"string with a string \"prompt\"), got {got}")
        for i, message in enumerate(value):
            _check_message(message, f"{where}: {key}[{i}]")
    if chosen == rejected:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are identical (nothing to "
                        "prefer)")
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
    elif not isinstance(prompt, list) or not prompt:
        got = "an empty list" if prompt == [] else _json_type(prompt)
        raise DataError(f"{where}: \"prompt\" must be a string or a non-empty list of "
                        f"messages, got {got}")
    for i, message in enumerate(prompt):
        _check_message(message, f"{where}: prompt[{i}]")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt is not a prefix for an answer: its last message is "
                        "from the assistant (the answers go in \"chosen\" and \"rejected\")")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer:
            raise DataError(f"{where}: \"{key}\" has no answer after the prompt")
        if answer[0]["role"] != "assistant" or answer[-1]["role"] != "assistant":
            raise DataError(f"{where}: \"{key}\" must start and end with an assistant message "
                            "(the answer that follows the prompt)")
        if not any((m.get("content") or "").strip() or m.get("tool_calls") for m in answer):
            raise EmptyAnswer(f"{where}: empty \"{key}\" answer")


def split_implicit_prompt(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    """(prompt, chosen answer, rejected answer) from two whole conversations: the prompt is
    their common leading messages, up to the first assistant turn where they part."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1  # a shared assistant turn just before they part belongs to the answers
    if n == 0:
        raise DataError(f"{where}: no \"prompt\", and \"chosen\" and \"rejected\" share no "
                        "leading messages to use as one")
    return chosen[:n], chosen[n:], rejected[n:]


CHECKS = {"chat": check_chat, "completions": check_completions, "text": check_text,
          "preference": check_preference}
# Read for prompts (grpo): answers are optional references.
PROMPT_CHECKS = {"chat": check_chat_prompt, "completions": check_completions_prompt}


def _json_type(value) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
