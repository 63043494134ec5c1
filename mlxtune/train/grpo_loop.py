"""GRPO's training loop: the trainer's loop (mlxtune.train.loop), with a rollout batch
where SFT has a batch of examples.

Every `objective.num_iterations` steps the next rollout batch is sampled: train.batch_size
prompts, or train.grad_accumulation such batches (rollout micro-batches, all sampled from
the same policy before the step), each cut among the data-parallel ranks in contiguous
shares of whole prompts, so every group of completions stays on one rank. A rank samples
its share of a micro-batch in one batch (mlxtune.objectives.rollout: group_size
completions per prompt, from the current policy with its adapter on and dropout off) from
the PRNG key of its sampling unit: (seed, (rollout * grad_accumulation + micro-batch) *
ranks + rank). The completions are scored (objective.rewards); the rewards of every rank
and micro-batch are gathered, so that the advantages (mlxtune.objectives.grpo; per group,
or scaled by the whole batch's std with scale_rewards: batch) and the metrics are those of
the whole rollout batch. When they are needed, the rows are scored token by token by the
rollout policy (num_iterations > 1: the ratio's denominator) and by the reference
(beta > 0: the adapter switched off, or the frozen starting adapter;
adapters.reference_pass, as DPO's; never a second copy of the model). The batch then
trains for num_iterations optimisation steps like any other batch (the compiled step,
train.max_batch_tokens micro-batches, checkpoints, signals); each step sums the loss
(sum, weight) and the gradients over every micro-batch and rank and divides once, so the
step's loss is the loss_type's over the whole rollout batch (dapo: over all its
completion tokens).

What equals what: the sampling units depend on ranks x grad_accumulation, so two ranks at
batch 2b sample exactly what one process samples at batch b with grad_accumulation 2,
and train the same steps (test_grpo.py). One process at batch 2b samples its 2b prompts
as one unit, from another key: the same loss on the same rollouts, but other rollouts.

Resume equals an uninterrupted run: sampling draws from the unit's key, and each rollout
batch (every rank's and micro-batch's arrays, gathered by rank 0) is saved in
RUN_DIR/rollouts/ before its first step, so a run resumed between two steps of one batch
trains on the same batch.

Validation (train.eval_every with a valid split): one greedy completion per valid prompt
(batches of train.batch_size prompts, the first train.val_batches of them, split among the
ranks), scored by the same rewards; the val event's `loss` is minus the mean reward (best/
and early stopping keep the highest), beside `reward`, `rewards/<name>/mean`,
`completions/mean_length` and `completions/clipped_ratio`.

Every train event carries TRL's metrics: reward, reward_std, rewards/<name>/mean and
/std, frac_reward_zero_std, completions/mean_length, /min_length, /max_length,
/clipped_ratio (cut at max_completion_tokens), clip_ratio (and /low_mean, /high_mean),
kl (beta > 0). Rollouts that fall on a log_every step write their first prompt's group to
RUN_DIR/completions.jsonl with rewards and advantages; a warning line says when most
groups have zero reward variance or most completions are truncated (the two ways a GRPO
run learns nothing without failing).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune import adapters, decode
from mlxtune.errors import DataError, TrainingStopped
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
        size = self.size()
        return [perm[i:i + size] for i in range(0, self.n - size + 1, size)]

    def batches_per_epoch(self) -> int:
        return max(1, self.n // self.size())

    def size(self) -> int:
        return min(self.batch_size, self.n)

    def describe(self) -> str:
        return (f"grpo: rollouts of {self.size()} prompts x {self.group} completions "
                f"({self.n} prompts, {self.batches_per_epoch()} rollout batches per epoch)")


def share(batch: list, rank: int, ranks: int) -> list:
    """A rank's contiguous share of a rollout micro-batch's prompts: whole prompts, so a
    group of completions never spans two ranks."""
    n = len(batch)
    return batch[rank * n // ranks:(rank + 1) * n // ranks]


def gather_rows(world, local: np.ndarray, parts: int) -> np.ndarray:
    """This rank's rows [parts * n, c] (n per micro-batch, the same on every rank) -> every
    rank's, [parts * ranks * n, c], micro-batch-major, then rank: the rollout batch's order.
    NaN (a reward that did not apply) comes through (NaN + 0 is NaN)."""
    if world.size == 1:
        return local
    c = local.shape[1]
    full = np.zeros((parts, world.size, local.shape[0] // parts, c), np.float64)
    full[:, world.rank] = local.reshape(parts, -1, c)
    return np.array(world.sum_floats(full.ravel().tolist())).reshape(-1, c)


def gather_bytes(world, data: bytes) -> list[bytes]:
    """Every rank's bytes, on every rank (rank order)."""
    if world.size == 1:
        return [data]
    sizes = [int(x) for x in world.sum_floats(
        [float(len(data)) if r == world.rank else 0.0 for r in range(world.size)])]
    ends = np.cumsum([0, *sizes])
    buf = np.zeros(int(ends[-1]), np.uint8)
    buf[ends[world.rank]:ends[world.rank + 1]] = np.frombuffer(data, np.uint8)
    out = np.array(mx.distributed.all_sum(mx.array(buf), group=world.group, stream=mx.cpu))
    return [out[ends[r]:ends[r + 1]].tobytes() for r in range(world.size)]


SHARED_PAD_MULTIPLE = 8


class GRPOTrainer(Trainer):
    def __init__(self, *args, tokenizer, rewards, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.cfg.objective
        self.tokenizer, self.rewards = tokenizer, rewards
        from mlxtune.evaluate import stop_ids

        self.stop_ids = stop_ids(tokenizer)
        self.beta = o.beta or 0.0
        self.accum = self.cfg.train.grad_accumulation
        # (rollout index, this rank's arrays per micro-batch, the batch's metrics)
        self._rollout: tuple[int, list[tuple], dict] | None = None
        self._micro = 0  # the next micro-batch of the step
        self.rollout_dir = self.run_dir / ROLLOUT_DIR
        # Each prompt through the model once for its group (objectives.grpo, "shared
        # prompts"), unless the step's rows are cut into parts (max_batch_tokens, streams:
        # the parts are rows) or the model's cache is not a plain KV cache.
        self.shared = (decode.batchable(self.model) and not self.cfg.train.max_batch_tokens
                       and self.n_streams == 1)
        # Shared batches pad less: completions are short, so PAD_MULTIPLE's 32 would be up
        # to 40% padding; a new width costs one compilation (~0.2 s here) against a step of
        # tens of seconds.
        self.pad_multiple = SHARED_PAD_MULTIPLE if self.shared else PAD_MULTIPLE

    # ------------------------------------------------------------------ rollouts

    def _next_batch(self) -> tuple[tuple, bool]:
        n = self.cfg.objective.num_iterations
        k = self.pos.step // n
        if self._rollout is None or self._rollout[0] != k:
            path = self.rollout_dir / f"rollout-{k}.npz"
            if self.pos.step % n:  # resumed inside a rollout batch: the saved one
                self._rollout = (k, *self._load(path))
            else:
                self._rollout = (k, *self._make(k, path))
        units = self._rollout[1]
        unit = units[self._micro % len(units)]
        self._micro += 1
        return unit, True

    def _next_prompts(self) -> list[int]:
        if self.pos.batch >= len(self.batches.order(self.pos.epoch)):
            self.pos.epoch += 1
            self.pos.batch = 0
        batch = self.batches.order(self.pos.epoch)[self.pos.batch]
        self.pos.batch += 1
        return batch

    def _logps(self, tokens, mask, *shared) -> mx.array:
        o, chunk = self.cfg.objective, self.cfg.train.loss_chunk
        if shared:
            lp, _ = grpo.shared_token_logps(self.model, tokens, mask, *shared, o.group_size,
                                            o.temperature or 1.0, chunk)
        else:
            lp, _ = grpo.token_logps(self.model, tokens, mask, o.temperature or 1.0, chunk)
        lp = mx.stop_gradient(lp)
        mx.eval(lp)
        return lp

    def _make(self, k: int, path: Path) -> tuple[list[tuple], dict]:
        o, t, w = self.cfg.objective, self.cfg.train, self.world
        G = o.group_size
        units = []  # per micro-batch: (prompts, completions, owners, texts, table, total)
        self.model.eval()
        try:
            for m in range(self.accum):  # every micro-batch from the same policy
                items = [self.train_set[i] for i in share(self._next_prompts(), w.rank, w.size)]
                unit = (k * self.accum + m) * w.size + w.rank
                gens = rollout.sample(self.model, [p.tokens for p in items], G, self.stop_ids,
                                      o.max_completion_tokens, o.temperature, o.top_p,
                                      seed=step_seed(t.seed, unit))
                scored = rollout.score(self.tokenizer, self.rewards, items, gens, G)
                units.append((items, gens, *scored))
            # [total, length, truncated, each reward] per completion, of the whole batch
            local = np.concatenate([np.column_stack([
                total, [len(g.tokens) + g.stopped for g in gens],
                [not g.stopped for g in gens], table]) for _, gens, _, _, table, total in units])
            every = gather_rows(w, local, self.accum)
            adv, metrics = grpo.advantages(every[:, 0], G, o.scale_rewards)
            mine = adv.reshape(self.accum, w.size, -1)[:, w.rank]
            arrays_of = []
            for (items, gens, *_), a in zip(units, mine):
                collate = rollout.collate_shared if self.shared else rollout.collate
                tokens, mask, *shared = collate([p.tokens for p in items], gens, G,
                                                self.pad_id, self.pad_multiple,
                                                o.mask_truncated_completions)
                arrays = [tokens, mask, mx.array(a.astype(np.float32))]
                if o.num_iterations > 1:  # the rollout policy's log-probs: the ratio's base
                    arrays.append(self._logps(tokens, mask, *shared))
                if self.beta:
                    with adapters.reference_pass(self.model):
                        arrays.append(self._logps(tokens, mask, *shared))
                arrays_of.append(tuple(arrays + shared))
        finally:
            self.model.train()
        lengths, truncated, table = every[:, 1], every[:, 2] > 0.5, every[:, 3:]
        for j, name in enumerate(self.rewards.names):
            col = table[:, j]
            ok = ~np.isnan(col)
            metrics[f"rewards/{name}/mean"] = float(col[ok].mean()) if ok.any() else math.nan
            metrics[f"rewards/{name}/std"] = float(col[ok].std(ddof=1)) if ok.sum() > 1 else 0.0
        metrics.update({"completions/mean_length": float(lengths.mean()),
                        "completions/min_length": float(lengths.min()),
                        "completions/max_length": float(lengths.max()),
                        "completions/clipped_ratio": float(truncated.mean())})
        self._save(path, arrays_of, metrics)
        _, gens, owner, texts, table0, total0 = units[0]
        self._report(k, owner, texts, table0, total0, mine[0],
                     [not g.stopped for g in gens], metrics)
        return arrays_of, metrics

    def _save(self, path: Path, arrays_of: list[tuple], metrics: dict) -> None:
        """Rank 0 writes every rank's arrays (rank r's under `rank{r}`: an npz of its
        micro-batches' arrays, m{m}_a{i}) and the batch's metrics."""
        inner = io.BytesIO()
        np.savez(inner, **{f"m{m}_a{i}": np.array(a) for m, arrays in enumerate(arrays_of)
                           for i, a in enumerate(arrays)})
        parts = gather_bytes(self.world, inner.getvalue())
        if not self.world.main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as f:
            np.savez(f, metrics=np.array(json.dumps(metrics)),
                     **{f"rank{r}": np.frombuffer(b, np.uint8) for r, b in enumerate(parts)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load(self, path: Path) -> tuple[list[tuple], dict]:
        """The saved rollout batch: rank 0 reads it and hands every rank the file."""
        w = self.world
        data = path.read_bytes() if w.main and path.is_file() else b""
        if not w.sum_floats([float(bool(data)) if w.main else 0.0])[0]:
            raise TrainingStopped(f"{path}: the rollout batch of step {self.pos.step + 1} "
                                  "is missing; cannot resume inside it")
        data = w.broadcast_bytes(data)
        with np.load(io.BytesIO(data)) as z:
            metrics = json.loads(str(z["metrics"]))
            inner = z[f"rank{w.rank}"].tobytes()
        with np.load(io.BytesIO(inner)) as z:
            keys = [tuple(int(x) for x in key[1:].split("_a")) for key in z.files]
            arrays_of = [tuple(mx.array(z[f"m{m}_a{i}"])
                               for i in range(1 + max(i for mm, i in keys if mm == m)))
                         for m in range(1 + max(m for m, _ in keys))]
        return arrays_of, metrics

    def _report(self, k, owner, texts, table, total, adv, truncated, metrics) -> None:
        """Rank 0's first group (the batch's first prompt) to completions.jsonl on log_every
        steps; the warnings, from the whole batch's metrics."""
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
        self._micro = 0
        loss, weight, ntok, m = super()._train_step(fused, micro, finish)
        # clip_ratio..., kl: means over the completion tokens (ntok: the mask's sum)
        out = {k: v / max(ntok, 1) for k, v in m.items()}
        out.update(self._rollout[2])
        w = max(weight, 1)  # the loop divides summed metrics by the summed weight
        return loss, weight, ntok, {k: v * w for k, v in out.items()}

    # ------------------------------------------------------------------ validation

    def validate(self) -> tuple[float, dict] | None:
        """(minus the mean reward, metrics) of one greedy completion per valid prompt:
        the first train.val_batches batches of train.batch_size prompts, each rank its
        share of the batches, decoded batch x group_size prompts at a time. GRPO's own
        loss has no meaning outside a rollout batch (it is relative to each group): the
        reward is what validation measures."""
        if not self.valid_set:
            return None
        from mlxtune.evaluate import ticker

        o, t, w = self.cfg.objective, self.cfg.train, self.world
        n, size = len(self.valid_set), t.batch_size
        order = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        if t.val_batches:
            order = order[:t.val_batches]
        order, real = w.shard(order)
        # Decoded together, as many prompts at a time as a rollout's rows (batch x group:
        # memory the plan already holds): a decoding step costs about the same for 4 rows
        # as for 32 on a CPU, so a batch of prompts at a time left it mostly idle.
        flat = [i for idx in order for i in idx]
        chunk = max(size * o.group_size, 1)
        order = [flat[i:i + chunk] for i in range(0, len(flat), chunk)]
        names = self.rewards.names
        # reward sum, completions, length sum, truncated, then per reward: sum, count
        sums = np.zeros(4 + 2 * len(names), np.float64)
        tick = ticker(self.progress.status, "val, greedy completions",
                      sum(len(b) for b in order), tokens=True)
        done = tokens = 0
        self.model.eval()
        try:
            for idx in order:
                items = [self.valid_set[i] for i in idx]
                gens = rollout.sample(self.model, [p.tokens for p in items], 1, self.stop_ids,
                                      o.max_completion_tokens, temperature=0.0)
                _, _, table, total = rollout.score(self.tokenizer, self.rewards, items, gens, 1)
                sums[:4] += (total.sum(), len(gens), sum(len(g.tokens) + g.stopped for g in gens),
                             sum(not g.stopped for g in gens))
                ok = ~np.isnan(table)
                sums[4::2] += np.where(ok, table, 0.0).sum(axis=0)
                sums[5::2] += ok.sum(axis=0)
                done += len(items)
                tokens += sum(len(g.tokens) for g in gens)
                if tick:
                    tick(done, tokens)
        finally:
            self.model.train()
        sums = np.array(w.sum_floats((sums * (1.0 if real else 0.0)).tolist()))
        count = max(sums[1], 1.0)
        reward = sums[0] / count
        metrics = {"reward": float(reward)}
        for j, name in enumerate(names):
            s, c = sums[4 + 2 * j], sums[5 + 2 * j]
            metrics[f"rewards/{name}/mean"] = float(s / c) if c else math.nan
        metrics["completions/mean_length"] = float(sums[2] / count)
        metrics["completions/clipped_ratio"] = float(sums[3] / count)
        return 0.0 - float(reward), metrics  # (not -0.0)

    def _report_val(self, val: float, metrics: dict) -> None:
        """The trainer's validation (best/ adapter, early stopping on the val event's
        loss, here minus the reward), with a progress line that names the reward."""
        pos = self.pos
        parts = "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items()
                          if k.startswith("rewards/"))
        self.progress.message(
            f"step {pos.step}/{self.total}  val reward {metrics['reward']:.4f}"
            f"{'  (' + parts + ')' if parts else ''}  length "
            f"{metrics['completions/mean_length']:.1f}  (best {-pos.best_val:.4f})")


def check(cfg, ranks: int, rewards, train: list, valid: list) -> None:
    """What a grpo run's prompts must give before it starts (one line naming the key or
    the file): rollout micro-batches that the ranks can share evenly, and reference answers
    for the rewards that compare with them (field_match, exact_match) in every split the
    run scores (data.train; data.valid when train.eval_every validates)."""
    n, b = len(train), cfg.train.batch_size
    if ranks > 1 and min(b, n) % ranks:
        raise DataError(f"{cfg.source}: data.train has {n} prompts, fewer than "
                        f"train.batch_size ({b}): a rollout batch of {n} prompts cannot be cut "
                        f"evenly among the {ranks} ranks; add prompts or use {n // ranks * ranks}"
                        " of them")
    splits = [("data.train", train)]
    if cfg.train.eval_every:
        splits.append(("data.valid", valid))
    from mlxtune.objectives.rewards import NEEDS_REFERENCE

    for e in rewards.entries:
        if e.fn not in NEEDS_REFERENCE:
            continue
        for split, prompts in splits:
            missing = [p for p in prompts if p.reference is None]
            if missing:
                raise DataError(
                    f"{missing[0].source}: {e.label} compares each completion with the "
                    f"prompt's reference answer, and {len(missing)} of the {len(prompts)} "
                    f"prompts of {split} have none (prompt-only records): give them their "
                    "answers (a last assistant turn, or \"completion\"), or drop the reward")


def without_reference(records: list, fmt: str) -> int:
    """How many records hold a prompt alone (no answer to compare with)."""
    if fmt == "chat":
        return sum(r.data["messages"][-1].get("role") != "assistant" for r in records)
    if fmt == "completions":
        return sum(r.data.get("completion") is None for r in records)
    return 0
