"""mlxtune.decode, the batched decoder behind eval, compare and GRPO's rollouts: greedy
rows against a plain reference (a full forward pass over the whole sequence per token, no
cache), under both compute profiles; rows of different lengths, a shared prefix and
repeated prompts in one batch against each prompt alone; stops per row; sampling
reproducible from its key."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import adapters, backend, decode, models
from mlxtune.config import AdapterConfig, ModelConfig


def reference(model, prompt, stop, max_new):
    """Greedy by full forward passes (no cache, no batch), argmax of the last position."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        logits = model(mx.array([seq], dtype=mx.int32))[0, -1].astype(mx.float32)
        t = int(np.argmax(np.array(logits)))
        if t in stop:
            return out, t
        out.append(t)
        seq.append(t)
    return out, None


def load_tiny(path, lora: bool = False):
    """The tiny model as mlxtune loads a model under the current profile (its compute
    dtype, attention routing), with a random non-zero LoRA adapter if asked."""
    loaded = models.load(ModelConfig(path=str(path)))
    model = loaded.model
    if lora:
        mx.random.seed(3)
        adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
        for _, m in adapters.lora_layers(model):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    model.eval()
    return model, loaded.tokenizer


def prompts_of(tok):
    system = tok.encode("<|im_start|>system\nanswer in the shortest way<|im_end|>\n")
    texts = ["the cat", "a much longer prompt than the others here", "in", "hello there",
             "the cat"]  # a repeat: prefilled once, two rows
    return [system + tok.encode(f"<|im_start|>user\n{t}<|im_end|>\n") for t in texts] + \
        [tok.encode("x y"), tok.encode("the")]  # and two with nothing in common


@pytest.mark.parametrize("lora", [False, True])
def test_greedy_equals_full_forward_reference(tiny_model_dir, profile, lora):
    model, tok = load_tiny(tiny_model_dir, lora)
    assert backend.profile() == profile
    prompts = prompts_of(tok)
    # A stop token the model emits early for one prompt, so rows end at different steps
    # (some dropped from the batch, some finished but kept) while others run to the end.
    early, _ = reference(model, prompts[1], set(), 3)
    stop = {early[2]}
    refs = [reference(model, p, stop, 10) for p in prompts]
    for batch_size in (None, 3):
        rows, seconds = decode.generate(model, prompts, stop, 10, batch_size)
        assert seconds > 0
        for r, (tokens, stopped) in zip(rows, refs):
            assert r.tokens == tokens
            assert r.stop == stopped
            assert r.steps == len(tokens) + (stopped is not None)
    assert any(s is not None for _, s in refs) and not all(s is not None for _, s in refs)


def test_batch_of_different_lengths_equals_each_prompt_alone(tiny_model_dir):
    model, tok = load_tiny(tiny_model_dir, lora=True)
    prompts = prompts_of(tok)
    together, _ = decode.generate(model, prompts, set(), 8)
    for p, r in zip(prompts, together):
        (alone,), _ = decode.generate(model, [p], set(), 8)
        assert r.tokens == alone.tokens and len(r.tokens) == 8 and not r.stopped


def test_prefill_shares_the_prefix_and_repeated_prompts(tiny_model_dir):
    model, tok = load_tiny(tiny_model_dir)
    prompts = prompts_of(tok)[:5]  # the system prompt in common, prompt 4 == prompt 0
    assert decode._common_prefix(prompts) == len(tok.encode(
        "<|im_start|>system\nanswer in the shortest way<|im_end|>\n<|im_start|>user\n"))
    shared, logits = decode.prefill(model, prompts, 4)
    plain, plain_logits = decode.prefill(model, prompts, 4, share=False)
    np.testing.assert_allclose(np.array(logits), np.array(plain_logits), atol=2e-4)
    # every row's cache holds its own prompt's tokens and no other slot
    valid = np.array(shared.rows.valid)
    assert valid.sum(axis=1).tolist() == [len(p) for p in prompts]
    assert np.array(shared.rows.offset).tolist() == [len(p) for p in prompts]


def test_stops_per_row(tiny_model_dir):
    model, tok = load_tiny(tiny_model_dir)
    prompts = prompts_of(tok)
    free = [reference(model, p, set(), 6)[0] for p in prompts]
    # each row's own third token as a stop token: every row that emits it ends there
    stop = {free[0][2], free[3][1]}
    rows, _ = decode.generate(model, prompts, stop, 6)
    for r, f in zip(rows, free):
        cut = next((i for i, t in enumerate(f) if t in stop), None)
        if cut is None:
            assert r.tokens == f and r.stop is None and r.steps == 6
        else:
            assert r.tokens == f[:cut] and r.stop == f[cut] and r.steps == cut + 1
    assert rows[0].stop == free[0][2] and len(rows[0].tokens) <= 2


def test_sampling_is_reproducible_from_its_key(tiny_model_dir, profile):
    model, tok = load_tiny(tiny_model_dir, lora=True)
    prompts = [p for p in prompts_of(tok)[:3] for _ in range(4)]  # groups of 4

    def run(seed, **kw):
        rows, _ = decode.generate(model, prompts, set(), 6, temperature=1.0,
                                  key=mx.random.key(seed), **kw)
        return [r.tokens for r in rows]

    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a != c
    assert len({tuple(t) for t in a[:4]}) > 1  # a group's rows draw their own tokens
    # top-p so small only the most likely token remains: greedy
    greedy, _ = decode.generate(model, prompts, set(), 6)
    rows, _ = decode.generate(model, prompts, set(), 6, temperature=1.0, top_p=1e-6,
                              key=mx.random.key(9))
    assert [r.tokens for r in rows] == [g.tokens for g in greedy]
    with pytest.raises(ValueError, match="key"):
        decode.generate(model, prompts, set(), 6, temperature=1.0)


def test_sampling_follows_the_distribution(tiny_model_dir):
    """One prompt repeated 400 times, one token each: the sampled frequencies match
    softmax(logits / T) over the tokens top-p keeps."""
    model, tok = load_tiny(tiny_model_dir)
    prompt = tok.encode("the cat")
    logits = np.array(model(mx.array([prompt]))[0, -1], dtype=np.float64)
    for temperature, top_p in ((2.0, 1.0), (2.0, 0.5)):
        rows, _ = decode.generate(model, [prompt] * 400, set(), 1, temperature=temperature,
                                  top_p=top_p, key=mx.random.key(1))
        z = logits / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep = order[before < top_p]
        q = np.zeros_like(p)
        q[keep] = p[keep] / p[keep].sum()
        counts = np.bincount([r.tokens[0] for r in rows], minlength=len(p))
        assert set(np.nonzero(counts)[0]) <= set(keep)
        top = keep[:3]
        # the most likely tokens' frequencies within 5 binomial standard deviations
        for t in top:
            sd = np.sqrt(400 * q[t] * (1 - q[t]))
            assert abs(counts[t] - 400 * q[t]) <= 5 * sd + 1, (t, counts[t], 400 * q[t])


def test_models_without_a_plain_cache_decode_one_at_a_time(tiny_model_dir, monkeypatch):
    model, tok = load_tiny(tiny_model_dir)
    monkeypatch.setattr(decode, "batchable", lambda m: False)
    prompts = prompts_of(tok)[:4]
    rows, _ = decode.generate(model, prompts, set(), 5)
    for p, r in zip(prompts, rows):
        assert r.tokens == reference(model, p, set(), 5)[0]
