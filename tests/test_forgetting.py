"""The forgetting check: the packaged probe, a user's prompt file and its errors, and the
figures (nats per token added, share of answers changed) against a computation by hand."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import adapters, config as config_mod

from mlxtune.config import AdapterConfig
from mlxtune.errors import ConfigError
from mlxtune.evaluate import forgetting, forgetting_check, stop_ids
from test_evaluate import numpy_loss, reference_greedy, run_cli


def test_the_packaged_probe():
    probe = forgetting.load()
    assert probe.source == "packaged" and len(probe.ids) == 100
    assert len(set(probe.ids)) == 100
    counts = {c: probe.categories.count(c) for c in set(probe.categories)}
    assert counts == {"instruction": 20, "facts": 20, "arithmetic": 15, "writing": 15,
                      "code": 15, "languages": 15}
    texts = [m[-1]["content"] for m in probe.messages]
    assert len(set(texts)) == 100 and all(m[-1]["role"] == "user" for m in probe.messages)
    assert any("Translate to French" in t for t in texts)  # other languages, both ways
    assert any(t.startswith("¿") for t in texts)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "hi"}\nnot json\n', "p.jsonl:2: not a JSON object"),
    ('[1, 2]\n', "p.jsonl:1: expected a JSON object"),
    ('{"prompt": ""}\n', "p.jsonl:1: needs a non-empty 'prompt'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
     '"content": "b"}]}\n', "p.jsonl:1: 'messages' must be role/content objects ending "
     "with a user turn"),
    ("\n\n", "no prompts in the file"),
])
def test_a_bad_prompt_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        forgetting.load(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="prompt file not found"):
        forgetting.load(str(tmp_path / "none.jsonl"))


def test_summarise_by_hand():
    probe = forgetting.Probe(["1", "2", "3"], ["a", "a", "b"], [[], [], []], "x")
    base = [(2.0, 4), (1.0, 1), (3.0, 5)]
    tuned = [(4.0, 4), (1.5, 1), (3.0, 5)]
    got = forgetting.summarise(probe, base, tuned, [True, False, False])
    assert got["answer_tokens"] == 10
    assert got["base_nats_per_token"] == pytest.approx(6 / 10)
    assert got["tuned_nats_per_token"] == pytest.approx(8.5 / 10)
    assert got["added_nats_per_token"] == pytest.approx(2.5 / 10)
    assert got["changed"] == pytest.approx(1 / 3)
    assert got["by_category"]["a"]["added_nats_per_token"] == pytest.approx(2.5 / 5)
    assert got["by_category"]["a"]["changed"] == 0.5
    assert got["by_category"]["b"]["added_nats_per_token"] == 0.0


PROMPTS = [{"prompt": "What is the capital of France?", "category": "facts"},
           {"prompt": "Write a haiku.", "category": "writing", "id": "w1"},
           {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "7 + 5?"}], "category": "arithmetic"},
           {"prompt": "the"}]


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    from mlx_lm.utils import load_model, load_tokenizer

    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    cfg = config_mod.from_dict({"data": {"train": "x.jsonl"},
                                "eval": {"general": str(path), "batch_size": 3},
                                "train": {"batch_size": 2}})
    model, _ = load_model(tiny_model_dir)
    return cfg, model, load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_forgetting_figures_by_hand(setup, scale):
    """Base answers by one-at-a-time full forwards (no cache, no batching); losses by
    numpy from full logits; an adapter of zeros changes nothing."""
    cfg, model, tok = setup
    mx.random.seed(3)
    adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
    for _, m in adapters.lora_layers(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * scale
    got = forgetting_check(model, tok, cfg, 0, log=lambda _m: None)

    probe = forgetting.load(cfg.eval.general)
    prompts = forgetting.prompts(probe, tok)
    assert prompts[2] == list(tok.apply_chat_template(PROMPTS[2]["messages"],
                                                      add_generation_prompt=True))
    stops = stop_ids(tok)
    adapters.set_enabled(model, False)
    base = [reference_greedy(model, p, stops, forgetting.MAX_NEW_TOKENS) for p in prompts]
    examples = forgetting.answer_examples(prompts, [b[0] for b in base], [b[1] for b in base],
                                          tok.eos_token_id)
    b_sum, n = numpy_loss(model, examples)
    adapters.set_enabled(model, True)
    tuned = [reference_greedy(model, p, stops, forgetting.MAX_NEW_TOKENS) for p in prompts]
    t_sum, _ = numpy_loss(model, examples)
    changed = [b[0] != t[0] for b, t in zip(base, tuned)]

    assert got["prompts"] == 4 and got["answer_tokens"] == n
    assert n == sum(len(b[0]) + b[1] for b in base)  # the stop token counts when it ended
    assert got["base_nats_per_token"] == pytest.approx(b_sum / n, rel=1e-4)
    assert got["tuned_nats_per_token"] == pytest.approx(t_sum / n, rel=1e-4)
    assert got["changed"] == pytest.approx(np.mean(changed))
    assert [a["base"] for a in got["answers"]] == [tok.decode(b[0]) for b in base]
    assert [a["changed"] for a in got["answers"]] == changed
    assert got["answers"][1]["id"] == "w1" and got["answers"][0]["id"] == "1"
    assert set(got["by_category"]) == {"facts", "writing", "arithmetic", "general"}
    if scale == 0.0:
        assert got["changed"] == 0.0 and got["added_nats_per_token"] == pytest.approx(0, abs=1e-6)
    else:
        assert got["changed"] > 0 and got["added_nats_per_token"] > 0


def test_eval_reports_forgetting_and_bad_general_is_one_line(tmp_path, tiny_model_dir, capsys):
    from test_evaluate import write_config

    config = write_config(tmp_path, tiny_model_dir, eval={"shots": 0})
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run"), "-q",
                         "--no-eval"], capsys)
    assert code == 0, out.err
    general = tmp_path / "mine.jsonl"
    general.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    code, out = run_cli(["eval", str(tmp_path / "run"), "--general", str(general), "--json",
                         "--limit", "2"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    f = result["forgetting"]
    assert f["probe"] == str(general) and f["prompts"] == 4 and "answers" not in f
    lines = (tmp_path / "run" / "eval_general.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in lines][:2] == [p["prompt"] for p in PROMPTS[:2]]
    md = (tmp_path / "run" / "eval.md").read_text()
    assert "## Forgetting" in md and "| facts | 1 |" in md
    assert "probe, base: 4/4 examples" in out.err and "probe, tuned: 4/4 examples" in out.err
    assert "base: 2/2 examples" in out.err  # eval.batch_size 4, --limit 2
    assert "ETA" in out.err and "tokens/s" in out.err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    before = (tmp_path / "run" / "eval.json").read_bytes()
    code, out = run_cli(["eval", str(tmp_path / "run"), "--general", str(bad)], capsys)
    assert code != 0 and len(out.err.strip().splitlines()) == 1, out.err
    assert f"{bad}:2: needs a non-empty 'prompt'" in out.err
    assert (tmp_path / "run" / "eval.json").read_bytes() == before  # nothing written



def test_a_bad_general_file_in_the_config_fails_before_training(tmp_path, tiny_model_dir,
                                                                capsys):
    from test_evaluate import write_config

    (tmp_path / "bad.jsonl").write_text("{oops\n")
    config = write_config(tmp_path, tiny_model_dir, eval={"general": "bad.jsonl"})
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code != 0 and f"{tmp_path / 'bad.jsonl'}:1: not a JSON object" in out.err
    assert len(out.err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
