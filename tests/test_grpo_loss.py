"""GRPO's loss against numpy: advantages (group / batch / none, zero-variance groups),
each loss type from given log-probs and advantages, KL, clipping, and the ratio of 1 at a
rollout batch's first step on a real (tiny) model."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.objectives import grpo as G


def np_advantages(r, g, scale):
    grouped = r.reshape(-1, g)
    adv = r - np.repeat(grouped.mean(1), g)
    if scale == "group":
        adv = adv / (np.repeat(grouped.std(1, ddof=1), g) + 1e-4)
    elif scale == "batch":
        adv = adv / (r.std(ddof=1) + 1e-4)
    return adv


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_and_zero_variance_groups(scale):
    r = np.array([1.0, 0.0, 0.5, 0.5,    # varied
                  0.3, 0.3, 0.3, 0.3,    # zero variance
                  2.0, 0.0, 0.0, 0.0])
    adv, m = G.advantages(r, 4, scale)
    np.testing.assert_allclose(adv, np_advantages(r, 4, scale), rtol=1e-12)
    np.testing.assert_array_equal(adv[4:8], 0.0)  # a zero-variance group teaches nothing
    assert m["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert m["reward"] == pytest.approx(r.mean())
    # hand values for the first group: mean 0.5, std (ddof 1) sqrt(1/6)
    if scale == "group":
        np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, 0, 0]) / (6 ** -0.5 + 1e-4))
    if scale == "none":
        np.testing.assert_allclose(adv[:4], [0.5, -0.5, 0, 0])


def np_loss(lp, old, ref, adv, mask, loss_type, eps, eps_high, beta, max_tokens):
    ratio = np.exp(lp - old)
    a = adv[:, None]
    l = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps_high) * a)
    if beta:
        l = l + beta * (np.exp(ref - lp) - (ref - lp) - 1)
    if loss_type == "dapo":
        return (l * mask).sum() / mask.sum()
    if loss_type == "grpo":
        return ((l * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean()
    return (l * mask).sum() / (lp.shape[0] * max_tokens)


@pytest.fixture
def batch():
    rng = np.random.default_rng(1)
    b, t = 12, 9
    lp = -rng.uniform(0.01, 4, (b, t))
    old = lp + rng.normal(0, 0.3, (b, t))     # ratios on both sides of the clip range
    ref = lp + rng.normal(0, 0.5, (b, t))
    adv = rng.normal(0, 1, b)
    lengths = rng.integers(1, t + 1, b)
    lengths[3] = 0  # a masked (truncated) completion
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("eps,eps_high,beta", [(0.2, None, 0.0), (0.2, 0.28, 0.0),
                                               (0.1, 0.3, 0.04)])
def test_each_loss_type_matches_numpy(batch, loss_type, eps, eps_high, beta):
    lp, old, ref, adv, mask = batch
    m64 = lambda x: mx.array(x, dtype=mx.float64)  # noqa: E731
    with mx.stream(mx.cpu):
        total, weight, metrics = G.grpo_loss(
            m64(lp), m64(old), m64(adv), m64(mask), loss_type=loss_type, epsilon=eps,
            epsilon_high=eps_high, beta=beta, ref_logps=m64(ref), max_completion_tokens=16)
        got = (total / weight).item()
    eh = eps if eps_high is None else eps_high
    want = np_loss(lp, old, ref, adv, mask, loss_type, eps, eh, beta, 16)
    assert got == pytest.approx(want, rel=1e-7)  # MLX's float64 exp is float32-accurate
    ratio = np.exp(lp - old)
    low = ((ratio < 1 - eps) & (adv[:, None] < 0)) * mask
    high = ((ratio > 1 + eh) & (adv[:, None] > 0)) * mask
    assert low.sum() > 0 and high.sum() > 0
    assert metrics["clip_ratio"].item() == low.sum() + high.sum()
    if beta:
        kl = (np.exp(ref - lp) - (ref - lp) - 1) * mask
        assert metrics["kl"].item() / mask.sum() == pytest.approx(
            kl.sum() / mask.sum(), rel=1e-7)
    else:
        assert "kl" not in metrics


def test_gradient_at_ratio_one_is_the_policy_gradient(batch):
    """With old = current (the first step of a rollout batch), d loss / d logp_it is
    -A_i m_it / N for dapo: the REINFORCE gradient with group-relative advantages."""
    lp, _, _, adv, mask = batch
    with mx.stream(mx.cpu):
        f = lambda x: G.grpo_loss(x, None, mx.array(adv, mx.float64),  # noqa: E731
                                  mx.array(mask, mx.float64))[0]
        g = mx.grad(f)(mx.array(lp, dtype=mx.float64))
    np.testing.assert_allclose(np.array(g), -adv[:, None] * mask, rtol=1e-12)


def test_ratio_is_one_at_the_first_step_on_a_model(tiny_model_dir):
    """Old log-probs computed at rollout time by the same weights: ratio exactly 1, so
    nothing is clipped and the loss is -mean advantage over tokens."""
    from mlxtune import adapters, models
    from mlxtune.config import AdapterConfig, ModelConfig

    loaded = models.load(ModelConfig(path=str(tiny_model_dir)))
    model = loaded.model
    adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(3, 200, (4, 12)), dtype=mx.int32)
    mask = mx.array(np.arange(12)[None] >= np.array([[5], [6], [7], [4]]))
    old, m = G.token_logps(model, tokens, mask)
    adv = mx.array([1.0, -1.0, 0.5, -0.5])
    for old_logps in (old, None):
        total, weight, metrics = G.grpo(model, tokens, mask, adv, old_logps, epsilon=0.0,
                                        epsilon_high=0.0)
        lp, _ = G.token_logps(model, tokens, mask)
        ratio = mx.exp(lp - (old if old_logps is not None else lp))
        assert np.allclose(np.array(ratio), 1.0)
        assert metrics["clip_ratio"].item() == 0
        mm = np.array(m, dtype=np.float64)
        want = -(np.array(adv)[:, None] * mm).sum() / mm.sum()
        assert (total / weight).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompts_equal_rows_one_by_one(tiny_model_dir, profile, temperature):
    """A shared batch (each prompt through the model once, its keys and values repeated
    for its group) gives every completion token the log-prob, and the loss the value and
    gradient, of the same rows computed whole: prompts of different lengths (one past
    attention.BLOCK, so the CPU profile's prompt pass takes its own attention), completions
    of different lengths, one cut without a stop token. float32 on both sides, so only the
    order of summation differs."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlxtune import adapters, models
    from mlxtune.config import AdapterConfig, ModelConfig
    from mlxtune.objectives import rollout

    model = models.load(ModelConfig(path=str(tiny_model_dir), dtype="float32")).model
    adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
    rng = np.random.default_rng(3)
    for name, p in tree_flatten(model.trainable_parameters()):  # B is zero at the start
        if name.endswith("lora_b"):
            model.update(adapters_tree(name, mx.array(rng.normal(0, 0.05, p.shape), p.dtype)))
    group = 3
    prompts = [list(rng.integers(3, 200, 9)), list(rng.integers(3, 200, 140))]  # past attention.BLOCK
    comps = [rollout.Completion(list(rng.integers(3, 200, n)), stopped, 2 if stopped else None)
             for n, stopped in [(4, True), (1, True), (6, False), (3, True), (7, True), (2, False)]]
    adv = mx.array(rng.normal(0, 1, len(comps)).astype(np.float32))
    tokens, mask = rollout.collate(prompts, comps, group, 0, 8)
    s_tokens, s_mask, heads, lengths = rollout.collate_shared(prompts, comps, group, 0, 8)

    whole, wm = G.token_logps(model, tokens, mask, temperature)
    shared, sm = G.shared_token_logps(model, s_tokens, s_mask, heads, lengths, group, temperature)
    assert int(wm.sum().item()) == int(sm.sum().item()) == sum(
        len(c.tokens) + c.stopped for c in comps)
    for i in range(len(comps)):  # the completion's tokens, in order, on both layouts
        a = np.array(whole[i])[np.array(wm[i])]
        b = np.array(shared[i])[np.array(sm[i])]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)

    def loss(layout):
        def f(model):
            extra = {} if layout == "whole" else dict(prompts=heads, lengths=lengths, group=group)
            t, m = (tokens, mask) if layout == "whole" else (s_tokens, s_mask)
            s, w, _ = G.grpo(model, t, m, adv, temperature=temperature, **extra)
            return s / w
        return nn.value_and_grad(model, f)(model)

    (v1, g1), (v2, g2) = loss("whole"), loss("shared")
    assert v2.item() == pytest.approx(v1.item(), rel=1e-4, abs=1e-5)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    scale = max(float(mx.abs(g).max().item()) for g in g1.values())
    assert scale > 0
    for k in g1:
        np.testing.assert_allclose(np.array(g2[k]), np.array(g1[k]), atol=1e-4 * scale)


def adapters_tree(name: str, value):
    """{"a": {"b": [.., {"c": value}]}} for the dotted name "a.b.3.c" (model.update's form)."""
    from mlx.utils import tree_unflatten
    return tree_unflatten([(name, value)])
