"""GRPO's training loop: the trainer's loop (mlxtune.train.loop), with a rollout batch
where SFT has a batch of examples.

Every `objective.num_iterations` steps the next `train.batch_size` prompts are rolled out
(mlxtune.objectives.rollout: group_size completions each, sampled from the current policy
with its adapter on and dropout off), scored (objective.rewards), turned into
group-relative advantages (mlxtune.objectives.grpo) and, when they are needed, scored
token by token by the rollout policy (num_iterations > 1: the ratio's denominator) and by
the reference (beta > 0: the adapter switched off, or the frozen starting adapter;
adapters.reference_pass, as DPO's; never a second copy of the model). The batch then
trains for num_iterations optimisation steps like any other batch (the compiled step,
train.max_batch_tokens micro-batches, checkpoints, signals).

Resume equals an uninterrupted run: sampling draws from a PRNG key of (seed, rollout
index), and each rollout batch is saved in RUN_DIR/rollouts/ before its first step, so a
run resumed between two steps of one batch trains on the same batch.

Every train event carries TRL's metrics: reward, reward_std, rewards/<name>/mean and
/std, frac_reward_zero_std, completions/mean_length, /min_length, /max_length,
/clipped_ratio (cut at max_completion_tokens), clip_ratio (and /low_mean, /high_mean),
kl (beta > 0). Rollouts that fall on a log_every step write their first prompt's group to
RUN_DIR/completions.jsonl with rewards and advantages; a warning line says when most
groups have zero reward variance or most completions are truncated (the two ways a GRPO
run learns nothing without failing).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune import adapters
from mlxtune.errors import ConfigError, TrainingStopped
from mlxtune.objectives import grpo, rollout
from mlxtune.train.loop import PAD_MULTIPLE, Trainer, step_seed

ROLLOUT_DIR = "rollouts"
SAMPLES_FILE = "completions.jsonl"
WARN_SHARE = 0.5  # "most": more than half


class PromptBatcher:
    """Batches of prompt indices: a fresh random order each epoch, full batches only
    (a split smaller than a batch is one batch)."""

    layout = "prompts"
    packed = False

    def __init__(self, prompts: list, batch_size: int, seed: int, group_size: int):
        self.n, self.batch_size, self.seed, self.group = len(prompts), batch_size, seed, group_size

    def order(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.n).tolist()
        size = min(self.batch_size, self.n)
        return [perm[i:i + size] for i in range(0, self.n - size + 1, size)]

    def batches_per_epoch(self) -> int:
        return max(1, self.n // min(self.batch_size, self.n))

    def describe(self) -> str:
        size = min(self.batch_size, self.n)
        return (f"grpo: rollouts of {size} prompts x {self.group} completions "
                f"({self.n} prompts, {self.batches_per_epoch()} rollout batches per epoch)")


class GRPOTrainer(Trainer):
    def __init__(self, *args, tokenizer, rewards, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.cfg.objective
        check(self.cfg, self.world.size)
        self.tokenizer, self.rewards = tokenizer, rewards
        from mlxtune.evaluate import stop_ids

        self.stop_ids = stop_ids(tokenizer)
        self.beta = o.beta or 0.0
        self._rollout: tuple[int, tuple, dict] | None = None
        self.rollout_dir = self.run_dir / ROLLOUT_DIR

    # ------------------------------------------------------------------ rollouts

    def _next_batch(self) -> tuple[tuple, bool]:
        n = self.cfg.objective.num_iterations
        k = self.pos.step // n
        if self._rollout is None or self._rollout[0] != k:
            path = self.rollout_dir / f"rollout-{k}.npz"
            if self.pos.step % n:  # resumed inside a rollout batch: the saved one
                if not path.is_file():
                    raise TrainingStopped(f"{path}: the rollout batch of step "
                                          f"{self.pos.step + 1} is missing; cannot resume "
                                          "inside it")
                self._rollout = (k, *self._load(path))
            else:
                self._rollout = (k, *self._make(k, path))
        return self._rollout[1], True

    def _next_prompts(self) -> list[int]:
        if self.pos.batch >= len(self.batches.order(self.pos.epoch)):
            self.pos.epoch += 1
            self.pos.batch = 0
        batch = self.batches.order(self.pos.epoch)[self.pos.batch]
        self.pos.batch += 1
        return batch

    def _logps(self, tokens, mask) -> mx.array:
        o = self.cfg.objective
        lp, _ = grpo.token_logps(self.model, tokens, mask, o.temperature or 1.0,
                                 self.cfg.train.loss_chunk)
        lp = mx.stop_gradient(lp)
        mx.eval(lp)
        return lp

    def _make(self, k: int, path: Path) -> tuple[tuple, dict]:
        o, G = self.cfg.objective, self.cfg.objective.group_size
        items = [self.train_set[i] for i in self._next_prompts()]
        self.model.eval()
        try:
            gens = rollout.sample(self.model, [p.tokens for p in items], G, self.stop_ids,
                                  o.max_completion_tokens, o.temperature, o.top_p,
                                  seed=step_seed(self.cfg.train.seed, k))
            texts = [self.tokenizer.decode(g.tokens) for g in gens]
            owner = [items[i // G] for i in range(len(gens))]
            completions = [[{"role": "assistant", "content": t}]
                           if isinstance(p.prompt, list) else t for p, t in zip(owner, texts)]
            columns = {key: [p.columns.get(key) for p in owner]
                       for key in dict.fromkeys(c for p in items for c in p.columns)}
            columns.setdefault("reference", [p.reference for p in owner])
            table, total = self.rewards([p.prompt for p in owner], completions,
                                        [g.tokens for g in gens], columns)
            adv, metrics = grpo.advantages(total, G, o.scale_rewards)
            tokens, mask = rollout.collate([p.tokens for p in items], gens, G, self.pad_id,
                                           PAD_MULTIPLE, o.mask_truncated_completions)
            arrays = [tokens, mask, mx.array(adv.astype(np.float32))]
            if o.num_iterations > 1:  # the rollout policy's log-probs: the ratio's base
                arrays.append(self._logps(tokens, mask))
            if self.beta:
                with adapters.reference_pass(self.model):
                    arrays.append(self._logps(tokens, mask))
        finally:
            self.model.train()
        lengths = np.array([len(g.tokens) + g.stopped for g in gens], dtype=np.float64)
        truncated = np.array([not g.stopped for g in gens])
        for j, name in enumerate(self.rewards.names):
            col = table[:, j]
            ok = ~np.isnan(col)
            metrics[f"rewards/{name}/mean"] = float(col[ok].mean()) if ok.any() else math.nan
            metrics[f"rewards/{name}/std"] = float(col[ok].std(ddof=1)) if ok.sum() > 1 else 0.0
        metrics.update({"completions/mean_length": float(lengths.mean()),
                        "completions/min_length": float(lengths.min()),
                        "completions/max_length": float(lengths.max()),
                        "completions/clipped_ratio": float(truncated.mean())})
        self._save(path, arrays, metrics)
        self._report(k, owner, texts, table, total, adv, truncated, metrics)
        return tuple(arrays), metrics

    def _save(self, path: Path, arrays: list, metrics: dict) -> None:
        if not self.world.main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as f:
            np.savez(f, metrics=np.array(json.dumps(metrics)),
                     **{f"a{i}": np.array(a) for i, a in enumerate(arrays)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load(self, path: Path) -> tuple[tuple, dict]:
        with np.load(path) as z:
            n = sum(1 for key in z.files if key.startswith("a"))
            arrays = tuple(mx.array(z[f"a{i}"]) for i in range(n))
            metrics = json.loads(str(z["metrics"]))
        return arrays, metrics

    def _report(self, k, owner, texts, table, total, adv, truncated, metrics) -> None:
        o, t = self.cfg.objective, self.cfg.train
        first, last = k * o.num_iterations + 1, (k + 1) * o.num_iterations
        if self.world.main and (k == 0 or last // t.log_every > (first - 1) // t.log_every):
            with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
                for i in range(o.group_size):
                    p = owner[i]
                    f.write(json.dumps({
                        "step": first, "source": p.source,
                        "prompt": p.prompt, "completion": texts[i], "reference": p.reference,
                        "reward": float(total[i]), "advantage": float(adv[i]),
                        "rewards": {n: (None if math.isnan(table[i, j]) else float(table[i, j]))
                                    for j, n in enumerate(self.rewards.names)},
                        "truncated": bool(truncated[i])}, ensure_ascii=False) + "\n")
        step = f"step {first}"
        if metrics["frac_reward_zero_std"] > WARN_SHARE:
            self.progress.message(
                f"warning: {step}: {metrics['frac_reward_zero_std']:.0%} of the groups have the "
                "same reward for every completion (no advantage, nothing to learn from them): "
                "raise objective.temperature or group_size, or use rewards with partial credit")
        if metrics["completions/clipped_ratio"] > WARN_SHARE:
            self.progress.message(
                f"warning: {step}: {metrics['completions/clipped_ratio']:.0%} of the completions "
                f"ran out of objective.max_completion_tokens ({o.max_completion_tokens}) "
                "before their stop token: raise it, or add a length reward")

    # ------------------------------------------------------------------ steps

    def _train_step(self, fused, micro, finish):
        loss, weight, ntok, m = super()._train_step(fused, micro, finish)
        # clip_ratio..., kl: means over the completion tokens (ntok: the mask's sum)
        out = {k: v / max(ntok, 1) for k, v in m.items()}
        out.update(self._rollout[2])
        w = max(weight, 1)  # the loop divides summed metrics by the summed weight
        return loss, weight, ntok, {k: v * w for k, v in out.items()}

    def validate(self):
        """GRPO has no validation loss (its loss is relative to each rollout batch)."""
        return None


def check(cfg, ranks: int = 1) -> None:
    """Trainer settings GRPO does not take (one line naming the key)."""
    if ranks > 1:
        raise ConfigError(f"{cfg.source}: objective.type: grpo does not run on several "
                          "ranks yet (run it as one process)")
    if cfg.train.grad_accumulation > 1:
        raise ConfigError(f"{cfg.source}: train.grad_accumulation: grpo trains each rollout "
                          "batch as one step; use train.max_batch_tokens to split it into "
                          "micro-batches instead")
