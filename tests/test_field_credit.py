"""objective.advantages fields: value spans, per-field advantages by hand, their layout on
a token's own column, and a tiny run that takes them end to end."""

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlxtune.objectives import field_credit as F
from mlxtune.objectives import grpo as G
from test_grpo import grpo_dir, trains  # noqa: F401  (the fixture)
from test_train import run_cli
from tiny import write_jsonl


class Chars:
    """A tokenizer whose tokens are characters (ids: code points)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def ids_of(text):
    return [ord(c) for c in text]


def test_value_spans():
    text = ' {"a": 1, "b" : [1, {"c": "}"}] ,"d":"x\\"y"}\n'
    spans = F.value_spans(text)
    assert {k: text[s:e] for k, (s, e) in spans.items()} == {
        "a": "1", "b": '[1, {"c": "}"}]', "d": '"x\\"y"'}
    assert F.value_spans('{"a": 1, "a": 2}') == {"a": (14, 15)}  # the last, as json.loads
    assert F.value_spans("{}") == {}
    for bad in ('{"a": 1', '[1, 2]', '{"a": 1} trailing', "", '"s"'):
        assert F.value_spans(bad) == {}, bad


def test_token_ends_follow_the_decoded_prefixes():
    text = '{"a": 1}'
    assert F.token_ends(Chars(), ids_of(text), text) == list(range(1, len(text) + 1))


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_field_advantages_by_hand(scale):
    """Group 1 (reference {"a": 1, "b": "x"}): json_valid (weight 1) + field_match (weight
    2). Field a's reward is json_valid + 2 x a's credit; its tokens take its advantage, the
    rest of each completion the completion's. Group 2's reference is not an object:
    field_match does not apply, every token takes the completion's advantage."""
    ref = '{"a": 1, "b": "x"}'
    texts = ['{"a": 1, "b": "x"}', '{"a": 2, "b": "x"}', '{"a": 1, "b": "y"}', "nope",
             "t1", "t2", "t3", "t4"]
    refs = [ref] * 4 + ["plain"] * 4
    valid = np.array([1, 1, 1, 0, 0, 0, 0, 0], float)
    fm = np.array([1, 0.5, 0.5, 0, np.nan, np.nan, np.nan, np.nan])
    total = valid + 2 * np.nan_to_num(fm) + np.array([0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4])
    adv, _ = G.advantages(total, 4, scale)
    batch_std = total.std(ddof=1)
    tok = [ids_of(t) for t in texts]
    per_token, per_field = F.token_advantages(Chars(), texts, tok, refs, fm, total, adv, 2.0,
                                              "exact", 4, scale, batch_std)

    def scaled(r):
        a = r - r.mean()
        if scale == "group":
            return a / (r.std(ddof=1) + 1e-4)
        if scale == "batch":
            return a / (batch_std + 1e-4)
        return a

    want_a = scaled(np.array([1 + 2, 1 + 0, 1 + 2, 0]))
    want_b = scaled(np.array([1 + 2, 1 + 2, 1 + 0, 0]))
    for i in range(4):
        assert per_field[i] == pytest.approx({"a": want_a[i], "b": want_b[i]})
    for i in range(3):  # the value's characters take the field's; the rest the completion's
        t = texts[i]
        want = np.full(len(t), adv[i])
        want[t.index(":") + 2] = want_a[i]
        b0 = t.rindex(":") + 2
        want[b0:b0 + 3] = want_b[i]
        np.testing.assert_allclose(per_token[i], want, rtol=1e-12)
    np.testing.assert_allclose(per_token[3], np.full(4, adv[3]))  # not JSON: no fields
    for i in range(4, 8):
        assert per_field[i] == {}
        np.testing.assert_allclose(per_token[i], np.full(2, adv[i]))
    if scale == "none":  # by hand: a's rewards 3, 1, 3, 0 (mean 1.75)
        assert [per_field[i]["a"] for i in range(4)] == pytest.approx([1.25, -0.75, 1.25, -1.75])


def test_a_field_that_does_not_vary_gets_nothing():
    """Every completion has a right and b wrong but one: b's tokens are pushed, a's are
    left alone, although the completions' totals differ."""
    ref = '{"a": 1, "b": "x"}'
    texts = ['{"a": 1, "b": "x"}'] + ['{"a": 1, "b": "z"}'] * 3
    fm = np.array([1, 0.5, 0.5, 0.5])
    total = fm.copy()
    adv, _ = G.advantages(total, 4, "group")
    per_token, per_field = F.token_advantages(Chars(), texts, [ids_of(t) for t in texts],
                                              [ref] * 4, fm, total, adv, 1.0, "exact", 4,
                                              "group", 0.0)
    assert all(f["a"] == 0 for f in per_field)
    assert per_field[0]["b"] > 0 > per_field[1]["b"]
    a_at = texts[1].index(":") + 2
    assert all(per_token[i][a_at] == 0 for i in range(4))
    assert per_token[1][0] == pytest.approx(adv[1])  # the brace: the completion's


def test_tokens_straddling_a_value_take_its_field():
    """Two-character tokens: one that holds the value's first character and the comma
    before it belongs to the value."""
    ref = '{"ab": 12, "b": 3}'
    texts = ['{"ab": 12, "b": 3}', '{"ab": 10, "b": 3}']
    ids = [ids_of(t) for t in texts]

    class Two:
        def decode(self, toks):  # each token is two characters (the last maybe one)
            return "".join(chr(c) for t in toks for c in t)

    pairs = [[tuple(i[k:k + 2]) for k in range(0, len(i), 2)] for i in ids]
    fm = np.array([1.0, 0.5])
    adv, _ = G.advantages(fm, 2, "none")
    per_token, per_field = F.token_advantages(Two(), texts, pairs, [ref] * 2, fm, fm, adv,
                                              1.0, "exact", 2, "none", 0.0)
    text = texts[1]
    spans = F.value_spans(text)
    held = 0
    for t in range(len(pairs[1])):
        inside = [k for k, (s, e) in spans.items() if 2 * t < e and 2 * t + 2 > s]
        want = per_field[1][inside[0]] if inside else adv[1]
        held += bool(inside)
        assert per_token[1][t] == pytest.approx(want), (t, text[2 * t:2 * t + 2])
    assert per_field[1]["ab"] < 0 and held == 3  # ' 1', '0,' and '3}' hold values


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_per_token_advantages_in_the_loss_match_numpy(loss_type):
    from test_grpo_loss import np_loss

    rng = np.random.default_rng(5)
    b, t = 6, 7
    lp = -rng.uniform(0.01, 4, (b, t))
    old = lp + rng.normal(0, 0.3, (b, t))
    adv = rng.normal(0, 1, (b, t))
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.float64)
    m64 = lambda x: mx.array(x, dtype=mx.float64)  # noqa: E731
    with mx.stream(mx.cpu):
        total, weight, _ = G.grpo_loss(m64(lp), m64(old), m64(adv), m64(mask),
                                       loss_type=loss_type, epsilon=0.2, epsilon_high=0.28,
                                       max_completion_tokens=16)
    want = np_loss(lp, old, None, adv, mask, loss_type, 0.2, 0.28, 0.0, 16)
    assert (total / weight).item() == pytest.approx(want, rel=1e-7)


def test_per_token_advantages_line_up_with_their_tokens(tiny_model_dir):
    """An advantage on a row's last token (its stop token) alone: at ratio 1 the dapo loss
    is -A / (completion tokens); laid out one column off it would fall on padding (0)."""
    from mlxtune import adapters, models
    from mlxtune.config import AdapterConfig, ModelConfig
    from mlxtune.objectives import rollout

    model = models.load(ModelConfig(path=str(tiny_model_dir))).model
    adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
    comps = [rollout.Completion([5, 6, 7], True, 2), rollout.Completion([8, 9], True, 2)]
    prompts = [[11, 12, 13, 14]]
    for shared in (False, True):
        if shared:
            tokens, mask, heads, lengths = rollout.collate_shared(prompts, comps, 2, 0, 8)
            extra = dict(prompts=heads, lengths=lengths, group=2)
        else:
            tokens, mask = rollout.collate(prompts, comps, 2, 0, 8)
            extra = {}
        lead = 1 if shared else 4
        adv = np.zeros(tokens.shape, np.float32)
        adv[0, lead + 3] = 2.0  # row 0's stop token
        total, weight, _ = G.grpo(model, tokens, mask, mx.array(adv), **extra)
        assert (total / weight).item() == pytest.approx(-2.0 / 7, rel=1e-5), shared


def test_a_run_with_field_advantages(grpo_dir, capsys, profile):
    """JSON references and field_match, under both profiles: the run trains with
    advantages per field, writes each sampled completion's field advantages, and resumes
    inside a rollout batch to the same adapter."""
    from test_train import adapter_of

    write_jsonl(grpo_dir / "json.jsonl", [
        {"messages": [{"role": "user", "content": f"task {i}"},
                      {"role": "assistant", "content": json.dumps({"n": i % 3, "t": "ab"})}]}
        for i in range(8)])
    cfg = yaml.safe_load((grpo_dir / "config.yaml").read_text())
    cfg["data"]["train"] = "json.jsonl"
    cfg["objective"].update(advantages="fields", max_completion_tokens=6, num_iterations=2,
                            rewards=[{"function": "r.py:lowercase"},
                                     {"name": "field_match", "weight": 1.0}])
    cfg["train"]["iters"] = 4
    (grpo_dir / "fields.yaml").write_text(yaml.safe_dump(cfg))
    whole, part = grpo_dir / "whole", grpo_dir / "part"
    code, out = run_cli(["run", str(grpo_dir / "fields.yaml"), "--run-dir", str(whole)], capsys)
    assert code == 0, out.err
    assert [e["step"] for e in trains(whole)] == [1, 2, 3, 4]
    samples = [json.loads(line) for line in (whole / "completions.jsonl").open()]
    # The tiny model writes no JSON: every field's credit is 0, so each field's reward is
    # the completion's total and its advantage the completion's.
    for s in samples:
        assert s["rewards"]["field_match"] == 0
        assert s["field_advantages"] == pytest.approx({"n": s["advantage"],
                                                       "t": s["advantage"]}, abs=1e-9)
    for iters, resume in ((3, []), (4, ["--resume"])):
        code, out = run_cli(["run", str(grpo_dir / "fields.yaml"), "--run-dir", str(part),
                             "--set", f"train.iters={iters}", *resume], capsys)
        assert code == 0, out.err
    a, b = adapter_of(whole / "adapters"), adapter_of(part / "adapters")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
