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
    with pytest.raises(DataError, match=r"the last message must be from the assistant .*\(a "
                                        r"conversation without its answer is a prompt for "
                                        r"objective.type grpo\)"):
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


def test_validation_reward_events(grpo_dir, capsys):
    """train.eval_every with a valid split of prompt-only conversations: val events with the
    mean reward of one greedy completion per valid prompt (the first val_batches batches),
    `loss` minus that reward, the per-reward means and lengths; best/ kept by the reward."""
    from mlxtune import models
    from mlxtune.config import ModelConfig
    from mlxtune.data.records import read_records
    from mlxtune.evaluate import stop_ids

    write_jsonl(grpo_dir / "valid.jsonl", [
        {"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(10)])
    run_dir = grpo_dir / "run"
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir", str(run_dir),
                         "--set", "data.valid=valid.jsonl", "--set", "train.eval_every=8",
                         "--set", "train.val_batches=2"], capsys)
    assert code == 0, out.err
    vals = [e for e in read_events(run_dir) if e["event"] == "val"]
    assert [e["step"] for e in vals] == [0, 8, 16]
    for e in vals:
        assert e["loss"] == -e["reward"] and e["rewards/lowercase/mean"] == e["reward"]
        assert 0 < e["completions/mean_length"] <= 9 and 0 <= e["completions/clipped_ratio"] <= 1
    # The first: the starting model's greedy completions of the first 2 x 2 valid prompts.
    loaded = models.load(ModelConfig(path=str(tiny_model_dir_of(grpo_dir))))
    records, fmt = read_records(grpo_dir / "valid.jsonl", prompts=True)
    prompts = rollout.encode_prompts(records, fmt, loaded.tokenizer, 64, 8).examples[:4]
    gens = rollout.sample(loaded.model, [p.tokens for p in prompts], 1,
                          stop_ids(loaded.tokenizer), 8, temperature=0.0)
    by_hand = np.mean([sum(68 <= t <= 93 for t in g.tokens) / max(len(g.tokens), 1)
                       for g in gens])
    assert vals[0]["reward"] == pytest.approx(by_hand, abs=1e-9)
    assert vals[-1]["reward"] > vals[0]["reward"]  # the trained policy writes lower case
    best = min(vals, key=lambda e: e["loss"])
    assert best["improved"] and (run_dir / "best" / "adapters.safetensors").is_file()
    assert "val reward" in out.err
    # The CLI's last line names the reward, not minus it as a loss.
    assert f"done: step 16, best val reward {max(e['reward'] for e in vals):.4f}" in out.err
    assert "val loss" not in out.err


def test_early_stopping_names_the_reward(grpo_dir, capsys):
    """Early stopping on the validation reward: its stop message and the CLI's last line
    say the reward (the best one, positive), not a loss."""
    write_jsonl(grpo_dir / "valid.jsonl", [
        {"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(4)])
    run_dir = grpo_dir / "run"
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir", str(run_dir),
                         "--set", "data.valid=valid.jsonl", "--set", "train.eval_every=2",
                         "--set", "train.early_stopping.patience=1",
                         "--set", "train.early_stopping.min_delta=10"], capsys)
    assert code == 0, out.err
    vals = [e for e in read_events(run_dir) if e["event"] == "val"]
    stop = [e for e in read_events(run_dir) if e["event"] == "stop"][-1]
    assert [e["step"] for e in vals] == [0, 2] and stop["reason"] == "early_stopping"
    first = vals[0]["reward"]
    assert stop["message"] == (f"validation reward has not improved for 1 evaluations; "
                               f"best {first:.4f} at step 0")
    assert f"early_stopping: step 2, best val reward {first:.4f}" in out.err


def tiny_model_dir_of(grpo_dir: Path) -> Path:
    return Path(yaml.safe_load((grpo_dir / "config.yaml").read_text())["model"]["path"])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_sum_to_the_big_batch(loss_type):
    """What grad_accumulation (and ranks) rest on: a rollout batch cut into micro-batches
    (of other padded widths), their (sum, weight) and gradients added and divided once as
    the trainer does, gives the big batch's loss and gradient for every loss type (dapo:
    the mean over all the batch's completion tokens, not a mean of micro-batch means)."""
    from mlxtune.objectives import grpo

    rng = np.random.default_rng(0)
    B, T = 6, 7
    old = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
    logps = mx.array(old + rng.normal(0, 0.2, (B, T)).astype(np.float32))
    adv = mx.array(rng.normal(0, 1, B).astype(np.float32))
    mask = np.zeros((B, T), bool)
    for i, n in enumerate([7, 1, 4, 6, 2, 5]):  # completions of different lengths
        mask[i, T - n:] = True
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, max_completion_tokens=T)

    def whole(lp):
        s, w, _ = grpo.grpo_loss(lp, mx.array(old), adv, mx.array(mask), **kw)
        return s / w

    def part(lp, rows, pad):  # a micro-batch, right-padded with masked columns
        def pad_to(x, value):
            return mx.concatenate([x, mx.full((x.shape[0], pad), value, x.dtype)], axis=1)
        s, w, _ = grpo.grpo_loss(pad_to(lp[rows], -1.0), pad_to(mx.array(old)[rows], -1.0),
                                 adv[rows], pad_to(mx.array(mask)[rows], False), **kw)
        return s, w

    big, big_grad = mx.value_and_grad(whole)(logps)
    rows = [mx.array([0, 1, 2]), mx.array([3, 4, 5])]
    sums, weights, grads = [], [], []
    for r, pad in zip(rows, (0, 3)):
        (s, w), g = mx.value_and_grad(lambda lp: part(lp, r, pad), argnums=0)(logps)
        sums.append(s.item())
        weights.append(w.item())
    # the trainer: gradients of the sums, added, divided by the summed weight
    grad_of_sum = mx.grad(lambda lp: sum(part(lp, r, pad)[0] for r, pad in zip(rows, (0, 3))))
    accumulated = grad_of_sum(logps) / sum(weights)
    assert sum(sums) / sum(weights) == pytest.approx(big.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(accumulated), np.array(big_grad), rtol=1e-5, atol=1e-7)
    if loss_type == "dapo":  # a mean of the two micro-batches' means would differ
        assert sum(s / w for s, w in zip(sums, weights)) / 2 != pytest.approx(big.item(),
                                                                             rel=1e-3)


def test_grad_accumulation(grpo_dir, capsys):
    """grad_accumulation 2: each step samples two rollout micro-batches of batch_size
    prompts from the same policy; the events count both, the rollout file holds both."""
    run_dir = grpo_dir / "run"
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir", str(run_dir),
                         "--set", "train.grad_accumulation=2", "--set", "train.iters=3"], capsys)
    assert code == 0, out.err
    events = trains(run_dir)
    assert [e["step"] for e in events] == [1, 2, 3]
    with np.load(run_dir / "rollouts" / "rollout-0.npz") as z:
        assert sorted(z.files) == ["metrics", "rank0"]
        inner = np.load(__import__("io").BytesIO(z["rank0"].tobytes()))
        assert {"m0_a0", "m1_a0", "m0_a2", "m1_a2"} <= set(inner.files)
        mask = inner["m0_a1"].sum() + inner["m1_a1"].sum()
    # tokens: the completion tokens of both micro-batches (2 prompts x 8 each)
    assert events[0]["tokens"] == mask and inner["m0_a0"].shape[0] == 16
    lengths = events[0]["completions/mean_length"]
    assert 1 <= lengths <= 9


@pytest.mark.slow
def test_two_ranks_match_one_process_with_accumulation(grpo_dir, capsys):
    """Two ranks at batch 4 sample exactly what one process samples at batch 2 with
    grad_accumulation 2 (the same sampling units: rank r is micro-batch r), gather the
    rewards for the advantages (scale_rewards: batch, so the whole batch's std) and take
    the same steps; num_iterations 2 exercises the saved rollout policy's log-probs. SGD,
    as test_distributed's random batches: AdamW turns the rounding of near-zero gradients
    (summed in another order) into whole steps, and a sampled token that flips with them
    changes every later row of its batch."""
    from test_distributed import adapter_of as adapter, launch

    cfg = str(grpo_dir / "config.yaml")
    common = ["--set", "objective.num_iterations=2", "--set", "objective.scale_rewards=batch",
              "--set", "train.iters=6", "--set", "eval.auto=false",
              "--set", "train.optimizer=sgd", "--set", "train.momentum=0",
              "--set", "train.learning_rate=0.5"]
    one, two = grpo_dir / "one", grpo_dir / "two"
    code, out = run_cli(["run", cfg, "--run-dir", str(one), "-q", *common,
                         "--set", "train.batch_size=2", "--set", "train.grad_accumulation=2"],
                        capsys)
    assert code == 0, out.err
    done = launch("run", cfg, "--run-dir", str(two), *common, "--set", "train.batch_size=4")
    assert done.returncode == 0 and (two / "adapters").is_dir(), done.stdout + done.stderr
    assert "data parallel: 2 ranks, 2 of each batch per rank" in done.stderr
    import io

    for k in range(3):  # the rollouts: token for token
        with np.load(one / "rollouts" / f"rollout-{k}.npz") as a, \
                np.load(two / "rollouts" / f"rollout-{k}.npz") as b:
            assert json.loads(str(a["metrics"])) == pytest.approx(json.loads(str(b["metrics"])))
            mine = np.load(io.BytesIO(a["rank0"].tobytes()))
            theirs = [np.load(io.BytesIO(b[f"rank{r}"].tobytes())) for r in (0, 1)]
            for m in (0, 1):
                np.testing.assert_array_equal(mine[f"m{m}_a0"], theirs[m]["m0_a0"])
                np.testing.assert_array_equal(mine[f"m{m}_a1"], theirs[m]["m0_a1"])
                np.testing.assert_allclose(mine[f"m{m}_a2"], theirs[m]["m0_a2"], rtol=1e-6)
    a, b = trains(one), trains(two)
    assert [e["tokens"] for e in a] == [e["tokens"] for e in b]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length"):
        assert [e[key] for e in a] == pytest.approx([e[key] for e in b], rel=1e-9), key
    np.testing.assert_allclose([e["loss"] for e in b], [e["loss"] for e in a],
                               rtol=1e-3, atol=1e-6)
    x, y = adapter(one / "adapters"), adapter(two / "adapters")
    for k in x:
        np.testing.assert_allclose(y[k], x[k], atol=1e-4)
    assert any(np.abs(v).max() > 1e-3 for k, v in y.items() if k.endswith("lora_b"))
    # Two ranks stopped inside a rollout batch (step 3 of 6) and resumed: rank 0 hands
    # every rank its share of the saved batch; the same adapter as uninterrupted.
    part = grpo_dir / "part"
    common = [c.replace("train.iters=6", "train.iters=3") for c in common]
    done = launch("run", cfg, "--run-dir", str(part), *common, "--set", "train.batch_size=4")
    assert done.returncode == 0, done.stderr
    common = [c.replace("train.iters=3", "train.iters=6") for c in common]
    done = launch("run", cfg, "--run-dir", str(part), *common, "--set", "train.batch_size=4",
                  "--resume")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert [e["step"] for e in trains(part)] == list(range(1, 7))
    z = adapter(part / "adapters")
    for k in y:
        np.testing.assert_array_equal(z[k], y[k])


def test_trains_on_prompt_only_data(grpo_dir, capsys):
    """Prompts without answers train (a function reward needs none); the samples say
    reference null; the automatic evaluation, which compares with answers, is skipped
    with one line instead of failing after training."""
    write_jsonl(grpo_dir / "ask.jsonl", [
        {"messages": [{"role": "user", "content": f"write {i}"}]} for i in range(6)])
    ask = [{"role": "user", "content": "say it"}]
    write_jsonl(grpo_dir / "ask-test.jsonl", [{"messages": ask}] * 3 + [
        {"messages": [*ask, {"role": "assistant", "content": "it"}]}])
    run_dir = grpo_dir / "run"
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir", str(run_dir),
                         "--set", "data.train=ask.jsonl", "--set", "data.test=ask-test.jsonl",
                         "--set", "eval.auto=true", "--set", "train.iters=2"], capsys)
    assert code == 0, out.err
    assert [e["step"] for e in trains(run_dir)] == [1, 2]
    samples = [json.loads(line) for line in (run_dir / "completions.jsonl").open()]
    assert samples[0]["reference"] is None and samples[0]["prompt"][-1]["role"] == "user"
    assert ("eval: skipped after training: 3 of the 4 test prompts have no reference answer"
            in out.err)
    assert not (run_dir / "eval.json").exists()

    # `mlxtune eval` on it: one line saying why, before any model is loaded.
    code, out = run_cli(["eval", str(run_dir)], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out.err
    assert lines[0].endswith(
        "ask-test.jsonl:1: cannot measure loss or answer metrics: 3 of the 4 test prompts of "
        "this grpo run have no reference answer to compare with (prompt-only records); give "
        "them their answers, or evaluate a file that has them (--data)")
    # A held-out file with answers evaluates; the few-shot side, which needs training
    # examples with answers (the train prompts have none), is left out.
    answered = write_jsonl(grpo_dir / "answered.jsonl", [
        {"messages": [*ask, {"role": "assistant", "content": "it"}]}] * 2)
    code, out = run_cli(["eval", str(run_dir), "--data", str(answered), "--no-forgetting",
                         "--max-new-tokens", "4", "--json"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["loss_examples"] == 2 and "tuned" in result and "few_shot" not in result


def test_validation_decodes_a_rollouts_worth_of_prompts_at_once(grpo_dir, capsys,
                                                                 monkeypatch):
    """Validation's greedy completions are decoded batch_size x group_size prompts at a
    time (the rows a rollout holds), not a batch of prompts at a time: 10 valid prompts,
    batches of 2, groups of 2 -> decodes of 4, 4 and 2 prompts, each prompt once."""
    from mlxtune.train import grpo_loop

    calls = []
    real = grpo_loop.rollout.sample

    def sample(model, prompts, group, *args, **kwargs):
        if group == 1:
            calls.append(len(prompts))
        return real(model, prompts, group, *args, **kwargs)

    monkeypatch.setattr(grpo_loop.rollout, "sample", sample)
    write_jsonl(grpo_dir / "valid.jsonl", [
        {"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(10)])
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir",
                         str(grpo_dir / "run"), "--set", "data.valid=valid.jsonl",
                         "--set", "train.eval_every=2", "--set", "train.iters=2",
                         "--set", "train.val_batches=5", "--set", "objective.group_size=2"],
                        capsys)
    assert code == 0, out.err
    assert calls == [4, 4, 2] * 2  # steps 0 and 2


@pytest.mark.parametrize("dense", [True, False])
def test_a_quantized_base_is_dequantized_once_for_the_run(grpo_dir, capsys, dense):
    """objective.dense_base: true swaps a quantized base's layers for their dequantized
    weights before the adapter is applied (one line says so); false keeps it quantized."""
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir",
                         str(grpo_dir / "run"), "--set", "train.iters=2",
                         "--set", "model.quantize.format=affine",
                         "--set", "model.quantize.bits=8",
                         "--set", f"objective.dense_base={str(dense).lower()}"], capsys)
    assert code == 0, out.err
    assert ("grpo: the quantized base computes dequantized" in out.err) == dense
    assert len(trains(grpo_dir / "run")) == 2


def test_group_preferences_script(grpo_dir, tmp_path):
    """scripts/make_group_preferences.py on a tiny model: per prompt, the group's best
    completion against its worst by the config's rewards (recomputed here from the texts),
    groups without a spread left out, the record's other keys kept, and preference data
    that mlxtune reads."""
    import subprocess
    import sys

    from mlxtune.data.records import read_records
    from tiny import save_random_adapter

    (grpo_dir / "r.py").write_text(
        "def vowels(prompts, completions, **kw):\n"
        "    texts = [c[-1]['content'] for c in completions]\n"
        "    return [sum(ch in 'aeiou' for ch in t) / max(len(t), 1) for t in texts]\n")
    save_random_adapter(grpo_dir / "sft", rank=8, alpha=16)
    cfg = yaml.safe_load((grpo_dir / "config.yaml").read_text())
    cfg["model"]["adapter"] = str(grpo_dir / "sft")
    cfg["objective"]["rewards"] = [{"function": "r.py:vowels", "weight": 2.0}]
    cfg["objective"]["max_completion_tokens"] = 12
    (grpo_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "pairs"
    done = subprocess.run([sys.executable, str(root / "scripts" / "make_group_preferences.py"),
                           "--config", str(grpo_dir / "config.yaml"), "--group", "4",
                           "--train", "6", "--valid", "0", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "pairs-train.jsonl").read_text().splitlines()]
    assert 0 < len(rows) <= 6
    assert f"{len(rows)} pairs from 6 prompts" in done.stderr

    def reward(text):
        return 2.0 * sum(ch in "aeiou" for ch in text) / max(len(text), 1)

    for r in rows:
        best, worst = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        assert r["rewards"] == pytest.approx([reward(best), reward(worst)])
        assert reward(best) > reward(worst)
        assert r["user"].startswith("u") and r["prompt"][-1]["role"] == "user"
    records, fmt = read_records(tmp_path / "pairs-train.jsonl")
    assert fmt == "preference" and len(records) == len(rows)
    assert (tmp_path / "pairs-valid.jsonl").read_text() == ""
    assert (tmp_path / "pairs-heldout.jsonl").read_text() == ""  # no test split here
    # the choice itself: the first of the best, the first of the worst, no pair on a tie
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_group_preferences", root / "scripts" / "make_group_preferences.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.pick_pairs([1.0, 1.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 0.0, 0.3, 0.0, 0.1],
                             4) == [(0, 2), None, (9, 8)]
