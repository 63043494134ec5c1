"""`mlxtune data`: planted exact and near duplicates, leaks, conflicts, over-long examples,
empty answers and control characters are found with exact counts; distinct examples from
one template are not near-duplicates; the token facts are the run's own encoding."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from mlxtune import config, data
from mlxtune.cli import main
from mlxtune.datacheck import check, leakage_note, minhash, text
from mlxtune.datacheck.fix import fix
from mlxtune.datacheck.report import text as report_text
from tiny import write_jsonl

SYSTEM = "Turn the request into task JSON with title, priority, owner and due day."
VERBS = ["draft", "review", "send", "book", "fix", "update", "plan", "archive", "print",
         "email", "order", "clean", "test", "ship", "sign", "file", "call", "audit",
         "rename", "measure"]
OBJECTS = ["the budget", "the roadmap", "the invoice", "the release notes", "the contract",
           "the slides", "the login page", "the team offsite", "the backup job",
           "the survey", "the hiring plan", "the press kit", "the garden shed", "the van",
           "the quarterly report", "the onboarding guide", "the server rack",
           "the newsletter", "the warranty claim", "the seating chart", "the api keys",
           "the demo video", "the dentist visit", "the tax forms", "the kitchen order",
           "the client deck", "the bug bounty", "the sprint board", "the style guide",
           "the data export"]
OPENERS = ["please", "can you", "todo:", "reminder:", "we need to", "someone should",
           "task:", "pls"]
OWNERS = ["ana", "ben", "chloe", "dev", "eli", "fay", "gus", "hana", "ivan", "jo",
          "kai", "lea", "mo", "nia", "omar"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
        "tomorrow", "next week", "end of month"]
PRIORITIES = ["low", "medium", "high", "urgent"]


def chat(user: str, answer: str, who: str, system: str = SYSTEM) -> dict:
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}], "user": who}


def task_example(rng: random.Random, task: str, who: str) -> dict:
    owner, day, prio = rng.choice(OWNERS), rng.choice(DAYS), rng.choice(PRIORITIES)
    user = f"{rng.choice(OPENERS)} {task} for {owner} by {day}, {prio} priority"
    answer = json.dumps({"title": task.capitalize(), "priority": prio, "owner": owner,
                         "due": day})
    return chat(user, answer, who)


def distinct_tasks() -> list[str]:
    """600 task phrases, each used once: no two template examples share their task."""
    tasks = [f"{v} {o}" for v, o in itertools.product(VERBS, OBJECTS)]
    random.Random(5).shuffle(tasks)
    return tasks


def long_example(rng: random.Random, who: str, i: int) -> dict:
    """A longer request (about 45 words), so that one changed word keeps J >= 0.8."""
    words = [rng.choice(["alpha", "bravo", "delta", "echo", "golf", "hotel", "india",
                         "kilo", "lima", "mike", "oscar", "papa", "romeo", "sierra",
                         "tango", "victor", "whiskey", "yankee", "zulu"]) + str(i)
             for _ in range(38)]
    return chat("background: " + " ".join(words), json.dumps({"title": f"Long task {i}",
                                                               "priority": "low"}), who)


def one_word_changed(example: dict) -> dict:
    out = json.loads(json.dumps(example))
    words = out["messages"][1]["content"].split()
    words[20] = "changedword"
    out["messages"][1]["content"] = " ".join(words)
    return out


def shouty(example: dict) -> dict:
    """The same record after normalising: other case, punctuation and spacing."""
    out = json.loads(json.dumps(example))
    for m in out["messages"][1:]:
        m["content"] = "  " + m["content"].upper().replace(" ", "   ") + " !!"
    return out


def noise(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
                    for _ in range(n))


# Planted in the generated data (see planted_data).
EXPECTED = {"exact": 5, "near": 4, "valid": 2, "test": 3, "conflicts": 3, "truncated": 5,
            "all_loss_lost": 3, "empty": 2, "control": 1, "split_key": 1}
MAX_LEN = 512


def planted_data(root: Path) -> dict:
    rng = random.Random(0)
    tasks = iter(distinct_tasks())
    train = [task_example(rng, next(tasks), f"u{i % 40}") for i in range(300)]
    valid = [task_example(rng, next(tasks), f"u{40 + i % 5}") for i in range(40)]
    test = [task_example(rng, next(tasks), f"u{45 + i % 5}") for i in range(40)]
    longs = [long_example(rng, f"u{i}", i) for i in range(6)]
    train += longs
    train += [shouty(train[i]) for i in (3, 10, 50, 70, 90)]            # 5 exact
    train += [one_word_changed(longs[i]) for i in range(4)]              # 4 near
    valid += [dict(one_word_changed(longs[i]), user="u41") for i in (4, 5)]  # 2 near leaks
    test += [dict(shouty(train[i]), user="u46") for i in (100, 110, 120)]  # 3 exact leaks
    for i in (130, 140, 150):                                           # 3 conflicts
        other = json.loads(train[i]["messages"][2]["content"])
        other.update(priority="urgent" if other["priority"] != "urgent" else "low",
                     owner="zed", due="someday", title="Something else entirely")
        train.append(chat(train[i]["messages"][1]["content"], json.dumps(other), "u7"))
    for i in range(3):                                 # 3 prompts past max_seq_len
        train.append(chat(noise(rng, 150), '{"title": "x"}', "u8"))
    for i in range(2):                                 # 2 answers cut by max_seq_len
        train.append(chat(f"short question {i}", noise(rng, 120), "u9"))
    train.append(chat("what is   this", " \t ", "u1"))                    # 2 empty answers
    train.append(chat("and this one", "", "u2"))
    train.append(chat("bell \x07 in the text", '{"title": "Bell"}', "u3"))  # 1 control char
    valid.append(task_example(rng, next(tasks), "u3"))  # a train user in valid: split key
    rng.shuffle(train)
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        write_jsonl(root / f"{name}.jsonl", rows)
    return {"train": train, "valid": valid, "test": test}


def write_config(root: Path, model_dir: Path, **data_keys) -> Path:
    cfg = {"name": "planted", "model": {"path": str(model_dir)},
           "data": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl",
                    "split": {"by": "user"}, "max_seq_len": MAX_LEN, **data_keys},
           "train": {"iters": 1, "batch_size": 2, "eval_every": 0}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("planted")
    rows = planted_data(root)
    cfg = config.load(write_config(root, tiny_model_dir))
    return root, cfg, rows, check(cfg)


def test_planted_problems_are_found_with_exact_counts(planted):
    _, _, rows, report = planted
    r = report.data
    assert r["duplicates"]["exact"] == EXPECTED["exact"]
    assert r["duplicates"]["near"] == EXPECTED["near"]
    assert r["leakage"]["valid"] == EXPECTED["valid"]
    assert r["leakage"]["test"] == EXPECTED["test"]
    assert r["conflicts"] == EXPECTED["conflicts"]
    assert r["empty_answer_count"] == EXPECTED["empty"]
    assert r["control_character_count"] == EXPECTED["control"]
    assert r["control_characters"][0]["characters"] == ["U+0007"]
    assert r["leakage"]["split_key"]["values"] == EXPECTED["split_key"]
    assert r["leakage"]["split_key"]["examples"][0]["value"] == "u3"
    train = r["splits"]["train"]
    assert train["examples"] == len(rows["train"]) - EXPECTED["empty"]
    assert train["truncated"] == EXPECTED["truncated"]
    assert train["all_loss_lost"] == EXPECTED["all_loss_lost"]
    assert r["splits"]["valid"]["truncated"] == r["splits"]["test"]["truncated"] == 0
    assert sorted(p["kind"] for p in r["leakage"]["pairs"]) == ["exact"] * 3 + ["near"] * 2
    assert all(p["similarity"] >= 0.8 for p in r["leakage"]["pairs"])
    assert r["problems"] == ["leakage", "split-key leakage", "conflicts", "empty answers"]
    assert report.exit_code == 1


def test_near_pairs_name_the_planted_lines(planted):
    root, _, rows, report = planted
    lines = {json.dumps(row): i + 1 for i, row in enumerate(rows["train"])}
    near = report.data["duplicates"]["near_pairs"]
    for first, later, jac in near:
        a = rows["train"][int(first.rpartition(":")[2]) - 1]
        b = rows["train"][int(later.rpartition(":")[2]) - 1]
        assert {a["messages"][1]["content"].split()[20],
                b["messages"][1]["content"].split()[20]} >= {"changedword"}
        assert 0.8 <= jac < 1
    assert len(lines) == len(rows["train"])


def test_token_facts_are_the_runs_own_encoding(planted, tiny_tokenizer):
    """Truncated / dropped counts equal what data.encode (the run) reports at MAX_LEN, and
    the token totals equal its untruncated encoding, example by example."""
    _, cfg, _, report = planted
    splits, fmt = data.load_splits(cfg.data, 0, [])
    enc = data.encode(splits["train"], tiny_tokenizer, MAX_LEN, None, fmt)
    train = report.data["splits"]["train"]
    assert train["truncated"] == enc.n_truncated
    assert train["all_loss_lost"] + train["no_loss"] == enc.n_dropped
    assert train["loss_tokens"] == sum(sum(e.mask) for e in enc.examples)
    whole = data.encode(splits["train"], tiny_tokenizer, 1 << 30, None, fmt)
    assert train["tokens"] == sum(len(e.tokens) for e in whole.examples)


def test_batched_renders_equal_the_encoder_for_multi_turn_tools_and_completions(
        tiny_tokenizer):
    from mlxtune.datacheck import tokens

    rng = random.Random(3)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    rows = []
    for i in range(40):
        turns = []
        for t in range(1 + i % 3):
            turns += [{"role": "user", "content": noise(rng, 4)},
                      {"role": "assistant", "content": noise(rng, 5)}]
        row = {"messages": [{"role": "system", "content": "sys"}] * (i % 2) + turns}
        if i % 4 == 0:
            row["tools"] = tools
        rows.append(row)
    recs = [data.Record(r, f"mem:{i + 1}") for i, r in enumerate(rows)]
    for history in (False, True):
        cfg = config.DataConfig(train="x", max_seq_len=64, mask_history=history)
        facts = tokens.split_tokens(recs, "chat", tiny_tokenizer, cfg)
        whole = data.encode(recs, tiny_tokenizer, 1 << 30, None, "chat", history)
        assert list(facts.lengths) == [len(e.tokens) for e in whole.examples]
        assert list(facts.loss) == [sum(e.mask) for e in whole.examples]
    comp = [data.Record({"prompt": noise(rng, 3), "completion": noise(rng, 4)}, f"c:{i}")
            for i in range(10)]
    facts = tokens.split_tokens(comp, "completions", tiny_tokenizer,
                                config.DataConfig(train="x", max_seq_len=64))
    whole = data.encode(comp, tiny_tokenizer, 1 << 30, None, "completions")
    assert list(facts.loss) == [sum(e.mask) for e in whole.examples]


def test_the_rendered_example_marks_the_loss_bearing_tokens(planted):
    example = planted[3].data["example"]
    loss = "".join(p["text"] for p in example["pieces"] if p["loss"])
    shown = "".join(p["text"] for p in example["pieces"])
    assert loss.endswith("<|im_end|>") and "<|im_start|>assistant\n" in shown
    assert not any(p["loss"] and "<|im_start|>" in p["text"] for p in example["pieces"])
    text_report = report_text(planted[3].data)
    assert "⟦" + loss.split("<|im_end|>")[0] in text_report


def test_distinct_examples_from_one_template_are_not_near_duplicates():
    """600 examples from one template (opener, task, owner, day, priority; no two share a
    task) plus 20 planted near copies: MinHash + LSH finds exactly the pairs whose exact
    Jaccard is >= 0.8 (brute force over all 192,510 pairs): precision 1.0 and recall 1.0
    here; the most similar distinct template examples are at 0.64."""
    rng = random.Random(1)
    rows = [task_example(rng, t, "u") for t in distinct_tasks()]
    longs = [long_example(rng, "u", i) for i in range(20)]
    rows += longs + [one_word_changed(x) for x in longs]
    idx = text.index(rows, "chat")
    found = {(a, b) for a, b, _ in minhash.near_pairs(idx.near_words, idx.near_offsets,
                                                      0.8, 3)}

    def shingle_set(row):
        words = " ".join(text.normalise(m["content"]) for m in row["messages"]
                         if m["role"] != "system").split()
        return {tuple(words[i:i + 3]) for i in range(max(len(words) - 2, 1))}

    sets = [shingle_set(r) for r in rows]
    truth, distinct_max = set(), 0.0
    for a, b in itertools.combinations(range(len(rows)), 2):
        jac = len(sets[a] & sets[b]) / len(sets[a] | sets[b])
        if jac >= 0.8:
            truth.add((a, b))
        elif a < 600 and b < 600:
            distinct_max = max(distinct_max, jac)
    assert len(truth) == 20 and found == truth  # precision and recall 1.0
    # The closest two distinct template examples (same opener, owner, day and priority,
    # one word of the task shared): 0.64, under the 0.8 threshold.
    assert distinct_max < 0.7


def test_word_hashes_match_the_reference_normalisation():
    samples = ["Buy milk!", "buy  milk", "  Ünïcode — dashes… “quotes” (x)", "a_b c-d",
               "\x1c sep \u2028 line", "", "!!!", "Straße STRASSE"]
    for s in samples:
        words = text.normalise(s).split()
        assert len(text.word_hashes(s)) == len(words)
        assert list(text.word_hashes(s)) == [text.word_hashes(w)[0] for w in words]
    assert list(text.word_hashes("Buy milk!")) == list(text.word_hashes("buy  MILK"))
    assert text.normalise("Straße") == text.normalise("STRASSE")


def test_lsh_bands_meet_the_recall_target():
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = minhash.bands_for(t)
        assert b * r <= minhash.NUM_PERM
        assert 1 - (1 - t ** r) ** b >= minhash.RECALL_AT_THRESHOLD
    assert minhash.bands_for(0.8) == (21, 6)


def test_preference_conflicts_are_reversed_pairs():
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b"},
            {"prompt": "p1", "chosen": "b", "rejected": "a"},  # reverses the first
            {"prompt": "p1", "chosen": "a", "rejected": "c"},  # another pair: fine
            {"prompt": "p2", "chosen": "x", "rejected": "y"}]
    from mlxtune.datacheck.overlap import Loaded, conflicts

    recs = [data.Record(r, f"p:{i + 1}") for i, r in enumerate(rows)]
    loaded = Loaded({"train": recs, "valid": [], "test": []}, "preference", [],
                    [("train", i) for i in range(4)])
    loaded.index = text.index(rows, "preference")
    assert len(conflicts(loaded)) == 1


# ----------------------------------------------------------------------------- CLI


def test_cli_json_and_exit_codes(planted, capsys, tmp_path, tiny_model_dir):
    root = planted[0]
    with pytest.raises(SystemExit) as e:
        main(["data", str(root / "config.yaml"), "--json"])
    assert e.value.code == 1
    out = json.loads(capsys.readouterr().out)
    for key in ("exact", "near"):
        assert out["duplicates"][key] == EXPECTED[key]
    assert out["leakage"]["valid"] == 2 and out["leakage"]["test"] == 3
    assert out["conflicts"] == 3 and out["splits"]["train"]["truncated"] == 5
    assert out["splits"]["valid"]["examples"] == 43

    clean = tmp_path / "clean"
    clean.mkdir()
    rng = random.Random(9)
    tasks = iter(distinct_tasks())
    for name, n in (("train", 30), ("valid", 5), ("test", 5)):
        write_jsonl(clean / f"{name}.jsonl",
                    [task_example(rng, next(tasks), f"{name}{i}") for i in range(n)])
    with pytest.raises(SystemExit) as e:
        main(["data", str(write_config(clean, tiny_model_dir)), "--set",
              "data.max_seq_len=64"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "clean: no leakage" in out and "truncated" in out

    with pytest.raises(SystemExit) as e:
        main(["data", str(root / "config.yaml"), "--set", "data.train=missing.jsonl"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl: data file not found" in err[0]


def test_fix_writes_a_clean_copy_and_a_config(planted, tmp_path, capsys):
    root, cfg, rows, report = planted
    before = {p: p.read_bytes() for p in root.iterdir()}
    out = tmp_path / "fixed"
    done = fix(report, cfg, out)
    assert done["dropped"] == {"leaked": 5, "exact_duplicates": 5, "empty_answers": 2}
    assert done["written"]["train"] == len(rows["train"]) - 12
    assert {p.read_bytes() for p in root.iterdir()} == set(before.values())  # untouched
    again = check(config.load(out / "config.yaml"))
    assert again.data["leakage"]["valid"] == again.data["leakage"]["test"] == 0
    assert again.data["duplicates"]["exact"] == 0
    assert again.data["conflicts"] == 3  # the user's call: not resolved
    with pytest.raises(SystemExit) as e:  # never over an existing folder
        main(["data", str(root / "config.yaml"), "--fix", str(out)])
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run / TUI


def test_leakage_note_for_run(planted):
    _, cfg, _, _ = planted
    splits, fmt = data.load_splits(cfg.data, 0, [])
    note = leakage_note(cfg, splits, fmt)
    assert note.startswith("leakage: 2 valid and 3 test examples also appear in train")
    assert "1 value of \"user\" is in two splits" in note
    assert note.rstrip().endswith("config.yaml")
    clean = {"train": splits["train"][:5], "valid": [], "test": []}
    assert leakage_note(cfg, clean, fmt) is None


def test_plan_view_data_summary(planted):
    from mlxtune.datacheck.summary import summary, truncation

    _, cfg, _, _ = planted
    s = summary(cfg)
    assert s["leakage"] == {"valid": 2, "test": 3, "split_key": 1}
    t = truncation(cfg)
    assert t["truncated"] == 5 and t["examples"] == s["examples"]["train"]
    cfg.data.max_seq_len = 1 << 20  # from the cached lengths
    assert truncation(cfg)["truncated"] == 0
    cfg.data.max_seq_len = MAX_LEN


def test_quickstart_report_runs_offline():
    """The quickstart data as the README shows it (its numbers are stated there)."""
    root = Path(__file__).resolve().parents[1]
    report = check(config.load(root / "configs/quickstart.yaml")).data
    assert report["splits"]["train"]["examples"] == 1655
    assert report["splits"]["train"]["truncated"] == 0
    assert report["leakage"]["split_key"]["values"] == 0
    assert report["conflicts"] == 0
    np.testing.assert_equal([report["leakage"]["valid"], report["leakage"]["test"]], [1, 3])


def test_run_prints_one_leakage_line(tmp_path, tiny_model_dir, capsys):
    """`mlxtune run` says it before training (and trains anyway: it is advice)."""
    rng = random.Random(4)
    tasks = iter(distinct_tasks())
    train = [task_example(rng, next(tasks), f"t{i}") for i in range(12)]
    test = [task_example(rng, next(tasks), "x") for _ in range(3)]
    test.append(dict(shouty(train[5]), user="x"))
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    cfg = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    cfg["data"].pop("valid")
    cfg["eval"] = {"auto": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    main(["run", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("leakage")]
    assert lines == [f"leakage: 1 test example also appears in train: mlxtune data "
                     f"{tmp_path / 'config.yaml'}"], err
    assert "done: step 1" in err


# ----------------------------------------------------------------------------- grpo


def test_grpo_config_reads_prompts_as_its_run(tmp_path, tiny_model_dir, tiny_tokenizer,
                                              capsys):
    """A grpo config's data is read for prompts, as its run reads it: prompt-only
    conversations and answered ones; prompt tokens by the run's own prompt encoder, the
    prompts it leaves out (longer than max_seq_len - max_completion_tokens), no loss-token
    numbers; conflicts only among answered prompts; a reward that needs answers makes the
    missing ones a problem (exit 1), one without does not."""
    from mlxtune.datacheck.summary import truncation
    from mlxtune.objectives.rollout import encode_prompts

    rng = random.Random(3)
    tasks = iter(distinct_tasks())
    answered = [task_example(rng, next(tasks), f"a{i}") for i in range(8)]
    alone = [{"messages": task_example(rng, next(tasks), f"p{i}")["messages"][:2],
              "user": f"p{i}"} for i in range(5)]
    long_prompt = {"messages": [{"role": "user", "content": noise(rng, 60)}], "user": "z"}
    # The same prompt alone and with an answer: no conflict (a prompt has no answer to
    # disagree with); the same prompt with two answers: one.
    again = {"messages": answered[0]["messages"][:2], "user": "a0"}
    other = json.loads(json.dumps(answered[1]))
    other["messages"][2]["content"] = '{"title": "Something else"}'
    train = answered + alone + [long_prompt, again, other]
    held = [task_example(rng, next(tasks), f"t{i}") for i in range(3)]
    held.append({"messages": held[0]["messages"][:2], "user": "t0"})
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "valid.jsonl", held)
    write_jsonl(tmp_path / "test.jsonl", [task_example(rng, next(tasks), f"s{i}")
                                          for i in range(3)])
    path = write_config(tmp_path, tiny_model_dir, max_seq_len=400)
    raw = yaml.safe_load(path.read_text())
    raw["objective"] = {"type": "grpo", "max_completion_tokens": 64,
                        "rewards": [{"name": "json_valid"}]}
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)
    report = check(cfg).data
    assert report["format"] == "chat" and report["prompt_room"] == 336
    tr = report["splits"]["train"]
    assert (tr["examples"], tr["with_reference"], tr["without_reference"]) == (16, 9, 7)
    assert "loss_tokens" not in tr and "truncated" not in tr
    splits, fmt = data.load_splits(cfg.data, 0, prompts=True)
    prompts = encode_prompts(splits["train"], fmt, tiny_tokenizer, 1 << 30, 0).examples
    lengths = [len(p.tokens) for p in prompts]
    assert tr["prompt_tokens"] == sum(lengths) and tr["length"]["max"] == max(lengths)
    run = encode_prompts(splits["train"], fmt, tiny_tokenizer, 400, 64)
    assert tr["left_out"] == run.n_truncated == sum(n > 336 for n in lengths) == 1
    assert report["conflicts"] == 1
    assert report["missing_references"] == [] and report["problems"] == ["conflicts"]
    assert report["example"]["reference"] == answered[0]["messages"][2]["content"]
    assert truncation(cfg)["truncated"] == tr["left_out"]

    with pytest.raises(SystemExit) as e:
        main(["data", str(path)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "found: conflicts (exit 1)" in out
    assert "read for prompts as objective.type grpo reads them" in out
    assert "loss tok " not in out and "no loss tokens: a grpo run trains on completions" in out
    assert "8 prompts have no reference answer (prompt only)" in out  # 7 train, 1 valid
    assert "its reference answer: '{" in out

    # field_match compares with the answers: the run refuses the prompts without one.
    with pytest.raises(SystemExit) as e:
        main(["data", str(path), "--set", 'objective.rewards=[{"name": "field_match"}]'])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert ("refused by a run: objective.rewards[0] (field_match) compares with a reference "
            "answer: 7 of the 16 prompts of train have none") in out
    assert "found: conflicts, prompts without the reference answers a reward needs" in out


def test_prompt_only_completions_and_leakage_note(tmp_path, tiny_model_dir):
    """Completions records read for prompts (a prompt alone, TRL's conversational prompt
    and completion): indexed for duplicates and leakage like any record, so `mlxtune run`'s
    leakage line sees a held-out prompt copied from train."""
    user = [{"role": "user", "content": "summarise the quarterly report for the board"}]
    train = [{"prompt": "write the release notes for version two"},
             {"prompt": user},
             {"prompt": user, "completion": [{"role": "assistant", "content": "done"}]},
             {"prompt": "plan the team offsite", "completion": "ok"}]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Write the release notes, for version two!"}])
    path = write_config(tmp_path, tiny_model_dir, valid=None, split=None)
    raw = yaml.safe_load(path.read_text())
    raw["objective"] = {"type": "grpo", "max_completion_tokens": 16,
                        "rewards": [{"name": "json_valid"}]}
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)
    report = check(cfg).data
    assert report["format"] == "completions"
    assert report["splits"]["train"]["without_reference"] == 2
    assert report["leakage"]["test"] == 1 and report["conflicts"] == 0
    splits, fmt = data.load_splits(cfg.data, 0, prompts=True)
    assert leakage_note(cfg, splits, fmt).startswith(
        "leakage: 1 test example also appears in train")
