"""Generate the quickstart's preference pairs: the right task JSON against a realistic miss.

    python scripts/make_quickstart_preferences.py [--out data/quickstart]

writes preferences.jsonl: TRL's conversational shape, one pair a line,

    {"prompt": [system, user], "chosen": [assistant], "rejected": [assistant],
     "user": "u###", "failure": KIND}

The requests come from the same 80 simulated users as tasks.jsonl (scripts/
make_quickstart_data.py), with new draws of tasks and phrasings. "chosen" is the exact
answer; "rejected" is what small models tend to write instead (KINDS: prose or a code
fence around the JSON, a missing field, a wrong priority / date / assignee / status,
values outside the schema's enums, wrong types, broken JSON, extra keys, a title copied
with the request's filler words). "failure" names the kind, for analysis only. Where the
request names the due day as an ordinal ("June 2nd", "the 3rd") the rejected answer copies
the ordinal into the date ("2025-06-2nd", kind ordinal_date): the one schema failure the
quickstart's SFT adapter still makes on its held-out requests (always a single-digit day).
After the N_PAIRS pairs come N_DATE_PAIRS more about the due date alone (DATE_KINDS, in
turn), so DPO sees that failure often enough and not only that. Three kinds are on the
days whose ordinal suffix is irregular (1st, 2nd, 3rd: every date miss of the SFT adapter
on its held-out requests): the ordinal copied ("May 2nd" -> "2025-05-2nd"), the day
without its zero ("2025-05-2", what a first DPO adapter wrote once it had learnt to drop
the suffix) and the zero after the digit ("2025-05-20"); and two against over-correcting:
a two-digit day cut to a padded first digit ("2025-04-30" -> "2025-04-03") and a date
invented where the request has none, the misses of a DPO adapter trained on the first two
kinds alone.

The first 80 pairs go one per user, in the order users first appear in tasks.jsonl: the
split by user (data.split.by: user, same seed and fractions) then holds out the same
users as the SFT data, so the DPO test split is unseen by both SFT and DPO training.
Everything is drawn from seeded random.Random instances: reruns are byte-identical.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_quickstart_data as sft_data  # noqa: E402

SEED = 20250315
N_PAIRS = 1200
N_DATE_PAIRS = 300
OUT = sft_data.OUT

# kind -> weight: the format failures that break the schema, and the value failures that
# keep it but answer wrong.
KINDS = {
    "prose": 16, "code_fence": 6, "missing_field": 12, "wrong_priority": 14, "wrong_date": 14,
    "unresolved_date": 5, "wrong_assignee": 7, "wrong_status": 5, "bad_enum": 7,
    "wrong_type": 4, "broken_json": 4, "extra_key": 3, "filler_title": 3,
}

PROSE = [
    "Sure! Here is the task:\n{j}",
    "Here's the JSON for your task: {j}",
    "{j}\n\nI've created the task for you. Let me know if you want to change anything!",
    "Task created:\n{j}",
    "Okay, I'll add that task.\n\n{j}",
    "{j}\nThis task has been added to your list.",
]
FENCES = ["```json\n{j}\n```", "```\n{j}\n```", "Here you go:\n```json\n{j}\n```"]
BAD_PRIORITY = {"urgent": ["URGENT", "critical", "asap", "Urgent"], "high": ["High", "important",
                "HIGH"], "medium": ["normal", "Medium", "moderate"], "low": ["Low", "minor",
                "whenever"]}
BAD_STATUS = {"todo": ["to do", "Todo", "open", "pending", "new"],
              "in_progress": ["in progress", "In Progress", "wip", "started"],
              "done": ["Done", "completed", "finished"], "blocked": ["Blocked", "on hold",
                                                                     "waiting"]}
FILLERS = ["Add a task to ", "Create a task: ", "Remind me to ", "Please ", "Task: "]


def dumps(obj: dict, pretty: bool = False) -> str:
    return json.dumps(obj, indent=2) if pretty else json.dumps(obj, separators=(",", ":"))


def shift_date(iso: str | None, rng: random.Random) -> str:
    """A plausible wrong date: a week or a day off, the wrong month, last year."""
    if iso is None:  # a date where none was asked: today, or tomorrow
        return rng.choice([sft_data.TODAY, sft_data.TODAY + dt.timedelta(1)]).isoformat()
    d = dt.date.fromisoformat(iso)
    kind = rng.randrange(4)
    if kind == 0:
        return (d + dt.timedelta(days=rng.choice([-7, 7]))).isoformat()
    if kind == 1:
        return (d + dt.timedelta(days=rng.choice([-1, 1, 2]))).isoformat()
    if kind == 2:
        return d.replace(day=min(d.day, 28), month=d.month % 12 + 1).isoformat()
    return d.replace(year=d.year - 1).isoformat()


def reject(answer: dict, request: str, user: dict, kind: str, rng: random.Random) -> str:
    """The rejected answer of one kind, as text."""
    out = dict(answer)
    if kind == "prose":
        return rng.choice(PROSE).format(j=dumps(answer, pretty=rng.random() < 0.3))
    if kind == "code_fence":
        return rng.choice(FENCES).format(j=dumps(answer, pretty=rng.random() < 0.5))
    if kind == "missing_field":
        empty = [k for k in ("due_date", "assignee", "tags") if not answer[k]]
        keys = empty if empty and rng.random() < 0.7 else ["priority", "status", "due_date",
                                                             "assignee", "tags"]
        del out[rng.choice(keys)]
    elif kind == "wrong_priority":
        near = {"urgent": "high", "high": "urgent", "medium": "high", "low": "medium"}
        out["priority"] = near[answer["priority"]] if rng.random() < 0.6 else rng.choice(
            [p for p in ("low", "medium", "high", "urgent") if p != answer["priority"]])
    elif kind == "wrong_date":
        out["due_date"] = shift_date(answer["due_date"], rng)
    elif kind == "unresolved_date":
        d = answer["due_date"]
        out["due_date"] = rng.choice(["next Friday", "tomorrow", "end of month", "ASAP"]) \
            if d is None else rng.choice([dt.date.fromisoformat(d).strftime("%m/%d/%Y"),
                                          dt.date.fromisoformat(d).strftime("%B %d"),
                                          d.replace("-", "/")])
    elif kind == "wrong_assignee":
        out["assignee"] = None if answer["assignee"] else rng.choice(user["team"])
    elif kind == "wrong_status":
        out["status"] = rng.choice([s for s in ("todo", "in_progress", "done", "blocked")
                                    if s != answer["status"]])
    elif kind == "bad_enum":
        key = rng.choice(["priority", "status"])
        table = BAD_PRIORITY if key == "priority" else BAD_STATUS
        out[key] = rng.choice(table[answer[key]])
    elif kind == "wrong_type":
        choice = rng.randrange(3)
        if choice == 0:
            out["tags"] = ", ".join(answer["tags"]) if answer["tags"] else ""
        elif choice == 1:
            out["assignee"] = [answer["assignee"]] if answer["assignee"] else []
        else:
            out["due_date"] = "" if answer["due_date"] is None else answer["due_date"]
            out["tags"] = answer["tags"] or None
    elif kind == "broken_json":
        text = dumps(answer)
        choice = rng.randrange(3)
        if choice == 0:  # Python's repr of the dict
            return repr({k: v for k, v in answer.items()})
        if choice == 1:
            return text[:-1] + ",}"
        return text[:-1]  # cut off before the closing brace
    elif kind == "extra_key":
        out[rng.choice(["description", "notes", "created"])] = rng.choice(
            [request, "", sft_data.TODAY.isoformat()])
    elif kind == "filler_title":
        title = answer["title"]
        out["title"] = rng.choice(FILLERS) + title[0].lower() + title[1:]
    return dumps(out)


ORDINAL = re.compile(r"\b(\d{1,2})(st|nd|rd|th)\b")


def ordinal_date(answer: dict, request: str, unpadded: bool = False) -> str | None:
    """The answer with the request's ordinal day copied into the date, as the SFT model
    writes it ("2025-06-2nd"), or with `unpadded` and a single-digit day, the day without
    its zero ("2025-06-2"); None when the request names no ordinal due day."""
    due = answer["due_date"]
    if due is None:
        return None
    day = dt.date.fromisoformat(due).day
    match = next((m for m in ORDINAL.finditer(request) if int(m.group(1)) == day), None)
    if match is None:
        return None
    wrong = str(day) if unpadded and day < 10 else match.group(0)
    return dumps({**answer, "due_date": f"{due[:8]}{wrong}"})


# The date pairs' kinds, in turn: the SFT adapter's misses on the days with an irregular
# ordinal suffix (1st, 2nd, 3rd: the ordinal copied, the day without its zero, the zero
# put after the digit: "2025-04-30" for the 3rd) and the two misses a DPO adapter trained
# on the first two alone made instead (a two-digit day cut to its first digit, a date
# where none was asked).
DATE_KINDS = ["ordinal_date", "shortened_day", "unpadded_date", "invented_date",
              "zero_appended"]
# The single-digit days whose ordinal suffix is not "th": the SFT adapter's date misses
# on its held-out requests are all on these (the regular 4th..9th it pads right).
IRREGULAR_DAYS = ("01", "02", "03")


def date_miss(answer: dict, request: str, kind: str, rng: random.Random) -> str | None:
    """The answer with a date miss of `kind`, or None when the request does not fit it."""
    due = answer["due_date"]
    if kind == "invented_date":
        if due is not None:
            return None
        invented = f"2025-0{rng.randint(3, 6)}-0{rng.randint(1, 9)}"
        return dumps({**answer, "due_date": invented})
    if due is None:
        return None
    day = due[8:]
    if kind == "shortened_day":
        if day.startswith("0"):
            return None
        return dumps({**answer, "due_date": f"{due[:8]}0{day[0]}"})
    if day not in IRREGULAR_DAYS:  # the other kinds: 1st, 2nd, 3rd named as ordinals
        return None
    if kind == "zero_appended":
        if ordinal_date(answer, request) is None:
            return None
        return dumps({**answer, "due_date": f"{due[:8]}{day[1]}0"})
    return ordinal_date(answer, request, unpadded=kind == "unpadded_date")


def first_appearance(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row["user"], None)
    return list(seen)


def generate(seed: int = SEED, n: int = N_PAIRS, n_date: int = N_DATE_PAIRS) -> list[dict]:
    # The users exactly as make_quickstart_data draws them (same generator, same order).
    user_rng = random.Random(sft_data.SEED)
    users = [sft_data.make_user(f"u{i:03d}", user_rng) for i in range(sft_data.N_USERS)]
    weights = [user_rng.uniform(0.5, 1.5) for _ in users]
    by_id = {u["id"]: u for u in users}
    order = first_appearance(sft_data.generate())
    rng = random.Random(seed)
    kinds, kind_weights = list(KINDS), list(KINDS.values())
    rows = []
    for i in range(n):
        user = by_id[order[i]] if i < len(order) else rng.choices(users, weights)[0]
        example = sft_data.make_example(user, rng)
        system, request, answer = example["messages"]
        kind = rng.choices(kinds, kind_weights)[0]
        rejected = reject(json.loads(answer["content"]), request["content"], user, kind, rng)
        while rejected == answer["content"]:  # e.g. no tags to turn into a string
            kind = rng.choices(kinds, kind_weights)[0]
            rejected = reject(json.loads(answer["content"]), request["content"], user, kind, rng)
        # Drawn after the kind, so the other pairs stay as they were without this kind.
        ordinal = ordinal_date(json.loads(answer["content"]), request["content"])
        if ordinal is not None:
            kind, rejected = "ordinal_date", ordinal
        rows.append(pair(system, request, answer, rejected, user, kind))
    # The date pairs: their own generator, so the pairs above do not depend on them.
    date_rng = random.Random(seed + 1)
    while len(rows) < n + n_date:
        wanted = DATE_KINDS[(len(rows) - n) % len(DATE_KINDS)]
        while True:
            user = date_rng.choices(users, weights)[0]
            system, request, answer = sft_data.make_example(user, date_rng)["messages"]
            rejected = date_miss(json.loads(answer["content"]), request["content"], wanted,
                                 date_rng)
            if rejected is not None:
                break
        rows.append(pair(system, request, answer, rejected, user, wanted))
    return rows


def pair(system: dict, request: dict, answer: dict, rejected: str, user: dict,
         kind: str) -> dict:
    return {"prompt": [system, request], "chosen": [answer],
            "rejected": [{"role": "assistant", "content": rejected}], "user": user["id"],
            "failure": kind}


def write(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "preferences.jsonl"
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in generate():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    print(f"wrote {write(args.out)}")


if __name__ == "__main__":
    main()
