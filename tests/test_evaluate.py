"""Evaluation (base vs tuned on a held-out split): metrics by hand, loss and perplexity
against numpy, greedy decoding against one-at-a-time full forwards and mlx_lm, the run
directory end to end, and bad input."""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml

from mlxtune import adapters, data
from mlxtune.cli import main
from mlxtune.errors import ConfigError
from mlxtune.evaluate import generate, split_loss
from mlxtune.evaluate.metrics import Schema, Scorer, exact_match, load_metric, same_shape
from mlxtune.train.events import read_events
from conftest import expected_compute_dtype
from tiny import write_jsonl

# ----------------------------------------------------------------------------- metrics

REFS = ['{"a": 1, "b": "x", "c": null}', '{"a": 2, "b": "y", "c": [1]}',
        '{"a": 3, "b": "z", "c": true}', '{"a": 4, "b": "w", "c": {}}']


def test_exact_match_strips_surrounding_whitespace_only():
    assert exact_match("  yes\n", "yes")
    assert not exact_match("Yes", "yes")
    assert not exact_match("y es", "yes")


def test_same_shape_compares_keys_and_json_types():
    ref = {"n": 1, "f": 1.5, "s": "a", "z": None, "b": True, "l": [], "o": {}}
    assert same_shape({"n": 2.5, "f": 3, "s": "", "z": None, "b": False, "l": [1], "o": {"x": 1}},
                      ref)  # int and float are both JSON numbers
    assert not same_shape({**ref, "b": 1}, ref)  # boolean is not a number
    assert not same_shape({**ref, "z": "null"}, ref)
    assert not same_shape({k: v for k, v in ref.items() if k != "o"}, ref)
    assert not same_shape({**ref, "extra": 1}, ref)
    assert not same_shape([ref], ref)


def test_scorer_by_hand():
    preds = [
        ' {"a": 1, "b": "x", "c": null}\n',   # exact after stripping
        '{"a": 9, "b": "q", "c": [2, 3]}',    # same keys and types, other values
        '{"a": 3, "b": "z", "c": true',       # not JSON
        '{"a": 4, "b": "w"}',                 # JSON, a key missing
    ]
    got = Scorer(REFS).score(preds)
    assert got == {"exact_match": 0.25, "json_valid": 0.75, "schema_match": 0.5}


def test_json_metrics_apply_only_to_json_references():
    assert Scorer(["hello", "world"]).score(["hello", "{}"]) == {"exact_match": 0.5}
    # JSON but not objects: validity applies, the key/type shape does not.
    assert Scorer(["[1]", "2"]).score(["[1]", "x"]) == {"exact_match": 0.5, "json_valid": 0.5}


def test_schema_file_decides_schema_match(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({
        "type": "object", "required": ["a"], "additionalProperties": False,
        "properties": {"a": {"type": "integer", "maximum": 3},
                       "d": {"type": "string", "format": "date"}}}))
    s = Schema(schema)
    preds = ['{"a": 1}', '{"a": 5}', '{"a": 2, "d": "2025-02-30"}', '{"a": 2, "d": "2025-02-28"}',
             'nope', '{"a": 1, "b": 2}']
    # By hand: 1 ok; 5 > maximum; Feb 30 is not a date; ok; not JSON; extra key.
    got = Scorer(["x"] * 6, schema=s).score(preds)
    assert got["schema_match"] == pytest.approx(2 / 6)
    assert got["json_valid"] == pytest.approx(5 / 6)  # a schema makes validity apply
    assert Scorer(['{"a": 9}', '{"a": 1}'], schema=s).ref_schema_failures == 1


def test_user_metric_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "mymetrics.py").write_text(
        "import json\n"
        "def field(pred, ref):\n"
        "    return float(json.loads(pred)['a'] == json.loads(ref)['a'])\n"
        "def length(pred, ref):\n"
        "    return len(pred) / len(ref)\n")
    preds = ['{"a": 1}', '{"a": 1}', 'garbage', '{"a": 4, "b": 0}']
    by_file = load_metric(f"{tmp_path / 'mymetrics.py'}:field")
    got = Scorer(REFS, metric=by_file).score(preds)
    # By hand: a matches for examples 1 and 4; example 3 raises (counted, scores 0).
    assert got["metric"] == pytest.approx(2 / 4)
    assert got["metric_errors"] == 1 and "JSONDecodeError" in got["metric_first_error"]
    monkeypatch.chdir(tmp_path)
    by_module = load_metric("mymetrics:length")
    got = Scorer(["abcd", "ab"]).__class__(["abcd", "ab"], metric=by_module).score(["ab", "abc"])
    assert got["metric"] == pytest.approx((0.5 + 1.5) / 2) and got["metric_errors"] == 0


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "expected module:function"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("json:no_such_function", "json has no function no_such_function"),
    ("/nonexistent/m.py:f", "file /nonexistent/m.py not found"),
])
def test_bad_metric_is_one_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_metric(spec)


@pytest.mark.parametrize("content, message", [
    ('{"type": 12}', "not a valid JSON Schema"),
    ('{"type": "object", "properties": {"a": {"minLength": -1}}}', "at properties/a/minLength"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not a JSON Schema"),
])
def test_bad_schema_file_is_one_config_error(tmp_path, content, message):
    path = tmp_path / "bad.schema.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        Schema(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------- loss


def chat(i: int) -> dict:
    colors = ["red", "green", "blue", "amber", "violet"]
    return {"messages": [
        {"role": "system", "content": "Answer with JSON."},
        {"role": "user", "content": f"color {i}?"},
        {"role": "assistant", "content": json.dumps({"id": i, "color": colors[i % 5]})}],
        "user": f"u{i % 11}"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mlx_lm.utils import load_model, load_tokenizer

    model, _ = load_model(tiny_model_dir)
    return model, load_tokenizer(tiny_model_dir)


def numpy_loss(model, examples) -> tuple[float, int]:
    """Summed cross-entropy over the masked targets, from the full logits of each example
    alone (no padding, no batching), in float64 numpy."""
    total, n = 0.0, 0
    for e in examples:
        logits = np.array(model(mx.array([e.tokens]))[0].astype(mx.float32), dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        for i in range(1, len(e.tokens)):
            if e.mask[i]:
                total += logz[i - 1] - logits[i - 1, e.tokens[i]]
                n += 1
    return total, n


@pytest.mark.parametrize("chunk", [0, 5])
def test_loss_and_perplexity_match_numpy(tiny, chunk):
    model, tok = tiny
    records = [data.Record(chat(i), f"x:{i}") for i in range(7)]
    examples = data.encode(records, tok, 64, None, "chat").examples
    s, n = split_loss(model, examples, batch_size=3, pad_id=0, chunk=chunk)
    ref_s, ref_n = numpy_loss(model, examples)
    assert n == ref_n == sum(sum(e.mask) for e in examples)
    assert s / n == pytest.approx(ref_s / ref_n, rel=1e-5)
    assert np.exp(s / n) == pytest.approx(np.exp(ref_s / ref_n), rel=1e-5)


# ----------------------------------------------------------------------------- decoding


def reference_greedy(model, prompt, stop, max_new):
    """Greedy decoding by full forward passes over the whole sequence (no cache)."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        t = int(np.argmax(np.array(model(mx.array([seq]))[0, -1])))
        if t in stop:
            return out, True
        out.append(t)
        seq.append(t)
    return out, False


def test_batched_greedy_equals_one_at_a_time_full_forwards(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ["the cat", "a much longer prompt than the others here",
                                       "in", "hello there you", "x"]]
    # Pick as stop token one the model emits early for one prompt, so rows end at
    # different steps (and are dropped from the batch) while others keep going.
    first, _ = reference_greedy(model, prompts[1], set(), 3)
    stop = {first[2]}
    gens, seconds = generate.greedy(model, prompts, stop, max_new_tokens=12, batch_size=3)
    assert seconds > 0
    for p, g in zip(prompts, gens):
        ref, stopped = reference_greedy(model, p, stop, 12)
        assert g.tokens == ref and g.stopped == stopped
        assert g.steps == len(ref) + stopped
    assert any(g.stopped for g in gens) and not all(g.stopped for g in gens)


def test_batched_greedy_with_long_left_padded_prompts_under_blockwise_attention(
        tiny_model_dir, monkeypatch):
    """Prompts longer than attention.BLOCK, batched with left padding, through the CPU
    blockwise attention mlxtune installs: a padded row's first queries see no key at all,
    which must not turn the row into NaN (it did with -inf masking: every answer decoded to
    token 0)."""
    from mlx_lm.utils import load_model

    from mlxtune import attention

    monkeypatch.setattr(attention, "BLOCK", 16)  # the same path as 128, on short prompts
    model, _ = load_model(tiny_model_dir)
    assert attention.install(model)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in (40, 23, 31, 18, 40, 27)]
    gens, _ = generate.greedy(model, prompts, set(), max_new_tokens=5, batch_size=6)
    for p, g in zip(prompts, gens):
        ref, _ = reference_greedy(model, p, set(), 5)
        assert g.tokens == ref


def test_greedy_matches_mlx_lm_generate(tiny):
    from mlx_lm.generate import generate as mlx_lm_generate

    model, tok = tiny
    prompt = tok.encode("the color is")
    ours, _ = generate.greedy(model, [prompt], set(), max_new_tokens=10)
    text = mlx_lm_generate(model, tok, prompt, max_tokens=10)  # greedy by default
    assert tok.decode(ours[0].tokens) == text


@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_densified_base_computes_the_same_function(tiny_model_dir, kind):
    from mlx_lm.utils import load_model

    from mlxtune import quant
    from mlxtune.config import AdapterConfig

    model, _ = load_model(tiny_model_dir)
    if kind == "affine":
        quant.quantize_dense(model, bits=4, group_size=32)
        quant.use_cpu_path(model)
    else:
        quant.quantize_nf4(model, embeddings=True)
    mx.random.seed(0)
    adapters.apply_lora(model, AdapterConfig(rank=4))
    for _, m in adapters.lora_layers(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    tokens = mx.array([[5, 9, 40, 7, 3, 88]])
    before = np.array(model(tokens))
    saved = adapters.adapter_weights(model)

    model2, _ = load_model(tiny_model_dir)
    if kind == "affine":
        quant.quantize_dense(model2, bits=4, group_size=32)
    else:
        quant.quantize_nf4(model2, embeddings=True)
    assert generate.densify(model2, mx.float32) > 0
    assert not quant.is_quantized(model2)
    adapters.apply_lora(model2, AdapterConfig(rank=4))
    model2.load_weights(list(saved.items()), strict=False)
    np.testing.assert_allclose(np.array(model2(tokens)), before, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- run directory


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr()


def write_config(tmp_path, model_dir, **sections) -> Path:
    write_jsonl(tmp_path / "tasks.jsonl", [chat(i) for i in range(40)])
    cfg = {"name": "tiny", "model": {"path": str(model_dir)},
           "adapter": {"rank": 4, "alpha": 8},
           "data": {"path": "tasks.jsonl", "split": {"by": "user", "valid": 0.2, "test": 0.2},
                    "max_seq_len": 96},
           "train": {"iters": 6, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 3,
                     "save_every": 3, "log_every": 3},
           "eval": {"max_new_tokens": 6, "show": 100, "batch_size": 4}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_tiny_run(tmp, model_dir):
    config = write_config(tmp, model_dir)
    try:
        main(["run", str(config), "--run-dir", str(tmp / "run"), "-q", "--no-eval"])
    except SystemExit as e:
        assert e.code in (0, None)
    return tmp / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A finished tiny run, trained with --no-eval."""
    return _train_tiny_run(tmp_path_factory.mktemp("evalrun"), tiny_model_dir)


@pytest.fixture(scope="module")
def _runs_by_profile(tmp_path_factory, tiny_model_dir):
    runs = {}

    def get(profile):
        if profile not in runs:
            runs[profile] = _train_tiny_run(tmp_path_factory.mktemp(f"evalrun-{profile}"),
                                            tiny_model_dir)
        return runs[profile]

    return get


@pytest.fixture
def trained_under(profile, _runs_by_profile):
    """`trained`, run under the test's compute profile (MLXTUNE_PROFILE is set)."""
    return _runs_by_profile(profile)


def loss_with_mlx_lm(run_dir, adapter_path, dtype=None):
    """The test split's loss through mlx_lm (with or without the adapter): an independent
    check that 'adapter off' is the base and 'adapter on' the tuned model. With `dtype`
    the base computes in it (as mlx-lm does a model stored in it), the adapter in float32."""
    from mlx_lm.utils import load, load_adapters

    from mlxtune import config

    cfg = config.load(run_dir / "config.yaml")
    model, tok = load(cfg.model.path)
    if dtype is not None:
        model.set_dtype(dtype)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    records = data.load_splits(cfg.data, cfg.train.seed)[0]["test"]
    examples = data.encode(records, tok, cfg.data.max_seq_len, None, "chat").examples
    s, n = numpy_loss(model, examples)
    return s / n


def test_eval_command_end_to_end(trained_under, capsys, profile):
    trained = trained_under
    assert not (trained / "eval.json").exists()  # --no-eval skipped it
    code, out = run_cli(["eval", str(trained), "--json"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result == json.loads((trained / "eval.json").read_text())
    assert (trained / "eval.md").read_text().startswith("# Evaluation")
    assert result["adapter"] == str(trained / "best")
    base, tuned = result["base"], result["tuned"]
    for side in (base, tuned):
        for key in ("loss", "perplexity", "exact_match", "json_valid", "schema_match",
                    "tokens_per_sec", "wall_s", "generated_tokens"):
            assert key in side, key
        assert side["perplexity"] == pytest.approx(np.exp(side["loss"]))
    assert result["compute_dtype"] == expected_compute_dtype(profile)
    dtype = getattr(mx, result["compute_dtype"])
    # float32: the same function, summed in another order. bfloat16: mlx-lm's model in
    # bfloat16 with its float32 adapter computes what mlxtune's does, but batching and
    # padding change the order of bfloat16 sums, each rounded to 2^-9 relative; a mean
    # over ~100 tokens of such errors in log-probs of size ~5 stays well under 2^-9.
    rel = 1e-4 if dtype == mx.float32 else 2 ** -9
    assert base["loss"] == pytest.approx(loss_with_mlx_lm(trained, None, dtype), rel=rel)
    assert tuned["loss"] == pytest.approx(
        loss_with_mlx_lm(trained, str(trained / "best"), dtype), rel=rel)
    assert tuned["loss"] < base["loss"]
    # Every example is shown (eval.show=100): the rates recompute from them.
    shown = result["examples"]
    assert len(shown) == result["generated_examples"] == result["split_examples"] > 0
    for name in ("base", "tuned"):
        again = Scorer([e["reference"] for e in shown]).score([e[name] for e in shown])
        for key, value in again.items():
            assert result[name][key] == pytest.approx(value), (name, key)
    lines = [json.loads(x) for x in (trained / "eval_predictions.jsonl").read_text()
             .splitlines()]
    assert [{k: v for k, v in x.items() if k != "shots"} for x in lines] == [
        {k: e[k] for k in ("source", "reference", "base", "few_shot", "tuned")} for e in shown]
    assert all(len(x["shots"]) == 3 for x in lines)  # eval.shots: 3 by default
    # The few-shot side: every metric the others have, more prompt tokens per request.
    few = result["few_shot"]
    assert set(base) - {"shots"} <= set(few) and few["shots"] == 3.0
    assert few["prompt_tokens"] > base["prompt_tokens"] == tuned["prompt_tokens"]
    assert [k for k in result if k in ("base", "few_shot", "tuned")] == [
        "base", "few_shot", "tuned"]
    md = (trained / "eval.md").read_text().splitlines()
    assert md[2] == result["verdict"] and "3-shot" in md[2]
    assert "| | base | 3-shot | tuned |" in md
    assert result["forgetting"]["prompts"] == 100  # the packaged probe
    events = [e for e in read_events(trained) if e["event"] == "eval"]
    assert events[-1]["tuned"]["loss"] == pytest.approx(tuned["loss"])
    assert events[-1]["few_shot"]["loss"] == pytest.approx(few["loss"])
    assert events[-1]["verdict"] == result["verdict"]
    # Progress on every side: examples done, tokens/s, ETA.
    for side in ("base", "few_shot", "tuned", "probe, base", "probe, tuned"):
        assert f"  {side}: " in out.err and "ETA" in out.err, side


def test_eval_table_limit_and_final_adapter(trained, capsys):
    code, out = run_cli(["eval", str(trained), "--limit", "2", "--adapter", "final",
                         "--split", "valid"], capsys)
    assert code == 0, out.err
    assert "valid split" in out.out and "greedy generation for 2" in out.out
    for label in ("loss", "perplexity", "exact match", "JSON valid", "schema match"):
        assert label in out.out
    result = json.loads((trained / "eval.json").read_text())
    assert result["adapter"] == str(trained / "adapters") and result["generated_examples"] == 2


def test_run_evaluates_at_the_end_unless_told_not_to(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, train={"iters": 2, "eval_every": 0})
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "a")], capsys)
    assert code == 0, out.err
    assert (tmp_path / "a" / "eval.json").exists() and "schema match" in out.err
    assert out.out.strip() == str(tmp_path / "a")  # stdout stays the run directory
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert result["adapter"] == str(tmp_path / "a" / "adapters")  # no best/ without validation
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "b"),
                         "--set", "eval.auto=false"], capsys)
    assert code == 0 and not (tmp_path / "b" / "eval.json").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(trained, tmp_path, tiny_model_dir, capsys):
    def fails(args, *needles):
        code, out = run_cli(args, capsys)
        assert code != 0
        assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err, out.err
        for n in needles:
            assert n in out.err, out.err

    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text('{"type": "nope"}')
    before = (trained / "eval.json").read_bytes() if (trained / "eval.json").exists() else None
    fails(["eval", str(trained), "--schema", str(bad_schema)], "not a valid JSON Schema",
          str(bad_schema))
    fails(["eval", str(tmp_path / "nowhere")], "no such run directory")
    fails(["eval", str(tmp_path)], "not a run directory")
    after = (trained / "eval.json").read_bytes() if (trained / "eval.json").exists() else None
    assert before == after  # nothing written

    # A run directory without an adapter (training never finished).
    empty = tmp_path / "noadapter"
    empty.mkdir()
    (empty / "config.yaml").write_text((trained / "config.yaml").read_text())
    fails(["eval", str(empty)], "no adapter to evaluate")
    assert not (empty / "eval.json").exists()

    # A run without a test split.
    no_test = tmp_path / "notest"
    no_test.mkdir()
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    cfg["data"]["split"]["test"] = 0.0
    (no_test / "config.yaml").write_text(yaml.safe_dump(cfg))
    (no_test / "adapters").symlink_to(trained / "adapters")
    fails(["eval", str(no_test)], "test split is empty")

    # A bad schema in the config fails before training, leaving nothing behind.
    sub = tmp_path / "cfg"
    sub.mkdir()
    config = write_config(sub, tiny_model_dir, eval={"schema": "bad.json"})
    (sub / "bad.json").write_text("{oops")
    fails(["run", str(config), "--run-dir", str(sub / "run")], "eval.schema", "not a JSON file")
    assert not (sub / "run").exists()


def test_quickstart_field_accuracy_by_hand():
    root = Path(__file__).resolve().parents[1]
    field_accuracy = load_metric(f"{root / 'data/quickstart/metrics.py'}:field_accuracy")
    ref = ('{"title":"Renew the domain","priority":"urgent","status":"todo",'
           '"due_date":"2025-03-14","assignee":"Sam","tags":[]}')
    wrong_date = ref.replace("2025-03-14", "2025-03-21")
    assert field_accuracy(ref, ref) == 1.0
    assert field_accuracy(wrong_date, ref) == pytest.approx(5 / 6)
    assert field_accuracy('{"title": "Renew the domain"}', ref) == pytest.approx(1 / 6)
    assert field_accuracy("```json\n" + ref + "\n```", ref) == 0.0
    assert field_accuracy("[1]", ref) == 0.0


# ----------------------------------------------------------------------------- TUI


def test_tui_runs_view_shows_the_verdict(tmp_path, monkeypatch):
    """The runs view's eval line: the verdict, then base→tuned and the forgetting figures;
    the eval dialog has a column per side (K-shot included)."""
    from test_tui import fake_run, make_app, run_app, screen_text, wait_for

    verdict = ("The tuned adapter beats 3-shot prompting by 0.561 in field accuracy "
               "(0.834 vs 0.273) on 179 test examples.")
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs" / "qs", 80, 80, "done", 3e-4, eval_result={
        "split": "test", "split_examples": 179, "adapter": "runs/qs/best",
        "few_shot_setup": {"shots": 3}, "verdict": verdict,
        "base": {"loss": 1.4393, "json_valid": 0.0, "metric": 0.0},
        "few_shot": {"loss": 0.9, "json_valid": 0.5, "metric": 0.273},
        "tuned": {"loss": 0.084, "json_valid": 1.0, "metric": 0.834},
        "forgetting": {"changed": 0.42, "added_nats_per_token": 0.318}})
    app = make_app(None, Path("runs"))

    async def body(pilot):
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.rows) == 1, what="the run")
        await pilot.pause(0.3)
        line = str(screen.query_one("#eval-line").render())
        first, second = line.splitlines()
        assert first == verdict
        assert second.startswith("eval (test): loss 1.439→0.084, json valid 0.0%→100.0%")
        assert "forgetting: 42% of general answers changed, +0.318 nats/token" in second
        text = screen_text(app)
        assert "The tuned adapter beats 3-shot prompting" in text
        await pilot.press("v")
        await pilot.pause(0.3)
        text = screen_text(app)
        header = next(ln for ln in text.splitlines() if "metric" in ln and "tuned" in ln)
        assert header.index("base") < header.index("3-shot") < header.index("tuned")
        if os.environ.get("MLXTUNE_SAVE_SVG"):
            Path(os.environ["MLXTUNE_SAVE_SVG"]).write_text(app.export_screenshot())

    run_app(app, body)


def test_progress_line_by_hand():
    from mlxtune.evaluate import ticker

    clock = iter([100.0, 110.0, 112.0, 130.0])
    lines = []
    tick = ticker(lines.append, "few_shot", 40, tokens=True, clock=lambda: next(clock))
    tick(10, 500, 10.0)   # t = 110: the first line
    tick(12, 600, 12.0)   # t = 112: under 5 s since the last line, skipped
    tick(40, 2000, 30.0)  # t = 130: the last line of the side, always
    # ETA: 10 s for 10 examples, 30 to go -> 30 s.
    assert lines == ["  few_shot: 10/40 examples, 500 tokens, 50.0 tokens/s, ETA 00:30",
                     "  few_shot: 40/40 examples, 2000 tokens, 66.7 tokens/s, ETA 00:00"]
    lines.clear()
    clock = iter([0.0, 3.0])
    tick = ticker(lines.append, "base loss", 8, clock=lambda: next(clock))
    tick(4)
    assert lines == ["  base loss: 4/8 examples, ETA 00:03"]
    assert ticker(None, "x", 1) is None
