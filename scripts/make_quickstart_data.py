"""Generate the quickstart dataset: natural-language task requests -> strict JSON.

    python scripts/make_quickstart_data.py [--out data/quickstart]

writes tasks.jsonl (chat records tagged with a simulated "user") and task.schema.json.
Everything is drawn from one seeded random.Random, so rerunning reproduces the committed
files byte for byte. Each simulated user has their own habits (openers, casing, slang,
typos, how they say priorities, dates and owners), so splitting by "user" holds out
phrasings the model has not seen, not just new tasks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

SEED = 20250314
N_EXAMPLES = 2000
N_USERS = 80
TODAY = dt.date(2025, 3, 14)
OUT = Path(__file__).resolve().parents[1] / "data" / "quickstart"

SYSTEM = (f"Today is {TODAY.isoformat()} ({TODAY:%A}). Turn the request into task JSON: title; "
          "priority low/medium/high/urgent (default medium); status "
          "todo/in_progress/done/blocked (default todo); due_date YYYY-MM-DD or null; "
          "assignee or null; tags list.")

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Task",
    "description": "One task, as the quickstart assistant writes it (keys in this order).",
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "priority": {"enum": ["low", "medium", "high", "urgent"]},
        "status": {"enum": ["todo", "in_progress", "done", "blocked"]},
        "due_date": {"type": ["string", "null"], "format": "date",
                     "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "assignee": {"type": ["string", "null"], "minLength": 1},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
    },
    "required": ["title", "priority", "status", "due_date", "assignee", "tags"],
    "additionalProperties": False,
}

# ----------------------------------------------------------------------------- vocabulary

# (task as a user would say it, tags a user might attach). The title is the phrase with its
# first letter capitalized, so it can always be read off the request.
TASKS = [
    ("fix the login bug on mobile", ["bug", "mobile"]),
    ("update the onboarding docs", ["docs", "onboarding"]),
    ("prepare the Q2 budget review", ["finance", "planning"]),
    ("renew the SSL certificate", ["ops", "security"]),
    ("write the release notes for v2.3", ["release", "docs"]),
    ("book a meeting room for the offsite", ["events"]),
    ("review Dana's pull request", ["code-review"]),
    ("migrate the database to Postgres 16", ["backend", "database"]),
    ("send the invoice to Acme Corp", ["finance", "billing"]),
    ("call the insurance company", ["admin"]),
    ("clean up the old feature flags", ["tech-debt", "backend"]),
    ("draft the newsletter for April", ["marketing", "content"]),
    ("set up CI for the new repo", ["devops", "ci"]),
    ("order new laptops for the interns", ["it", "hardware"]),
    ("plan the team lunch", ["team", "events"]),
    ("reply to the customer complaint about shipping", ["support"]),
    ("update the pricing page", ["website", "marketing"]),
    ("investigate the memory leak in the worker", ["bug", "backend"]),
    ("schedule the quarterly security audit", ["security", "compliance"]),
    ("translate the help center into Spanish", ["docs", "i18n"]),
    ("backup the production database", ["ops", "database"]),
    ("pay the electricity bill", ["personal", "bills"]),
    ("buy a birthday gift for mom", ["personal"]),
    ("renew my passport", ["personal", "travel"]),
    ("book flights to Berlin", ["travel"]),
    ("write unit tests for the payment service", ["testing", "backend"]),
    ("design the new dashboard mockups", ["design", "ui"]),
    ("archive last year's Slack channels", ["admin"]),
    ("run the customer satisfaction survey", ["research", "support"]),
    ("fix the broken links in the footer", ["bug", "website"]),
    ("prepare slides for the board meeting", ["presentation"]),
    ("hire a contractor for the kitchen", ["personal", "home"]),
    ("rotate the API keys", ["security", "ops"]),
    ("submit the expense report", ["finance", "admin"]),
    ("update the employee handbook", ["hr", "docs"]),
    ("organize the Friday demo", ["team"]),
    ("add dark mode to the settings screen", ["feature", "ui"]),
    ("reduce the page load time on the homepage", ["performance", "website"]),
    ("write a blog post about the launch", ["marketing", "content"]),
    ("set up the monitoring alerts", ["ops", "monitoring"]),
    ("onboard the new sales rep", ["hr", "sales"]),
    ("renegotiate the cloud contract", ["finance", "vendors"]),
    ("fix the typo in the welcome email", ["bug", "email"]),
    ("clean the garage", ["personal", "home"]),
    ("upgrade the React version", ["frontend", "tech-debt"]),
    ("file the quarterly taxes", ["finance", "taxes"]),
    ("test the checkout flow on Safari", ["testing", "frontend"]),
    ("send the contract to legal", ["legal"]),
    ("record the product demo video", ["marketing", "video"]),
    ("audit the user permissions", ["security"]),
    ("write the job description for the data engineer role", ["hr", "hiring"]),
    ("collect feedback from the beta users", ["research", "product"]),
    ("refactor the notification service", ["backend", "tech-debt"]),
    ("update the privacy policy", ["legal", "website"]),
    ("set up the new printer", ["it", "office"]),
    ("prepare the onboarding checklist", ["hr", "onboarding"]),
    ("benchmark the search API", ["performance", "backend"]),
    ("respond to the RFP from Globex", ["sales"]),
    ("fix the flaky integration tests", ["testing", "ci"]),
    ("schedule the dentist appointment", ["personal", "health"]),
    ("water the office plants", ["office"]),
    ("migrate the blog to the new CMS", ["website", "content"]),
    ("review the Q1 sales numbers", ["sales", "finance"]),
    ("add rate limiting to the public API", ["backend", "security"]),
    ("create the social media calendar", ["marketing"]),
    ("update the README", ["docs"]),
    ("replace the broken monitor in room 4", ["it", "office"]),
    ("document the deployment process", ["docs", "devops"]),
    ("interview candidates for the designer role", ["hiring"]),
    ("set up SSO for the admin panel", ["security", "feature"]),
    ("fix the crash when uploading large files", ["bug", "backend"]),
    ("plan the sprint retro", ["team", "agile"]),
    ("export the analytics report for marketing", ["analytics", "marketing"]),
    ("cancel the unused SaaS subscriptions", ["finance", "vendors"]),
    ("write the postmortem for the outage", ["ops", "incident"]),
    ("update the iOS app screenshots", ["mobile", "marketing"]),
    ("change the car oil", ["personal", "car"]),
    ("prepare the training materials for support", ["support", "training"]),
    ("move the staging server to the new region", ["devops", "infra"]),
    ("add search filters to the orders page", ["feature", "frontend"]),
]

NAMES = ["Maria", "Tom", "Priya", "Chen", "Jake", "Aisha", "Lucas", "Sofia", "Omar", "Emma",
         "Raj", "Yuki", "Ben", "Fatima", "Diego", "Hannah", "Kofi", "Lena", "Marco", "Nina",
         "Sam", "Zoe", "Alex", "Ines", "Jonas", "Mei", "Noah", "Olga", "Pedro", "Rosa", "Sven",
         "Tariq", "Uma", "Victor", "Wen", "Ana", "Leo", "Ivy", "Max", "Kim"]

PRIORITY_WORDS = {
    "urgent": ["urgent", "asap", "critical", "top priority", "right away", "it's an emergency",
               "drop everything for this", "p0", "super urgent", "needs doing immediately"],
    "high": ["high priority", "important", "p1", "high pri", "pretty important",
             "make it a high priority", "this one matters"],
    "medium": ["medium priority", "normal priority", "p2", "medium pri", "regular priority"],
    "low": ["low priority", "whenever", "no rush", "someday", "when you get a chance", "p3",
            "nice to have", "not urgent", "low pri", "whenever there's time"],
}

STATUS_WORDS = {
    "todo": ["not started yet", "status todo", "haven't started"],
    "in_progress": ["already in progress", "I've started on it", "currently working on it",
                    "wip", "status in progress", "it's underway"],
    "done": ["already done", "done already, just logging it", "mark it as done",
             "finished this one already", "it's completed"],
    "blocked": ["blocked on {why}", "it's blocked until {why}", "on hold waiting for {why}",
                "stuck waiting on {why}", "blocked, need {why} first"],
}
BLOCKERS = ["legal", "the vendor", "design review", "budget approval", "IT access",
            "the client's answer", "the API docs", "a security review"]

ASSIGNEE_STYLES = ["assign to {n}", "assign it to {n}", "for {n}", "{n} should do it",
                   "give it to {n}", "@{n}", "owner: {n}", "{n} will handle it",
                   "have {n} take it", "put {n} on it"]

TAG_STYLES = ["tag it {and}", "tags: {comma}", "{hash}", "label it {and}", "tagged {comma}",
              "add tags {comma}", "labels {comma}"]

OPENERS = [  # (template, fits a finished or blocked task too)
    ("Add a task: {t}", True), ("Can you add a task to {t}", False),
    ("Please create a task to {t}", False), ("new task: {t}", True), ("todo: {t}", False),
    ("remind me to {t}", False), ("I need to {t}", False), ("we need to {t}", False),
    ("{t}", True), ("Put '{t}' on the board", True), ("hey, can you make a task to {t}", False),
    ("Task: {t}", True), ("Need a ticket to {t}", False), ("Could you log a task: {t}", True),
    ("Someone has to {t}", False), ("Don't let me forget to {t}", False),
    ("Create a ticket: {t}", True), ("track this: {t}", True), ("Log: {t}", True),
]
ENDINGS = ["", ".", "!", " thanks", " pls", " thx", ". Thank you!", " :)"]
SEPARATORS = [", ", ". ", " - ", "; ", " "]
SLANG = {"tomorrow": "tmrw", "please": "pls", "you": "u", "priority": "pri", "thanks": "thx",
         "with": "w/", "because": "bc", "before": "b4"}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]

# ----------------------------------------------------------------------------- dates


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _after_today(weekday: int) -> dt.date:
    """The first such weekday strictly after TODAY ("Friday" on a Friday is next week's)."""
    return TODAY + dt.timedelta(days=(weekday - TODAY.weekday() - 1) % 7 + 1)


def date_relative(rng: random.Random) -> tuple[str, dt.date]:
    n = rng.randint(2, 10)
    return rng.choice([
        ("today", TODAY), ("tonight", TODAY), ("tomorrow", TODAY + dt.timedelta(1)),
        ("the day after tomorrow", TODAY + dt.timedelta(2)),
        (f"in {n} days", TODAY + dt.timedelta(n)), ("in a week", TODAY + dt.timedelta(7)),
        ("in two weeks", TODAY + dt.timedelta(14)), ("in 2 weeks", TODAY + dt.timedelta(14)),
        ("end of the month", dt.date(2025, 3, 31)), ("end of month", dt.date(2025, 3, 31)),
        ("EOM", dt.date(2025, 3, 31)), ("end of April", dt.date(2025, 4, 30)),
    ])


def date_weekday(rng: random.Random) -> tuple[str, dt.date]:
    day = rng.randrange(7)
    name = WEEKDAYS[day]
    # "next X" only for Mon-Fri: from a Friday, both readings of it give the same day.
    return rng.choice([name, name, f"this {name}" if day >= 5 else f"next {name}"]), \
        _after_today(day)


def date_absolute(rng: random.Random) -> tuple[str, dt.date]:
    d = TODAY + dt.timedelta(rng.randint(1, 100))
    month = MONTHS[d.month - 1]
    short = month[:3]
    if d.month == TODAY.month and rng.random() < 0.3:
        return f"the {_ordinal(d.day)}", d
    return rng.choice([f"{month} {d.day}", f"{month} {_ordinal(d.day)}", f"{short} {d.day}",
                       f"{d.day} {month}", d.isoformat(), f"{short} {_ordinal(d.day)}"]), d


DATE_KINDS = {"relative": date_relative, "weekday": date_weekday, "absolute": date_absolute}
DUE_STYLES = ["by {d}", "due {d}", "deadline {d}", "{d}", "due by {d}", "needs to be done by {d}"]
# "in 3 days" reads wrong after "by": such phrases take one of these instead.
DUE_STYLES_IN = ["due {d}", "{d}", "needs to be done {d}"]

# ----------------------------------------------------------------------------- users


def make_user(uid: str, rng: random.Random) -> dict:
    """One simulated user's habits; everything they write is drawn from these."""
    return {
        "id": uid,
        "openers": rng.sample(OPENERS, rng.randint(2, 4)),
        "separator": rng.choice(SEPARATORS),
        "ending": rng.choice(ENDINGS),
        "lowercase": rng.random() < 0.35,
        "slang": rng.random() < 0.3,
        "typo_rate": rng.choice([0.0, 0.0, 0.0, 0.02, 0.05, 0.1]),
        "priority_words": {k: rng.sample(v, min(len(v), rng.randint(2, 3)))
                           for k, v in PRIORITY_WORDS.items()},
        "priority_first": rng.random() < 0.2,  # "URGENT: ..." rather than "..., urgent"
        "p_priority": rng.uniform(0.3, 0.9),
        "date_kinds": rng.sample(list(DATE_KINDS), rng.randint(1, 2)),
        "due_styles": rng.sample(DUE_STYLES, 2),
        "p_due": rng.uniform(0.3, 0.9),
        "assignee_styles": rng.sample(ASSIGNEE_STYLES, 2),
        "p_assignee": rng.uniform(0.1, 0.6),
        "tag_style": rng.choice(TAG_STYLES),
        "p_tags": rng.uniform(0.0, 0.6),
        "p_status": rng.uniform(0.05, 0.35),
        "shuffle_clauses": rng.random() < 0.5,
        "team": rng.sample(NAMES, 6),  # the people this user delegates to
    }


# ----------------------------------------------------------------------------- one example


def typo(word: str, rng: random.Random) -> str:
    """Swap, drop or double one letter (words with digits or under 4 letters are spared)."""
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def casualize(text: str, user: dict, rng: random.Random) -> str:
    """The user's habits applied to free text (never to the task, names or tags)."""
    words = []
    for w in text.split(" "):
        if user["slang"] and w.lower() in SLANG:
            w = SLANG[w.lower()]
        elif rng.random() < user["typo_rate"]:
            w = typo(w, rng)
        words.append(w)
    text = " ".join(words)
    return text.lower() if user["lowercase"] else text


def format_tags(tags: list[str], style: str) -> str:
    joined_and = tags[0] if len(tags) == 1 else ", ".join(tags[:-1]) + " and " + tags[-1]
    return style.format(**{"and": joined_and, "comma": ", ".join(tags),
                           "hash": " ".join("#" + t for t in tags)})


def make_example(user: dict, rng: random.Random) -> dict:
    task, task_tags = rng.choice(TASKS)
    out = {"title": task[0].upper() + task[1:], "priority": "medium", "status": "todo",
           "due_date": None, "assignee": None, "tags": []}
    clauses = []  # (text, protected: True if the habits must not touch it)
    if rng.random() < user["p_priority"]:
        out["priority"] = rng.choice(["low", "medium", "high", "urgent", "urgent", "high", "low"])
        clauses.append((rng.choice(user["priority_words"][out["priority"]]), False))
    if rng.random() < user["p_status"]:
        out["status"] = rng.choice(["in_progress", "in_progress", "done", "blocked", "todo"])
        phrase = rng.choice(STATUS_WORDS[out["status"]]).format(why=rng.choice(BLOCKERS))
        clauses.append((phrase, False))
    if rng.random() < user["p_due"]:
        phrase, date = DATE_KINDS[rng.choice(user["date_kinds"])](rng)
        out["due_date"] = date.isoformat()
        styles = DUE_STYLES_IN if phrase.startswith("in ") else user["due_styles"]
        clauses.append((rng.choice(styles).format(d=phrase), False))
    elif rng.random() < 0.05:
        clauses.append((rng.choice(["no deadline", "no due date"]), False))
    if rng.random() < user["p_assignee"]:
        out["assignee"] = rng.choice(user["team"])
        clauses.append((rng.choice(user["assignee_styles"]).format(n=out["assignee"]), True))
    if rng.random() < user["p_tags"]:
        out["tags"] = rng.sample(task_tags, rng.randint(1, len(task_tags)))
        clauses.append((format_tags(out["tags"], user["tag_style"]), True))
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": render_request(user, task, out, clauses, rng)},
                         {"role": "assistant", "content": json.dumps(out, separators=(",", ":"))}],
            "user": user["id"]}


def render_request(user: dict, task: str, out: dict, clauses: list, rng: random.Random) -> str:
    openers = [o for o, neutral in user["openers"]
               if neutral or out["status"] in ("todo", "in_progress")] or ["{t}"]
    opener = rng.choice(openers)
    head, _, tail = opener.partition("{t}")
    # The task keeps its case (the title is read off it), bar the first letter.
    if user["lowercase"]:
        task = task[0].lower() + task[1:]
    parts = [casualize(head, user, rng) + task + casualize(tail, user, rng)]
    if user["shuffle_clauses"]:
        rng.shuffle(clauses)
    if clauses and user["priority_first"] and out["priority"] != "medium" \
            and not clauses[0][1] and clauses[0][0] in user["priority_words"][out["priority"]]:
        lead = clauses.pop(0)[0]
        parts[0] = casualize(lead.upper() if len(lead) <= 6 else lead, user, rng) + ": " + parts[0]
    for text, protected in clauses:
        parts.append(text if protected else casualize(text, user, rng))
    return user["separator"].join(parts) + casualize(user["ending"], user, rng)


# ----------------------------------------------------------------------------- files


def generate(seed: int = SEED, n: int = N_EXAMPLES, n_users: int = N_USERS) -> list[dict]:
    rng = random.Random(seed)
    users = [make_user(f"u{i:03d}", rng) for i in range(n_users)]
    weights = [rng.uniform(0.5, 1.5) for _ in users]  # some users write more than others
    return [make_example(rng.choices(users, weights)[0], rng) for _ in range(n)]


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = generate()
    with open(out_dir / "tasks.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out_dir / "task.schema.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(SCHEMA, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    write(args.out)
    print(f"wrote {args.out / 'tasks.jsonl'} and {args.out / 'task.schema.json'}")


if __name__ == "__main__":
    main()
