"""The few-shot side of eval: which training examples, laid out how, fitted to the
context; its loss against numpy, and the verdict."""

import json

import numpy as np
import pytest

from mlxtune import data
from mlxtune.config import SplitConfig
from mlxtune.evaluate import few_shot, report
from mlxtune.evaluate.few_shot import Builder, Selector, Turns, similarity, words

SYSTEM = "Answer with JSON."
COLORS = ["red", "green", "blue", "amber", "violet"]


def chat(i: int, text: str | None = None) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": text or f"color {i}?"},
        {"role": "assistant", "content": json.dumps({"id": i, "color": COLORS[i % 5]})}],
        "user": f"u{i % 11}"}


def rec(i, text=None):
    return data.Record(chat(i, text), f"x.jsonl:{i + 1}")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def turns(text):
    return Turns(None, [], None, text)


def test_nearest_by_word_overlap_by_hand():
    train = [turns("book a table for two"), turns("remind Sam to renew the domain"),
             turns("renew the domain by Friday"), turns("buy milk"),
             turns("Renew the domain, Sam!")]
    sel = Selector(train)
    q = "remind Sam to renew the domain by friday"
    # Jaccard by hand: q has 8 words {remind, sam, to, renew, the, domain, by, friday}.
    # 1: 6 shared / 8 = 0.75; 2: 5 shared / 8 = 0.625; 4: 4 shared / 8 = 0.5; 0, 3: 0.
    assert similarity(words(q), words(train[1].request)) == pytest.approx(6 / 8)
    assert similarity(words(q), words(train[2].request)) == pytest.approx(5 / 8)
    assert sel.nearest(q, 3) == [1, 2, 4]
    # Too few with a shared word: the earliest others, in order.
    assert sel.nearest("buy", 2) == [3, 0]
    assert sel.nearest(q, 0) == []


def test_a_leaked_copy_of_the_request_is_never_a_shot():
    train = [turns("Renew the domain"), turns("renew THE domain!"), turns("renew a domain")]
    # 0 and 1 have the very words of the request: a copy (leakage), not an example.
    assert Selector(train).nearest("renew the domain", 2) == [2]


def test_ties_break_to_the_earlier_training_record():
    train = [turns("alpha beta"), turns("alpha gamma"), turns("alpha delta")]
    assert Selector(train).nearest("alpha", 2) == [0, 1]


def test_shots_come_from_train_only_and_the_prompt_is_the_template_render(tok):
    records = [rec(i, f"what is color {i % 7} of item {i}?") for i in range(60)]
    splits = data.split_records(records, SplitConfig(by="user", valid=0.2, test=0.2), 0, "x")
    train, held = splits["train"], splits["test"] + splits["valid"]
    train_sources = {r.source for r in train}
    builder = Builder(tok, train, "chat", 3, context=4096, max_new_tokens=16)
    for r in held:
        shot = builder.build(r, "chat")
        assert len(shot.shots) == 3 and shot.dropped == 0
        sources = {train[i].source for i in shot.shots}
        assert sources <= train_sources
        assert not sources & {h.source for h in held}
        # The conversation: the held-out system message, each shot's turns (least similar
        # first), then the held-out request, rendered with the generation prompt.
        messages = [{"role": "system", "content": SYSTEM}]
        for i in shot.shots:
            messages += train[i].data["messages"][1:]
        messages += r.data["messages"][1:-1]
        expect = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert shot.prompt == list(expect)
        nearest = builder.selector.nearest(few_shot.to_turns(r, "chat", True).request, 3)
        assert shot.shots == nearest[::-1]  # the nearest right before the request


def test_the_loss_covers_the_held_out_answer_only(tok):
    train = [rec(i) for i in range(10)]
    r = rec(42, "color 42 please?")
    shot = Builder(tok, train, "chat", 2, context=4096, max_new_tokens=8).build(r, "chat")
    ex = shot.example
    targets = [t for t, m in zip(ex.tokens, ex.mask) if m]
    assert tok.decode(targets) == r.data["messages"][-1]["content"] + "<|im_end|>"
    # The prompt is the example's start: the answer follows the prompt it is scored after.
    assert ex.tokens[:len(shot.prompt)] == shot.prompt


def test_shots_that_would_overflow_the_context_are_dropped_least_similar_first(tok):
    train = [rec(i, f"color {i} of the {'big ' * (i % 3)}house?") for i in range(12)]
    r = rec(99, "color 3 of the house?")
    full = Builder(tok, train, "chat", 3, context=100_000, max_new_tokens=20).build(r, "chat")
    alone = Builder(tok, train, "chat", 0, context=100_000, max_new_tokens=20).build(r, "chat")
    sizes = {}
    for context in range(len(alone.example.tokens), len(full.example.tokens) + 40):
        shot = Builder(tok, train, "chat", 3, context, max_new_tokens=20).build(r, "chat")
        assert len(shot.prompt) + 20 <= context and len(shot.example.tokens) <= context
        assert shot.shots == full.shots[len(full.shots) - len(shot.shots):]  # the nearest kept
        assert shot.dropped == 3 - len(shot.shots)
        sizes[len(shot.shots)] = True
    assert set(sizes) == {0, 1, 2, 3}  # every count happens on the way up
    # Not even the request fits: no shots, the prompt as the base side has it.
    tight = Builder(tok, train, "chat", 3, 10, max_new_tokens=20).build(r, "chat")
    assert tight.shots == [] and tight.prompt == alone.prompt


def test_plain_completions_without_a_template():
    class Plain:  # a tokenizer without a chat template: one id per character
        has_chat_template = False
        eos_token_id = 0
        eos_token_ids = {0}

        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    train = [data.Record({"prompt": f"Q: {w}? A:", "completion": f" {w.upper()}"}, f"t:{i}")
             for i, w in enumerate(["cat", "dog", "cow"])]
    held = data.Record({"prompt": "Q: dog? A:", "completion": " DOG"}, "h:1")
    shot = Builder(Plain(), train, "completions", 2, 1000, 4).build(held, "completions")
    # "Q: dog? A:" is a copy of train 1 (same words): excluded; the rest tie at 1/4.
    text = "Q: cat? A: CAT\n\nQ: cow? A: COW\n\nQ: dog? A:"
    assert shot.shots == [2, 0][::-1] or shot.shots == [0, 2][::-1]
    assert shot.prompt[0] == 1
    rendered = "".join(chr(t) for t in shot.prompt[1:])
    assert rendered.endswith("Q: dog? A:") and rendered.count("\n\n") == 2
    assert sorted(rendered.split("\n\n")[:2]) == sorted(text.split("\n\n")[:2])
    targets = "".join(chr(t) for t, m in zip(shot.example.tokens, shot.example.mask)
                      if m and t)
    assert targets == " DOG"


def test_model_context_reads_the_config():
    assert few_shot.model_context({"max_position_embeddings": 8192}) == 8192

    class T:
        model_max_length = 1024

    assert few_shot.model_context({}, T()) == 1024
    assert few_shot.model_context({}) == 2048


# ----------------------------------------------------------------------------- verdict


def result(tuned, few=None, base=None, key="metric", **extra):
    out = {"split": "test", "generated_examples": 179, "loss_examples": 179,
           "metric_name": "metrics.py:field_accuracy",
           "few_shot_setup": {"shots": 3}, "tuned": {key: tuned}, **extra}
    if few is not None:
        out["few_shot"] = {key: few}
    if base is not None:
        out["base"] = {key: base}
    return out


def test_verdict_by_hand():
    v = report.verdict_fields(result(0.834, 0.273, 0.0))
    assert v["verdict"] == ("The tuned adapter beats 3-shot prompting by 0.561 in field "
                            "accuracy (0.834 vs 0.273) on 179 test examples.")
    assert v["main_metric"]["compared_with"] == "few_shot"
    assert v["main_metric"]["difference"] == pytest.approx(0.561)
    v = report.verdict_fields(result(0.50, 0.49))
    assert v["verdict"].startswith("3-shot prompting comes within 0.02 of the tuned adapter "
                                   "on field accuracy (0.500 vs 0.490)")
    assert "training may not be worth it" in v["verdict"]
    v = report.verdict_fields(result(0.40, 0.45))
    assert v["verdict"].startswith("3-shot prompting beats the tuned adapter by 0.050 in "
                                   "field accuracy")
    # Rates in points; without a few-shot side, the zero-shot base.
    v = report.verdict_fields({**result(0.324, None, 0.0, key="exact_match"),
                               "metric_name": None})
    assert v["verdict"].startswith("The tuned adapter beats zero-shot prompting of the base "
                                   "by 32.4 points of exact match (32.4% vs 0.0%)")
    # Loss: lower is better, the margin relative (2%).
    v = report.verdict_fields({**result(1.00, 1.019, key="loss"), "metric_name": None})
    assert "comes within 2% of the tuned adapter on loss" in v["verdict"]
    v = report.verdict_fields({**result(0.08, 1.4, key="loss"), "metric_name": None})
    assert v["verdict"].startswith("The tuned adapter beats 3-shot prompting by 1.3200 nats "
                                   "of loss")
    # The user metric comes first, exact match next.
    r = result(0.8, 0.2)
    r["tuned"]["exact_match"], r["few_shot"]["exact_match"] = 0.1, 0.3
    assert report.verdict_fields(r)["main_metric"]["key"] == "metric"


def test_few_shot_loss_and_prompt_tokens_by_hand(tmp_path, tiny_model_dir, capsys):
    """The few-shot side's loss is the numpy cross-entropy of the held-out answers after
    the shots Builder lays out; its prompt tokens the mean length of those prompts."""
    from mlx_lm.utils import load_model, load_tokenizer

    from mlxtune import config as config_mod
    from mlxtune.cli import main
    from mlxtune.evaluate import held_out, train_records
    from test_evaluate import numpy_loss, write_config

    config = write_config(tmp_path, tiny_model_dir, eval={"shots": 2, "forgetting": False})
    try:
        main(["run", str(config), "--run-dir", str(tmp_path / "run"), "-q", "--no-eval"])
    except SystemExit as e:
        assert e.code in (0, None)
    capsys.readouterr()
    try:
        main(["eval", str(tmp_path / "run"), "--json", "-q", "--limit", "3"])
    except SystemExit as e:
        assert e.code in (0, None)
    got = json.loads(capsys.readouterr().out)
    assert "forgetting" not in got and got["few_shot_setup"]["shots"] == 2
    cfg = config_mod.load(tmp_path / "run" / "config.yaml")
    records, _ = held_out(cfg, "test")
    train, fmt = train_records(cfg)
    tok = load_tokenizer(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    max_new = got["max_new_tokens"]
    builder = Builder(tok, train, fmt, 2, 512, max_new)
    shots = [builder.build(r, "chat") for r in records]
    s, n = numpy_loss(model, [x.example for x in shots])
    assert got["few_shot"]["loss_tokens"] == n == got["base"]["loss_tokens"]
    assert got["few_shot"]["loss"] == pytest.approx(s / n, rel=1e-4)
    assert got["few_shot"]["prompt_tokens"] == pytest.approx(
        np.mean([len(x.prompt) for x in shots[:3]]))
    assert got["base"]["prompt_tokens"] < got["few_shot"]["prompt_tokens"]
    assert got["few_shot"]["shots"] == 2.0
    md = (tmp_path / "run" / "eval.md").read_text().splitlines()
    assert md[0].startswith("# Evaluation") and md[2] == got["verdict"]
    assert "| | base | 2-shot | tuned |" in md
    preds = [json.loads(x) for x in (tmp_path / "run" / "eval_predictions.jsonl").open()]
    train_sources = {r.source for r in train}
    for p in preds:
        assert len(p["shots"]) == 2 and set(p["shots"]) <= train_sources
