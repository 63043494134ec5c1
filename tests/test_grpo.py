"""GRPO end to end on a tiny model: the reward rises, metrics and samples are written,
resume equals an uninterrupted run, bad input is one line; the rollout pieces."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlxtune.errors import DataError
from mlxtune.objectives import rollout
from mlxtune.train.events import read_events
from conftest import expected_compute_dtype
from test_train import adapter_of, run_cli
from tiny import write_jsonl

# A verifiable reward the random tiny model rarely earns: the share of its completion's
# tokens that are lower-case letters (byte-level tokenizer: ids 68..93 are 'a'..'z').
REWARD = ("def lowercase(prompts, completions, completion_ids, **kw):\n"
          "    return [sum(68 <= t <= 93 for t in ids) / max(len(ids), 1)\n"
          "            for ids in completion_ids]\n")
TRL_METRICS = {"reward", "reward_std", "rewards/lowercase/mean", "frac_reward_zero_std",
               "completions/mean_length", "completions/clipped_ratio", "clip_ratio", "kl"}


@pytest.fixture
def grpo_dir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"write {i}"},
                      {"role": "assistant", "content": "abc"}], "user": f"u{i}"}
        for i in range(16)])
    (tmp_path / "r.py").write_text(REWARD)
    config = {
        "name": "grpo", "model": {"path": str(tiny_model_dir)},
        "adapter": {"rank": 8, "alpha": 16},
        "data": {"train": "train.jsonl", "max_seq_len": 64},
        "objective": {"type": "grpo", "group_size": 8, "max_completion_tokens": 8,
                      "rewards": [{"function": "r.py:lowercase"}]},
        "train": {"iters": 16, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1,
                  "eval_every": 0, "save_every": 0, "seed": 0},
        "eval": {"auto": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def trains(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == "train"]


def test_grpo_raises_the_reward(grpo_dir, capsys, profile):
    """A reward for lower-case letters: from ~0.1 (the random model) to most of the
    completion's tokens within 16 steps, under both profiles; with a KL term to the
    adapter switched off."""
    run_dir = grpo_dir / "run"
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir", str(run_dir),
                         "--set", "objective.beta=0.01"], capsys)
    assert code == 0, out.err
    start = read_events(run_dir)[0]
    assert start["compute_dtype"] == expected_compute_dtype(profile)
    events = trains(run_dir)
    assert [e["step"] for e in events] == list(range(1, 17))
    assert TRL_METRICS <= set(events[0])
    first = np.mean([e["reward"] for e in events[:2]])
    last = np.mean([e["reward"] for e in events[-3:]])
    assert first < 0.3 and last > 0.7, [e["reward"] for e in events]
    assert events[0]["clip_ratio"] == 0  # num_iterations 1: the ratio is 1
    assert events[0]["kl"] == pytest.approx(0, abs=1e-6)  # the adapter starts at zero
    assert events[-1]["kl"] > 0
    samples = [json.loads(line) for line in (run_dir / "completions.jsonl").open()]
    assert len(samples) == 16 * 8  # log_every 1: the first group of every rollout
    assert {"prompt", "completion", "reward", "rewards", "advantage", "truncated"} <= set(
        samples[0])
    assert samples[0]["prompt"][0]["role"] == "user" and samples[0]["reference"] == "abc"
    assert "ran out of objective.max_completion_tokens" in out.err  # the truncation warning
    assert (run_dir / "adapters" / "adapters.safetensors").is_file()


def test_resume_inside_a_rollout_batch_equals_uninterrupted(grpo_dir, capsys):
    """num_iterations 2: stopped after step 3 (inside the second rollout batch), resumed
    to step 6; the same adapter and the same metrics as a run of 6 steps."""
    cfg = str(grpo_dir / "config.yaml")
    common = ["--set", "objective.num_iterations=2"]
    whole, part = grpo_dir / "whole", grpo_dir / "part"
    code, out = run_cli(["run", cfg, "--run-dir", str(whole), *common,
                         "--set", "train.iters=6"], capsys)
    assert code == 0, out.err
    code, out = run_cli(["run", cfg, "--run-dir", str(part), *common,
                         "--set", "train.iters=3"], capsys)
    assert code == 0, out.err
    code, out = run_cli(["run", cfg, "--run-dir", str(part), *common,
                         "--set", "train.iters=6", "--resume"], capsys)
    assert code == 0, out.err
    a, b = adapter_of(whole / "adapters"), adapter_of(part / "adapters")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    keys = ("loss", "reward", "clip_ratio", "completions/mean_length")
    assert [[e[k] for k in keys] for e in trains(whole)] == \
        [[e[k] for k in keys] for e in trains(part)]
    assert trains(whole)[1]["clip_ratio"] >= 0  # the second step of a batch: ratio moved
    assert len(list((part / "rollouts").glob("rollout-*.npz"))) == 3


@pytest.mark.parametrize("change,message", [
    ({"objective": {"type": "grpo", "group_size": 1,
                    "rewards": [{"function": "r.py:lowercase"}]}},
     "objective.group_size: must be >= 2"),
    ({"objective": {"type": "grpo", "rewards": [{"name": "json_vald"}]}},
     "objective.rewards[0].name: unknown reward 'json_vald'"),
    ({"objective": {"type": "grpo", "rewards": [{"function": "r.py:nope"}]}},
     "objective.rewards[0].function: "),
    ({"objective": {"type": "grpo", "rewards": [{"function": "r.py:broken"}]}},
     "objective.rewards[0] (r.py:broken): raised ZeroDivisionError"),
    ({"data": {"train": "text.jsonl"}}, "has no prompts to sample from"),
    ({"data": {"train": "prompts.jsonl"},
      "objective": {"type": "grpo", "rewards": [{"function": "r.py:lowercase"},
                                                {"name": "field_match"}]}},
     "objective.rewards[1] (field_match) compares each completion with the prompt's "
     "reference answer, and 3 of the 4 prompts of data.train have none"),
    ({"data": {"train": "prompts.jsonl"},
      "objective": {"type": "grpo", "rewards": [{"name": "exact_match"}]}},
     "prompts.jsonl:2: objective.rewards[0] (exact_match) compares"),
    ({"data": {"train": "empty.jsonl"}}, "empty.jsonl:1: no records"),
    ({"data": {"train": "system.jsonl"}}, "the conversation ends with a system message"),
])
def test_bad_input_is_one_line(grpo_dir, capsys, change, message):
    with open(grpo_dir / "r.py", "a") as f:
        f.write("def broken(prompts, completions, **kw):\n    return [1 / 0]\n")
    write_jsonl(grpo_dir / "text.jsonl", [{"text": "hello"}] * 4)
    write_jsonl(grpo_dir / "prompts.jsonl", [  # one with an answer, three prompts alone
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        *[{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]])
    (grpo_dir / "empty.jsonl").write_text("\n")
    write_jsonl(grpo_dir / "system.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    cfg = yaml.safe_load((grpo_dir / "config.yaml").read_text())
    for section, values in change.items():
        cfg[section].update(values)
    (grpo_dir / "bad.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = grpo_dir / "bad-run"
    code, out = run_cli(["run", str(grpo_dir / "bad.yaml"), "--run-dir", str(run_dir)], capsys)
    assert code != 0
    err = out.err.strip().splitlines()[-1]
    assert message in err, out.err
    if "raised" not in message:  # refused before anything is written
        assert not run_dir.exists()


def test_prompts_and_sampling(tiny_model_dir, tmp_path):
    from mlxtune import adapters, models
    from mlxtune.config import AdapterConfig, ModelConfig
    from mlxtune.data.records import read_records

    loaded = models.load(ModelConfig(path=str(tiny_model_dir)))
    tok = loaded.tokenizer
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi there", "completion": "yo",
                                               "label": 3}])
    records, fmt = read_records(path)
    enc = rollout.encode_prompts(records, fmt, tok, 64, 8)
    p = enc.examples[0]
    assert p.reference == "yo" and p.columns == {"completion": "yo", "label": 3} and p.prompt == "hi there"
    assert p.tokens == list(tok.apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True))
    with pytest.raises(DataError, match="no prompt fits data.max_seq_len"):
        rollout.encode_prompts(records, fmt, tok, 20, 8)
    model = loaded.model
    adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
    prompts = [p.tokens, p.tokens[:5]]
    a = rollout.sample(model, prompts, 4, set(), 6, temperature=1.0, seed=3)
    b = rollout.sample(model, prompts, 4, set(), 6, temperature=1.0, seed=3)
    assert [g.tokens for g in a] == [g.tokens for g in b]  # one key per rollout
    assert len(a) == 8 and all(len(g.tokens) == 6 and not g.stopped for g in a)
    assert len({tuple(g.tokens) for g in a}) > 1
    # temperature 0: greedy, as the row decodes alone
    g0 = rollout.sample(model, prompts, 2, set(), 5, temperature=0.0)
    alone = rollout.sample(model, [prompts[1]], 1, set(), 5, temperature=0.0)
    assert g0[2].tokens == g0[3].tokens == alone[0].tokens
    # top_p tiny: the most likely token only
    keyed = rollout.sample(model, prompts, 2, set(), 5, temperature=1.0, top_p=1e-6, seed=9)
    assert [g.tokens for g in keyed] == [g.tokens for g in g0]
    tokens, mask = rollout.collate(prompts, [rollout.Completion([7, 8], True, 2),
                                             rollout.Completion([9], False)], 1, 0, 32,
                                   mask_truncated=True)
    assert tokens.shape == (2, 32)
    n0 = len(prompts[0])
    assert np.array(tokens)[0, n0:n0 + 3].tolist() == [7, 8, 2]
    assert np.array(mask)[0].sum() == 3 and np.array(mask)[1].sum() == 0


def test_prompt_only_records(tiny_model_dir, tmp_path):
    """Read for prompts, a conversation that ends with a user turn, a record with a prompt
    alone and TRL's conversational prompt are prompts without (or with) a reference;
    read for training they stay refused with one line."""
    from mlxtune import models
    from mlxtune.config import ModelConfig
    from mlxtune.data.records import read_records

    tok = models.load(ModelConfig(path=str(tiny_model_dir))).tokenizer
    user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": user, "id": 1},
        {"messages": [*user, {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError, match="the last message must be from the assistant"):
        read_records(chat)
    records, fmt = read_records(chat, prompts=True)
    a, b = rollout.encode_prompts(records, fmt, tok, 64, 8).examples
    assert (a.prompt, a.reference, a.columns) == (user, None, {"id": 1})
    assert (b.prompt, b.reference) == (user, "yo")
    assert a.tokens == b.tokens == list(tok.apply_chat_template(user, add_generation_prompt=True))

    plain = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi there"}, {"prompt": user},
        {"prompt": user, "completion": [{"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError, match=r"p.jsonl:1: completions record has no \"completion\" "
                                        r".*a prompt alone is for objective.type grpo"):
        read_records(plain)
    records, fmt = read_records(plain, prompts=True)
    assert fmt == "completions"
    x, y, z = rollout.encode_prompts(records, fmt, tok, 64, 8).examples
    assert (x.prompt, x.reference) == ("hi there", None)
    assert x.tokens == list(tok.apply_chat_template([{"role": "user", "content": "hi there"}],
                                                    add_generation_prompt=True))
    assert (y.prompt, y.reference, z.reference) == (user, None, "yo")
    assert y.tokens == z.tokens == a.tokens

    for bad, message in [({"prompt": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]},
                          "the prompt.s last message is from the assistant"),
                         ({"prompt": "q", "completion": [{"role": "user", "content": "a"}]},
                          r"completion\[0\]: the completion's messages must be the assistant's"),
                         ({"prompt": 3}, "\"prompt\" must be a string or a non-empty list"),
                         ({"messages": [{"role": "assistant", "content": "a"}]},
                          "no prompt: this conversation has only the assistant's answer")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [bad])
        with pytest.raises(DataError, match=message):
            read_records(path, prompts=True)
