"""Preference tuning: the losses against numpy, pairs from TRL's shapes, the reference
without a second model, precomputed references, and DPO runs end to end on tiny models."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from mlxtune import adapters, objectives
from mlxtune.config import AdapterConfig
from mlxtune.data.preference import collate_pairs, encode_pairs
from mlxtune.data.records import read_records
from mlxtune.errors import DataError
from mlxtune.objectives import preference as pref
from mlxtune.objectives.reference import Reference, pair_logps, reference_logps, score_pairs
from mlxtune.train.events import read_events
from test_train import run_cli
from tiny import build_model, model_args, save_random_adapter, write_jsonl

TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}


# ----------------------------------------------------------------------------- losses vs numpy


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, loss, beta, e):
    h = (pc - rc) - (pr - rr)
    if loss == "sigmoid":
        return -(1 - e) * np_log_sigmoid(beta * h) - e * np_log_sigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if loss == "robust":
        return ((1 - e) * -np_log_sigmoid(beta * h) - e * -np_log_sigmoid(-beta * h)) / (1 - 2 * e)


def np_orpo(pc, pr, lc, lr, beta):
    ac, ar = pc / lc, pr / lr
    odds_c, odds_r = np.exp(ac) / (1 - np.exp(ac)), np.exp(ar) / (1 - np.exp(ar))
    log_odds = np.log(odds_c) - np.log(odds_r)
    return -ac - beta * np.log(1 / (1 + np.exp(-log_odds)))


def np_simpo(pc, pr, lc, lr, beta, gamma, e):
    z = beta * (pc / lc - pr / lr) - gamma
    return -(1 - e) * np.log(1 / (1 + np.exp(-z))) - e * np.log(1 / (1 + np.exp(z)))


@pytest.fixture
def logps():
    rng = np.random.default_rng(0)
    n = 64
    lc, lr = rng.integers(3, 60, n).astype(np.float64), rng.integers(3, 60, n).astype(np.float64)
    # Summed log-probs: per-token means in [-3, -0.001], so ORPO's odds stay finite.
    pc, pr = -lc * rng.uniform(0.001, 3, n), -lr * rng.uniform(0.001, 3, n)
    rc, rr = pc + rng.normal(0, 3, n), pr + rng.normal(0, 3, n)
    return pc, pr, rc, rr, lc, lr


def m64(*xs):
    return [mx.array(x, dtype=mx.float64) for x in xs]


@pytest.mark.parametrize("loss,beta,e", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                         ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0),
                                         ("hinge", 0.1, 0.0), ("hinge", 0.7, 0.0),
                                         ("robust", 0.1, 0.1), ("robust", 0.3, 0.4)])
def test_dpo_losses_match_numpy(logps, loss, beta, e):
    pc, pr, rc, rr, _, _ = logps
    got = np.array(pref.dpo_losses(*m64(pc, pr, rc, rr), loss, beta, e))
    np.testing.assert_allclose(got, np_dpo(pc, pr, rc, rr, loss, beta, e), rtol=0, atol=1e-6)


def test_dpo_loss_cases_by_hand():
    one = mx.array([0.0], dtype=mx.float64)
    # Policy = reference: h = 0, so sigmoid gives log 2 and IPO (1/(2 beta))^2.
    assert pref.dpo_losses(one, one, one, one, "sigmoid", 0.1).item() == pytest.approx(np.log(2))
    assert pref.dpo_losses(one, one, one, one, "ipo", 0.1).item() == pytest.approx(25.0)
    assert pref.dpo_losses(one, one, one, one, "hinge", 0.1).item() == pytest.approx(1.0)
    # robust with e = 0 is sigmoid.
    h = mx.array([2.0], dtype=mx.float64)
    assert pref.dpo_losses(h, one, one, one, "robust", 0.5, 0.0).item() == pytest.approx(
        pref.dpo_losses(h, one, one, one, "sigmoid", 0.5, 0.0).item())


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_matches_numpy(logps, beta):
    pc, pr, _, _, lc, lr = logps
    got, parts = pref.orpo_losses(*m64(pc, pr, lc, lr), beta)
    np.testing.assert_allclose(np.array(got), np_orpo(pc, pr, lc, lr, beta), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(parts["nll_loss"]), -pc / lc, atol=1e-12)


@pytest.mark.parametrize("beta,gamma,e", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_loss_matches_numpy(logps, beta, gamma, e):
    pc, pr, _, _, lc, lr = logps
    got = np.array(pref.simpo_losses(*m64(pc, pr, lc, lr), beta, gamma, e))
    np.testing.assert_allclose(got, np_simpo(pc, pr, lc, lr, beta, gamma, e), rtol=0, atol=1e-6)


def test_reward_metrics_match_numpy(logps):
    pc, pr, rc, rr, _, _ = logps
    beta = 0.1
    got = pref.reward_metrics(*m64(beta * (pc - rc), beta * (pr - rr), pc, pr))
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    want = {"rewards/chosen": cr.sum(), "rewards/rejected": rj.sum(),
            "rewards/accuracies": (cr > rj).sum(), "rewards/margins": (cr - rj).sum(),
            "logps/chosen": pc.sum(), "logps/rejected": pr.sum()}
    assert set(got) == TRL_METRICS
    for k, v in want.items():
        assert got[k].item() == pytest.approx(v, abs=1e-6), k


# ----------------------------------------------------------------------------- records and pairs


SYSTEM = {"role": "system", "content": "answer with a color"}


def conv_pair(i: int) -> dict:
    colors = ["red", "green", "blue", "amber", "violet"]
    return {"prompt": [SYSTEM, {"role": "user", "content": f"color {i}?"}],
            "chosen": [{"role": "assistant", "content": f"the color is {colors[i % 5]}"}],
            "rejected": [{"role": "assistant",
                          "content": f"well, I think it could be {colors[(i + 2) % 5]} or so"}],
            "user": f"u{i % 7}"}


def test_the_three_shapes_encode_to_the_same_answer_masks(tmp_path, tiny_tokenizer):
    row = conv_pair(3)
    implicit = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    standard = {"prompt": "color 3?", "chosen": "the color is amber",
                "rejected": "well, I think it could be red or so"}
    for name, rec in (("conv", row), ("implicit", implicit), ("standard", standard)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [rec])
        records, fmt = read_records(path)
        assert fmt == "preference"
        enc = encode_pairs(records, tiny_tokenizer, 256)
        (pair,) = enc.pairs
        for ex, answer in ((pair.chosen, "the color is amber"),
                           (pair.rejected, "well, I think it could be red or so")):
            target = [t for t, m in zip(ex.tokens, ex.mask) if m]
            # Exactly the answer and the end-of-turn token after it.
            assert tiny_tokenizer.decode(target) == answer + "<|im_end|>"
            first = ex.mask.index(True)
            assert tiny_tokenizer.decode(ex.tokens[:first]).endswith("<|im_start|>assistant\n")
        # The two rows share the prompt's tokens.
        first = pair.chosen.mask.index(True)
        assert pair.chosen.tokens[:first] == pair.rejected.tokens[:first]


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "chosen": "a"}, 'preference record has no "rejected"'),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, 'empty "rejected" answer'),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"chosen": "a", "rejected": "b"}, 'has no "prompt"'),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
     '"rejected" must be a string like "prompt"'),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "not a prefix for an answer"),
    ({"prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     '"chosen" must start and end with an assistant message'),
    ({"prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "empty assistant content"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "share no leading messages"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "completion": "c"},
     "matches several formats"),
])
def test_bad_preference_records_name_the_line(tmp_path, record, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, record])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_rpo_adds_the_chosen_answers_mean_nll(pairs):
    """objective.rpo_alpha: the DPO loss plus alpha times the chosen answers' mean
    per-token NLL, both computed here from sequence log-probs in numpy."""
    model = lora_model()
    randomize_adapter(model, 4)
    tokens, mask = collate_pairs(pairs[:4], 0, 8)
    logps, lengths = (np.array(x, dtype=np.float64) for x in pref.sequence_logps(
        model, tokens, mask))
    ref = mx.array(logps + np.random.default_rng(1).normal(0, 2, logps.shape), mx.float32)
    pc, pr, rc, rr = logps[:4], logps[4:], np.array(ref)[:4], np.array(ref)[4:]
    for alpha in (0.0, 0.7):
        loss, n, metrics = pref.dpo(model, tokens, mask, ref, beta=0.3, rpo_alpha=alpha)
        want = np_dpo(pc, pr, rc, rr, "sigmoid", 0.3, 0.0) + alpha * (-pc / lengths[:4])
        assert loss.item() == pytest.approx(want.sum(), rel=1e-5) and n.item() == 4
        if alpha:
            assert metrics["nll_loss"].item() == pytest.approx((-pc / lengths[:4]).sum(),
                                                               rel=1e-5)
        else:
            assert "nll_loss" not in metrics


# ----------------------------------------------------------------------------- the reference


def lora_model(seed=0, rank=4):
    model = build_model(model_args(), seed=seed)
    mx.random.seed(seed)
    adapters.apply_lora(model, AdapterConfig(rank=rank, alpha=2 * rank))
    return model


def randomize_adapter(model, seed):
    mx.random.seed(seed)
    for _, m in adapters.lora_layers(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.3
    mx.eval(model.parameters())


@pytest.fixture
def pairs(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [conv_pair(i) for i in range(6)])
    records, _ = read_records(path)
    return encode_pairs(records, tiny_tokenizer, 128).pairs


def test_sequence_logps_equal_numpy_from_logits(pairs, tiny_tokenizer):
    model = lora_model()
    tokens, mask = collate_pairs(pairs[:3], 0, 8)
    got, lengths = pref.sequence_logps(model, tokens, mask)
    logits = np.array(model(tokens).astype(mx.float32), dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    t, m = np.array(tokens), np.array(mask)
    want = np.array([sum(logp[r, i - 1, t[r, i]] for i in range(1, t.shape[1]) if m[r, i])
                     for r in range(t.shape[0])])
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5)
    np.testing.assert_array_equal(np.array(lengths), m[:, 1:].sum(1))


def test_reference_pass_is_the_base_or_the_frozen_copy(pairs):
    model = lora_model()
    randomize_adapter(model, 1)
    tokens, mask = collate_pairs(pairs[:2], 0, 8)
    adapters.set_enabled(model, False)
    base = pref.sequence_logps(model, tokens, mask)[0]
    adapters.set_enabled(model, True)
    policy = pref.sequence_logps(model, tokens, mask)[0]
    assert not np.allclose(np.array(base), np.array(policy))
    # No frozen copy: the reference is the base (adapter off).
    np.testing.assert_allclose(np.array(reference_logps(model, tokens, mask)), np.array(base),
                               rtol=1e-6)
    # A frozen copy of the current adapter: the reference is base + that adapter, and stays
    # so when the trainable adapter moves.
    adapters.freeze_reference(model)
    assert adapters.has_reference_copy(model)
    for _, m in adapters.lora_layers(model):
        m.lora_b = m.lora_b * 0
    np.testing.assert_allclose(np.array(reference_logps(model, tokens, mask)),
                               np.array(policy), rtol=1e-6)
    np.testing.assert_allclose(np.array(pref.sequence_logps(model, tokens, mask)[0]),
                               np.array(base), rtol=1e-6)
    # The frozen copy is never saved with the adapter, nor trained.
    names = set(dict(tree_flatten(model.trainable_parameters())))
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert all(".ref_lora_" not in n for n in names)


def test_gradients_reach_only_the_trainable_adapter(pairs):
    model = lora_model()
    randomize_adapter(model, 2)
    adapters.freeze_reference(model)
    tokens, mask = collate_pairs(pairs[:3], 0, 8)
    ref = reference_logps(model, tokens, mask)
    loss_and_grad = nn.value_and_grad(model, lambda mdl, *b: pref.dpo(mdl, *b, beta=0.5)[0])
    # Move the policy off the reference first, so the DPO gradient is not trivially symmetric.
    for _, m in adapters.lora_layers(model):
        m.lora_b = m.lora_b * 1.5
    loss, grads = loss_and_grad(model, tokens, mask, ref)
    flat = dict(tree_flatten(grads))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(flat) == set(trainable)
    assert all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert sum(float(mx.abs(g).sum()) for g in flat.values()) > 0
    # Every parameter that is not the trainable adapter (base weights, the frozen reference
    # copy) is absent from the gradient: value_and_grad differentiates trainable ones only.
    every = dict(tree_flatten(model.parameters()))
    frozen = set(every) - set(trainable)
    assert any(".ref_lora_a" in k for k in frozen) and any(k.endswith("q_proj.linear.weight")
                                                           for k in frozen)
    assert not frozen & set(flat)
    # The reference log-probs are an input: the loss's gradient through them is zero.
    g_ref = mx.grad(lambda r: pref.dpo(model, tokens, mask, r, beta=0.5)[0])(ref)
    assert float(mx.abs(g_ref).max()) == 0.0


def test_precomputed_reference_equals_on_the_fly(pairs, tmp_path):
    model = lora_model()
    randomize_adapter(model, 3)
    adapters.freeze_reference(model)
    identity = {"model": "tiny"}
    on_the_fly = Reference(model, 0, 32, compile=True)
    pre = Reference(model, 0, 32, compile=False)
    path = pre.precompute("train", pairs, tmp_path, identity, batch_size=4)
    assert path.is_file() and path.parent.name == "reference"
    for idx in ([0, 1, 2], [5, 3], [4]):
        tokens, mask = collate_pairs([pairs[i] for i in idx], 0, 32)
        a = on_the_fly.batch("train", idx, tokens, mask)
        b = pre.batch("train", idx, tokens, mask)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)
        la = pref.dpo(model, tokens, mask, a)[0].item()
        lb = pref.dpo(model, tokens, mask, b)[0].item()
        # The compiled and the eager reference agree to float32 rounding (measured: 6e-5
        # on log-probs of ~-250); the loss moves by about beta / 2 times that.
        assert la == pytest.approx(lb, rel=1e-5)
    # Read back under the same key; another reference adapter is another key.
    again = Reference(model, 0, 32)
    messages = []
    assert again.precompute("train", pairs, tmp_path, identity, 4, messages.append) == path
    assert "read from" in messages[0]
    for _, m in adapters.lora_layers(model):
        m.ref_lora_b = m.ref_lora_b * 2
    other = Reference(model, 0, 32).precompute("train", pairs, tmp_path, identity, 4)
    assert other != path


def test_score_pairs_for_evaluation(pairs):
    model = lora_model()
    randomize_adapter(model, 4)
    got = score_pairs(model, pairs, pad_id=0, batch_size=4)
    assert set(got) == {"policy_chosen", "policy_rejected", "reference_chosen",
                        "reference_rejected", "chosen_tokens", "rejected_tokens"}
    tokens, mask = collate_pairs(pairs[2:3], 0, 32)
    one = pair_logps(model, tokens, mask)
    for k, v in one.items():
        assert got[k][2] == pytest.approx(v[0], rel=1e-5), k


# ----------------------------------------------------------------------------- runs end to end


@pytest.fixture
def dpo_workdir(tmp_path, tiny_model_dir):
    """Preference data, and an 'SFT' adapter to start from (random, so it is not the base)."""
    write_jsonl(tmp_path / "pairs.jsonl", [conv_pair(i) for i in range(28)])
    save_random_adapter(tmp_path / "sft")
    config = {
        "name": "tiny-dpo",
        "model": {"path": str(tiny_model_dir), "adapter": str(tmp_path / "sft")},
        "adapter": {"rank": 4, "alpha": 8},
        "data": {"path": "pairs.jsonl", "split": {"by": "user", "valid": 0.3, "test": 0.0},
                 "max_seq_len": 96},
        "objective": {"type": "dpo", "beta": 0.5},
        "train": {"iters": 6, "batch_size": 2, "learning_rate": 5e-3, "eval_every": 3,
                  "save_every": 3, "log_every": 1, "seed": 1},
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def run_events(workdir, name, *sets, capsys=None):
    run_dir = workdir / name
    code, out = run_cli(["run", str(workdir / "dpo.yaml"), "--run-dir", str(run_dir), "--quiet",
                         *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 0, out.err if out else code
    return run_dir, read_events(run_dir)


def test_dpo_run_logs_trl_metrics_and_keeps_the_reference(dpo_workdir, capsys, tiny_model_dir, profile):
    run_dir, events = run_events(dpo_workdir, "run", capsys=capsys)
    trains = [e for e in events if e["event"] == "train"]
    vals = [e for e in events if e["event"] == "val"]
    assert len(trains) == 6 and len(vals) == 3
    for e in trains + vals:
        assert TRL_METRICS <= set(e), e
        assert 0.0 <= e["rewards/accuracies"] <= 1.0
        assert e["rewards/margins"] == pytest.approx(e["rewards/chosen"] - e["rewards/rejected"],
                                                     abs=1e-5)
    # Step 0: policy == reference (a copy of the SFT adapter), so every reward is 0 and the
    # sigmoid loss is log 2.
    assert vals[0]["step"] == 0 and vals[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert vals[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert vals[-1]["rewards/margins"] > 0.0
    assert trains[-1]["loss"] < trains[0]["loss"]
    # The saved adapter is a whole adapter (no reference copy inside), loadable alone, and
    # differs from the SFT adapter it started from; the SFT adapter file is untouched.
    saved = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    sft = mx.load(str(dpo_workdir / "sft" / "adapters.safetensors"))
    assert set(saved) == set(sft)
    assert any(not np.allclose(np.array(saved[k]), np.array(sft[k])) for k in sft)

    # The reference log-probs did not move: base + SFT adapter, before and after training,
    # equals a fresh load of base + SFT adapter.
    from mlxtune import config as config_mod, models
    from mlxtune.data.records import read_records as rr
    cfg = config_mod.load(dpo_workdir / "dpo.yaml")
    loaded = models.load(cfg.model)
    model = loaded.model
    adapters.load(model, dpo_workdir / "sft")
    records, _ = rr(dpo_workdir / "pairs.jsonl")
    pairs = encode_pairs(records, loaded.tokenizer, 96).pairs
    before = score_pairs(model, pairs, 0, 4, reference=False)
    adapters.freeze_reference(model)
    w = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    model.load_weights(list(w.items()), strict=False)
    after = score_pairs(model, pairs, 0, 4)
    np.testing.assert_allclose(after["reference_chosen"], before["policy_chosen"], rtol=1e-6)
    np.testing.assert_allclose(after["reference_rejected"], before["policy_rejected"], rtol=1e-6)
    assert not np.allclose(after["policy_chosen"], before["policy_chosen"])
    margins = (after["policy_chosen"] - after["reference_chosen"]) \
        - (after["policy_rejected"] - after["reference_rejected"])
    assert (margins > 0).mean() > 0.5


def test_precompute_reference_gives_the_same_run_and_is_reused_on_resume(dpo_workdir, capsys, profile):
    _, fly = run_events(dpo_workdir, "fly", capsys=capsys)
    run_dir, pre = run_events(dpo_workdir, "pre", "objective.precompute_reference=true",
                              "train.iters=3", capsys=capsys)
    cached = sorted(p.name for p in (run_dir / "reference").iterdir())
    assert [n.split("-")[0] for n in cached] == ["train", "valid"]
    for a, b in zip([e for e in fly if e["event"] in ("train", "val")],
                    [e for e in pre if e["event"] in ("train", "val")]):
        assert a["event"] == b["event"] and a["step"] == b["step"]
        for k in ("loss", *TRL_METRICS):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "reference").iterdir()}
    code, out = run_cli(["run", str(dpo_workdir / "dpo.yaml"), "--run-dir", str(run_dir),
                         "--resume", "--set", "objective.precompute_reference=true"], capsys)
    assert code == 0, out.err
    assert "read from" in out.err
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "reference").iterdir()} == mtimes
    resumed = [e for e in read_events(run_dir) if e["event"] == "train"]
    fly_trains = {e["step"]: e for e in fly if e["event"] == "train"}
    for e in resumed[3:]:
        assert e["loss"] == pytest.approx(fly_trains[e["step"]]["loss"], rel=1e-4)


def test_micro_batches_of_pairs_give_the_same_run(dpo_workdir, capsys):
    """train.max_batch_tokens splits a batch of pairs into micro-batches (each pair's two
    rows and reference values together): the same losses and adapter."""
    _, whole = run_events(dpo_workdir, "whole", "train.iters=2", capsys=capsys)
    run_dir, split = run_events(dpo_workdir, "split", "train.iters=2",
                                "train.max_batch_tokens=1", capsys=capsys)
    for a, b in zip([e for e in whole if e["event"] in ("train", "val")],
                    [e for e in split if e["event"] in ("train", "val")]):
        for k in ("loss", *TRL_METRICS):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    one = mx.load(str(dpo_workdir / "whole" / "adapters" / "adapters.safetensors"))
    two = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    for k in one:
        np.testing.assert_allclose(np.array(two[k]), np.array(one[k]), rtol=1e-4, atol=1e-6)


def test_pairs_on_several_cpu_streams_give_the_same_run(dpo_workdir, capsys):
    """train.cpu_streams splits a batch's pairs over streams (each pair whole): the same
    losses, TRL metrics and adapter as one stream."""
    _, one_stream = run_events(dpo_workdir, "one", "train.iters=2", "train.cpu_streams=1",
                               capsys=capsys)
    run_dir, streams = run_events(dpo_workdir, "three", "train.iters=2",
                                  "train.cpu_streams=3", capsys=capsys)
    for a, b in zip([e for e in one_stream if e["event"] in ("train", "val")],
                    [e for e in streams if e["event"] in ("train", "val")]):
        for k in ("loss", *TRL_METRICS):
            if k == "rewards/accuracies" and abs(a["rewards/margins"]) < 1e-4:
                continue  # policy == reference: the sign of each margin is float rounding
            # Summed log-probs of ~-100 carry ~1e-4 of float32 rounding; rewards: beta x that.
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=5e-5), (a["step"], k)
    one = mx.load(str(dpo_workdir / "one" / "adapters" / "adapters.safetensors"))
    three = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    # AdamW turns rounding in a near-zero gradient into up to ~1e-5: 1% of a step here.
    for k in one:
        np.testing.assert_allclose(np.array(three[k]), np.array(one[k]), rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_objectives_train(dpo_workdir, capsys, kind):
    run_dir, events = run_events(dpo_workdir, kind, f"objective.type={kind}",
                                 "objective.beta=null", "model.adapter=null", capsys=capsys)
    trains = [e for e in events if e["event"] == "train"]
    assert all(TRL_METRICS <= set(e) for e in trains)
    if kind == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(trains[0])
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert not (run_dir / "reference").exists()


@pytest.mark.parametrize("sets,message", [
    (["objective.type=sft"], "objective.type sft does not train on"),
    (["objective.type=orpo", "objective.loss=ipo"], "objective.loss: ipo is a DPO loss"),
    (["objective.type=simpo", "objective.precompute_reference=true"], "has no reference"),
    (["objective.loss=hinge", "objective.label_smoothing=0.1"], "does not use it"),
    (["objective.label_smoothing=0.5"], "objective.label_smoothing: must be <= 0.49"),
    (["objective.loss=nope"], "objective.loss: 'nope' is not one of"),
    (["data.packing=true"], "preference pairs are not packed"),
    (["objective.type=simpo", "objective.rpo_alpha=1"], "objective.rpo_alpha: adds an NLL"),
])
def test_bad_objective_settings_are_one_line(dpo_workdir, capsys, sets, message):
    code, out = run_cli(["run", str(dpo_workdir / "dpo.yaml"), "--run-dir",
                         str(dpo_workdir / "bad"), *[a for s in sets for a in ("--set", s)]],
                        capsys)
    assert code != 0
    assert message in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert not (dpo_workdir / "bad").exists()


def test_dpo_on_chat_data_is_one_line(tmp_path, tiny_model_dir, capsys):
    from test_train import chat

    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(8)])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)}, "data": {"train": "train.jsonl"},
        "objective": {"type": "dpo"}}))
    code, out = run_cli(["run", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")],
                        capsys)
    assert code != 0 and "train.jsonl: objective.type dpo trains on preference pairs" in out.err


def test_eval_of_a_dpo_run_compares_base_start_and_tuned(dpo_workdir, capsys, profile):
    """`mlxtune eval` on a DPO run started from an SFT adapter: three sides (base, the SFT
    adapter it started from, the DPO adapter), each checked against log-probs computed here
    with score_pairs on separately loaded models."""
    from mlxtune import config as config_mod, models
    from mlxtune.evaluate import held_out

    run_dir, _ = run_events(dpo_workdir, "run", "train.iters=3", capsys=capsys)
    code, out = run_cli(["eval", str(run_dir), "--split", "valid", "--adapter", "final",
                         "--max-new-tokens", "6", "--json", "--quiet"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["start_adapter"] == str(dpo_workdir / "sft")

    cfg = config_mod.load(run_dir / "config.yaml")
    records, _ = held_out(cfg, "valid")
    loaded = models.load(cfg.model)
    pairs = encode_pairs(records, loaded.tokenizer, 96).pairs
    model = loaded.model
    scores = {"base": score_pairs(model, pairs, 0, 4, reference=False)}
    adapters.load(model, dpo_workdir / "sft")
    scores["start"] = score_pairs(model, pairs, 0, 4, reference=False)
    tuned = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    model.load_weights(list(tuned.items()), strict=False)  # same layers, the run's weights
    scores["tuned"] = score_pairs(model, pairs, 0, 4, reference=False)
    for side, s in scores.items():
        c, r, n = s["policy_chosen"], s["policy_rejected"], s["chosen_tokens"]
        got = result[side]
        assert got["pairs"] == len(pairs)
        assert got["loss"] == pytest.approx(-c.sum() / n.sum(), rel=1e-5), side
        assert got["perplexity"] == pytest.approx(np.exp(-c.sum() / n.sum()), rel=1e-5)
        assert got["preference_accuracy"] == pytest.approx((c > r).mean()), side
        assert "exact_match" in got
    # DPO's implicit reward of the tuned side, against the start (the reference policy).
    h = (scores["tuned"]["policy_chosen"] - scores["start"]["policy_chosen"]) \
        - (scores["tuned"]["policy_rejected"] - scores["start"]["policy_rejected"])
    assert result["tuned"]["reward_accuracy"] == pytest.approx((h > 0).mean())
    assert result["tuned"]["reward_margin"] == pytest.approx(0.5 * h.mean(), rel=1e-4)
    assert "reward_accuracy" not in result["start"]
    md = (run_dir / "eval.md").read_text()
    assert "| | base | 3-shot | start | tuned |" in md and "preference accuracy" in md
    preds = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").open()]
    assert len(preds) == len(records) and {"base", "start", "tuned"} <= set(preds[0])


def test_quickstart_preferences_are_reproducible_and_split_like_the_sft_data(tmp_path):
    import importlib.util

    from mlxtune.config import SplitConfig
    from mlxtune.data import split_records

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "make_quickstart_preferences", root / "scripts" / "make_quickstart_preferences.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = root / "data" / "quickstart" / "preferences.jsonl"
    assert gen.write(tmp_path).read_bytes() == committed.read_bytes()
    split = SplitConfig(by="user", valid=0.1, test=0.1)
    sft = split_records(read_records(root / "data/quickstart/tasks.jsonl")[0], split, 0, "sft")
    prefs, fmt = read_records(committed)
    assert fmt == "preference"
    dpo = split_records(prefs, split, 0, "dpo")
    for name in ("train", "valid", "test"):
        assert {r.data["user"] for r in sft[name]} == {r.data["user"] for r in dpo[name]}
    kinds = {r.data["failure"] for r in prefs}
    assert kinds == set(gen.KINDS) | set(gen.DATE_KINDS)
    # Every chosen answer matches the schema; the format failures never do.
    from mlxtune.evaluate.metrics import Schema

    schema = Schema(root / "data/quickstart/task.schema.json")
    format_kinds = {"prose", "code_fence", "missing_field", "unresolved_date", "bad_enum",
                    "wrong_type", "broken_json", "extra_key", "ordinal_date",
                    "unpadded_date"}
    for r in prefs:
        assert schema.matches(json.loads(r.data["chosen"][0]["content"]))
        if r.data["failure"] in format_kinds:
            try:
                ok = schema.matches(json.loads(r.data["rejected"][0]["content"]))
            except ValueError:
                ok = False
            assert not ok, r.data


def test_eval_on_another_data_file_measures_the_sft_task(dpo_workdir, capsys):
    """`mlxtune eval RUN --data FILE`: a DPO run measured on chat data split by the run's
    rule: SFT metrics per side, written beside (not over) the run's own eval."""
    from mlxtune import config as config_mod, models
    from mlxtune.config import SplitConfig
    from mlxtune.data import encode, split_records
    from mlxtune.evaluate import split_loss

    chats = [{"messages": [*p["prompt"], *p["chosen"]], "user": p["user"]}
             for p in map(conv_pair, range(28))]
    write_jsonl(dpo_workdir / "chats.jsonl", chats)
    run_dir, _ = run_events(dpo_workdir, "run", "train.iters=3", "eval.auto=false",
                            "eval.examples=0", capsys=capsys)
    # eval.examples (0: no generation on the run's own pairs) does not carry over to
    # another file, which is generated for in full unless --limit says otherwise.
    code, out = run_cli(["eval", str(run_dir), "--data", str(dpo_workdir / "chats.jsonl"),
                         "--split", "valid", "--max-new-tokens", "4", "--json", "--quiet",
                         "--no-base"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    assert "base" not in result  # --no-base
    assert "| | 3-shot | start | tuned |" in (run_dir / "eval-chats.md").read_text()
    assert not (run_dir / "eval.json").exists()
    assert json.loads((run_dir / "eval-chats.json").read_text()) == result
    assert (run_dir / "eval-chats.md").read_text().startswith("# Evaluation")
    assert "valid split of chats.jsonl" in (run_dir / "eval-chats.md").read_text()
    assert result["format"] == "chat" and set(result) >= {"start", "tuned"}
    # The file's valid split under the run's rule: the same users as the pairs' valid split.
    split = SplitConfig(by="user", valid=0.3, test=0.0)
    records, _ = read_records(dpo_workdir / "chats.jsonl")
    held = split_records(records, split, 1, "chats")["valid"]
    pairs_valid = split_records(read_records(dpo_workdir / "pairs.jsonl")[0], split, 1,
                                "pairs")["valid"]
    assert {r.data["user"] for r in held} == {r.data["user"] for r in pairs_valid}
    assert result["split_examples"] == len(held) and result["generated_examples"] == len(held)
    # The start side's loss is the SFT adapter's loss on those chats, computed here.
    cfg = config_mod.load(run_dir / "config.yaml")
    loaded = models.load(cfg.model)
    adapters.load(loaded.model, dpo_workdir / "sft")
    examples = encode(held, loaded.tokenizer, 96, None, "chat").examples
    s, n = split_loss(loaded.model, examples, 2, 0)
    assert result["start"]["loss"] == pytest.approx(s / n, rel=1e-5)
    assert "preference_accuracy" not in result["tuned"]
    events = [e for e in read_events(run_dir) if e["event"] == "eval"]
    assert events[-1]["data"] == str(dpo_workdir / "chats.jsonl")


def test_onpolicy_pairs_replace_rejected_with_the_models_own_wrong_answers(dpo_workdir):
    """scripts/make_onpolicy_preferences.py on a tiny model: train/valid pairs get the
    start adapter's greedy answer as the rejected one (unless it is right), test pairs and
    the split stay as they were, and the file it writes trains."""
    import subprocess
    import sys

    from mlxtune import config as config_mod, models
    from mlxtune.config import SplitConfig
    from mlxtune.data import split_records
    from mlxtune.evaluate import generate, prompt_and_reference, stop_ids

    root = Path(__file__).resolve().parents[1]
    cfg_path = dpo_workdir / "dpo.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["split"]["test"] = 0.2
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = dpo_workdir / "onpolicy.jsonl"
    args = [sys.executable, str(root / "scripts" / "make_onpolicy_preferences.py"),
            "--config", str(cfg_path), "--pairs", str(dpo_workdir / "pairs.jsonl"),
            "--out", str(out), "--max-new-tokens", "5"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr

    old, _ = read_records(dpo_workdir / "pairs.jsonl")
    new, fmt = read_records(out)
    assert fmt == "preference" and len(new) == len(old)
    split = SplitConfig(by="user", valid=0.3, test=0.2)
    s_old, s_new = split_records(old, split, 1, "a"), split_records(new, split, 1, "b")
    # Independently: the SFT adapter's greedy answers, one prompt at a time.
    loaded = models.load(config_mod.load(cfg_path).model)
    adapters.load(loaded.model, dpo_workdir / "sft")
    tok = loaded.tokenizer
    for name in ("train", "valid", "test"):
        assert [r.data["user"] for r in s_old[name]] == [r.data["user"] for r in s_new[name]]
        for a, b in zip(s_old[name], s_new[name]):
            assert a.data["prompt"] == b.data["prompt"] and a.data["chosen"] == b.data["chosen"]
            if name == "test":
                assert a.data == b.data
                continue
            ids, chosen, _ = prompt_and_reference(a, "preference", tok)
            g = generate.greedy(loaded.model, [ids], stop_ids(tok), 5, 1)[0][0]
            text = tok.decode(g.tokens)
            if text.strip() == chosen.strip() or not text.strip():
                assert a.data == b.data
            else:
                assert b.data["rejected"][-1]["content"] == text
                assert b.data["failure"] == "sft_generation"
    assert any(r.data.get("failure") == "sft_generation" for r in new)
    # Refuses to overwrite without --force.
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr
