"""Evaluation: the tuned model against its untuned base, on a held-out split of the run.

One model is loaded; the base is that model with its LoRA layers switched off
(`adapters.set_enabled`), the tuned model the same with them on. The sides, in order:
`base` (zero-shot), `few_shot` (the base with `eval.shots` training examples as earlier
turns of each conversation: `few_shot`), `start` (a run that started from an adapter) and
`tuned`. For each side:

1. loss and perplexity over the loss-bearing tokens of the split: the same encoding
   (chat template, assistant-token mask, max_seq_len truncation) and the same per-token
   cross-entropy as the trainer's validation, token-weighted over the whole split;
2. greedy generation for the split's first `eval.examples` records (all by default): the
   prompt is everything before the last assistant turn, rendered with the chat template and
   its generation prompt, and decoding stops at an EOS / end-of-turn token;
3. metrics of the generations against the reference answers (see `metrics`), wall time,
   generated tokens per second and the prompt tokens a request spends.

Then the forgetting check (`forgetting`): the tuned model's loss on the base's own greedy
answers to a general-ability probe, against the base's, and the share of answers that
change. The report opens with a verdict (`report.verdict`): by how much the tuned adapter
beats few-shot prompting on the main metric, or that prompting comes within a margin.
Progress (examples done, tokens/s, ETA per side) goes to `status`, a line that a terminal
redraws in place.

`evaluate_run` writes eval.json, eval.md and eval_predictions.jsonl (every generation, base
and tuned) into the run directory, each atomically, and appends an `eval` event to
events.jsonl. With `eval.data` (another data file, e.g. a DPO run measured on its SFT
task data) the files are named after it: eval-NAME.json, eval-NAME.md,
eval-NAME_predictions.jsonl, so the run's own eval is kept. Bad input (no such split, no adapter, a bad schema file or
metric) is a one-line MlxtuneError raised before the model is loaded.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune import adapters, backend, data, models, objectives
from mlxtune.config import Config
from mlxtune.errors import ModelError
from mlxtune.evaluate import few_shot, forgetting, generate, preference, report
from mlxtune.evaluate.inputs import (adapter_dir, check, held_out,  # noqa: F401 (public here)
                                     load_run_config, prompt_and_reference, train_records)
from mlxtune.evaluate.metrics import Scorer

PAD_MULTIPLE = 32  # as the trainer pads, so eval losses equal validation losses
TICK_S = 5.0  # progress lines at most this often (and the last one of a side)


# ----------------------------------------------------------------------------- inputs
# (mlxtune.evaluate.inputs: the config, adapter, held-out records, prompts and references)


def stop_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------- measuring


def split_loss(model, examples: list[data.Example], batch_size: int, pad_id: int,
               chunk: int = 0, on_batch=None) -> tuple[float, int]:
    """(summed cross-entropy, loss-bearing tokens) over examples, as the trainer's
    validation computes it (objectives.sft over length-grouped, padded batches)."""
    rows = row_losses(model, examples, batch_size, pad_id, chunk, on_batch)
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def row_losses(model, examples: list[data.Example], batch_size: int, pad_id: int,
               chunk: int = 0, on_batch=None) -> list[tuple[float, int]]:
    """(summed cross-entropy, loss-bearing tokens) of each example, in the order given.
    `on_batch(examples done)` after each batch."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    done = 0
    for idx in data.batch_order([len(e.tokens) for e in examples], batch_size, 0, 0):
        tokens, mask = data.collate([examples[i] for i in idx], pad_id, PAD_MULTIPLE)
        losses, m = objectives.token_losses(model, tokens, mask, chunk=chunk)
        s, n = (losses * m).sum(axis=1), m.sum(axis=1)
        mx.eval(s, n)
        for i, si, ni in zip(idx, s.tolist(), n.tolist()):
            out[i] = (si, int(ni))
        done += len(idx)
        if on_batch is not None:
            on_batch(done)
    return out


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def teacher_forced(model, held, cfg: Config, pad_id: int, fmt: str,
                   on_batch=None) -> tuple[dict, object]:
    """The loss-type metrics of one side: (metrics, raw scores for preference pairs)."""
    if fmt == "preference":
        raw = preference.score_side(model, held, pad_id, cfg.train.batch_size,
                                    cfg.train.loss_chunk)
        return preference.side_metrics(raw, cfg.objective), raw
    loss_sum, ntok = split_loss(model, held, cfg.train.batch_size, pad_id, cfg.train.loss_chunk,
                                on_batch)
    loss = loss_sum / max(ntok, 1)
    return {"loss": loss, "perplexity": _perplexity(loss), "loss_tokens": ntok}, None


def measure_side(model, tokenizer, held, prompts, scorer: Scorer | None, cfg: Config,
                 pad_id: int, max_new_tokens: int, log,
                 fmt: str = "chat", status=None,
                 name: str = "") -> tuple[dict, object, list[str]]:
    """(metrics, raw pair scores or None, generated texts) of the model as it is set up.
    `status` gets a progress line per batch (examples done, tokens/s, ETA)."""
    start = time.perf_counter()
    out, raw = {}, None
    if held:
        out, raw = teacher_forced(model, held, cfg, pad_id, fmt,
                                  on_batch=ticker(status, f"{name} loss", len(held)))
        log(f"  loss {out['loss']:.4f} over {out['loss_tokens']} tokens "
            f"({time.perf_counter() - start:.0f} s)")
    texts: list[str] = []
    if prompts:
        gens, seconds = generate.greedy(model, prompts, stop_ids(tokenizer), max_new_tokens,
                                        cfg.eval.batch_size,
                                        on_batch=ticker(status, name, len(prompts), tokens=True))
        texts = [tokenizer.decode(g.tokens) for g in gens]
        steps = sum(g.steps for g in gens)
        out.update(scorer.score(texts))
        out["generated"] = len(gens)
        out["stopped"] = sum(g.stopped for g in gens) / len(gens)
        out["generated_tokens"] = steps
        out["generation_s"] = seconds
        out["tokens_per_sec"] = steps / max(seconds, 1e-9)
        out["prompt_tokens"] = sum(map(len, prompts)) / len(prompts)
        log(f"  generated {steps} tokens for {len(gens)} examples in {seconds:.0f} s "
            f"({out['tokens_per_sec']:.1f} tokens/s, {out['prompt_tokens']:.0f} prompt "
            "tokens a request)")
    out["wall_s"] = time.perf_counter() - start
    return out, raw, texts


def ticker(status, what: str, total: int, tokens: bool = False, clock=time.perf_counter):
    """A progress callback for generate.greedy (done, tokens, seconds) or row_losses
    (done): '  NAME: 48/179 examples, 612 tokens, 20.4 tokens/s, ETA 02:10'."""
    if status is None:
        return None
    t0 = clock()
    last = [-math.inf]

    def tick(done, steps=None, seconds=None):
        now = clock()
        if done < total and now - last[0] < TICK_S:
            return  # at most a line every TICK_S seconds, and the last one
        last[0] = now
        seconds = now - t0 if seconds is None else seconds
        eta = seconds / done * (total - done) if done else 0.0
        rate = (f", {steps} tokens, {steps / max(seconds, 1e-9):.1f} tokens/s"
                if tokens and steps is not None else "")
        status(f"  {what}: {done}/{total} examples{rate}, ETA {_duration(eta)}")
    return tick


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------- sides


@contextlib.contextmanager
def _adapter_off(model):
    adapters.set_enabled(model, False)
    try:
        yield model
    finally:
        adapters.set_enabled(model, True)


def load_adapters(model, cfg: Config, which: Path, log) -> bool:
    """Apply the run's adapter. A run that started from an adapter (model.adapter) also
    gets that one, as a frozen copy beside it (adapters.freeze_reference): the 'start'
    side. Returns whether there is a start side."""
    start = Path(cfg.model.adapter) if cfg.model.adapter else None
    if start is not None and not (start / adapters.ADAPTER_FILE).is_file():
        log(f"warning: the starting adapter {start} is gone; comparing base and tuned only")
        start = None
    if start is None:
        adapters.load(model, which)
        return False
    adapters.load(model, start)
    adapters.freeze_reference(model)
    weights = mx.load(str(which / adapters.ADAPTER_FILE))
    params = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in params or params[name].shape != w.shape:
            raise ModelError(f"{which}: adapter tensor {name} {tuple(w.shape)} does not fit "
                             f"the starting adapter {start} (another model or rank?)")
        weights[name] = w.astype(params[name].dtype)
    model.load_weights(list(weights.items()), strict=False)
    return True


def sides_of(model, has_start: bool, base: bool = True,
             shots: int = 0) -> list[tuple[str, str, object]]:
    """(name, description, context that sets the model up) in the order they run."""
    sides = [("base", "adapter off", _adapter_off(model))] if base else []
    if shots:
        sides.append(("few_shot", f"adapter off, {shots} training examples as earlier turns",
                      _adapter_off(model)))
    if has_start:
        sides.append(("start", "the adapter the run started from",
                      adapters.reference_pass(model)))
    sides.append(("tuned", "the run's adapter", contextlib.nullcontext(model)))
    return sides


# ----------------------------------------------------------------------------- the task


@dataclass
class Task:
    """A held-out split made ready for one tokenizer: what every side is measured on."""
    records: list            # the split's records
    fmt: str
    held: list               # encoded examples (pairs for preference data) for the loss
    truncated: int
    gen_records: list        # the records generated for (the first eval.examples)
    pairs: list              # (prompt ids, reference text, prompt text) per gen_record
    scorer: Scorer | None
    max_new: int

    @property
    def prompts(self) -> list[list[int]]:
        return [p[0] for p in self.pairs]

    @property
    def references(self) -> list[str]:
        return [p[1] for p in self.pairs]


def prepare_task(cfg: Config, records, fmt: str, tok, schema=None, metric=None,
                 limit: int | None = None, log=lambda _m: None) -> Task:
    """Encode the split for the loss and its first `limit` prompts for generation."""
    if fmt == "preference":
        from mlxtune.data.preference import encode_pairs

        encoded = encode_pairs(records, tok, cfg.data.max_seq_len)
        held, truncated = encoded.pairs, encoded.n_truncated
    else:
        encoded = data.encode(records, tok, cfg.data.max_seq_len, cfg.data.mask_prompt, fmt,
                              cfg.data.mask_history)
        held, truncated = encoded.examples, encoded.n_truncated
    n_gen = len(records) if limit is None else min(limit, len(records))
    gen_records = list(records[:n_gen])
    pairs = [prompt_and_reference(r, fmt, tok) for r in gen_records]
    if any(p is None for p in pairs):  # text data: nothing to answer
        gen_records, pairs = [], []
    references = [p[1] for p in pairs]
    scorer = Scorer(references, schema, metric) if pairs else None
    if scorer is not None and scorer.ref_schema_failures:
        log(f"warning: {scorer.ref_schema_failures} of {len(references)} reference answers "
            f"do not match {cfg.eval.schema}")
    max_new = cfg.eval.max_new_tokens or _auto_max_new_tokens(tok, references)
    return Task(list(records), fmt, held, truncated, gen_records, pairs, scorer, max_new)


def few_shot_inputs(cfg: Config, task: Task, tok, model_config: dict, shots: int,
                    train: tuple[list, str] | None = None) -> tuple[list, list, dict] | None:
    """(loss examples, prompts, facts) of the few-shot side: every record of the split
    with `shots` nearest training examples before it, fitted to the model's context (see
    few_shot). None for text data (nothing to answer)."""
    if task.fmt == "text" or not task.records:
        return None
    train_recs, train_fmt = train if train is not None else train_records(cfg)
    if not train_recs:  # a grpo run's prompts without answers: no shots to show
        return None
    context = few_shot.model_context(model_config, tok)
    builder = few_shot.Builder(tok, train_recs, train_fmt, shots, context, task.max_new,
                               cfg.data.mask_history)
    # Preference pairs keep their own loss (pairs); the few-shot side generates only.
    for_loss = task.fmt != "preference"
    targets = task.records if for_loss else task.gen_records
    built = [builder.build(r, task.fmt) for r in targets]
    by_record = {id(r): b for r, b in zip(targets, built)}
    examples = [b.example for b in built if b.example is not None] if for_loss else []
    gens = [by_record[id(r)] for r in task.gen_records]
    prompts = [b.prompt for b in gens]
    used = [len(b.shots) for b in gens] or [len(b.shots) for b in built]
    facts = {"shots": shots, "selection": few_shot.SELECTION, "context": context,
             "train_examples": len(train_recs),
             "shots_per_request": sum(used) / len(used) if used else 0.0,
             "requests_with_fewer_shots": sum(u < shots for u in used),
             "shot_sources": [[train_recs[i].source for i in b.shots] for b in gens]}
    return examples, prompts, facts


# ----------------------------------------------------------------------------- forgetting


def forgetting_check(model, tok, cfg: Config, pad_id: int, log, status=None) -> dict:
    """The forgetting check (mlxtune.evaluate.forgetting) of the model's adapter against
    its base: the base's greedy answers to the probe as the reference. The model is left
    with its adapter on."""
    probe = forgetting.load(cfg.eval.general)
    prompts = forgetting.prompts(probe, tok)
    stops = stop_ids(tok)
    n, batch, max_new = len(prompts), cfg.eval.batch_size, forgetting.MAX_NEW_TOKENS
    start = time.perf_counter()
    log(f"forgetting check: {n} prompts ({probe.source}), base answers as the reference")
    with _adapter_off(model):
        base_gens, _ = generate.greedy(model, prompts, stops, max_new, batch,
                                       on_batch=ticker(status, "probe, base", n, tokens=True))
        stop_id = getattr(tok, "eos_token_id", None)
        stop_id = stop_id if stop_id is not None else next(iter(stops), None)
        examples = forgetting.answer_examples(prompts, [g.tokens for g in base_gens],
                                              [g.stopped for g in base_gens], stop_id)
        base_rows = row_losses(model, examples, cfg.train.batch_size, pad_id,
                               cfg.train.loss_chunk)
    tuned_gens, _ = generate.greedy(model, prompts, stops, max_new, batch,
                                    on_batch=ticker(status, "probe, tuned", n, tokens=True))
    tuned_rows = row_losses(model, examples, cfg.train.batch_size, pad_id, cfg.train.loss_chunk)
    # Per prompt (prompts whose base answer is empty have no example).
    index = {int(e.source.split(":")[1]): j for j, e in enumerate(examples)}
    base_nll = [base_rows[index[i]] if i in index else (0.0, 0) for i in range(n)]
    tuned_nll = [tuned_rows[index[i]] if i in index else (0.0, 0) for i in range(n)]
    changed = [b.tokens != t.tokens for b, t in zip(base_gens, tuned_gens)]
    out = {"probe": probe.source, "max_new_tokens": max_new,
           **forgetting.summarise(probe, base_nll, tuned_nll, changed),
           "wall_s": time.perf_counter() - start}
    out["answers"] = [{"id": probe.ids[i], "category": probe.categories[i],
                       "prompt": probe.messages[i][-1]["content"],
                       "base": tok.decode(base_gens[i].tokens),
                       "tuned": tok.decode(tuned_gens[i].tokens), "changed": changed[i]}
                      for i in range(n)]
    log(f"  {100 * out['changed']:.0f}% of answers changed; "
        f"{out['added_nats_per_token']:+.4f} nats per token on the base's answers "
        f"({out['wall_s']:.0f} s)" if out["added_nats_per_token"] is not None else
        f"  {100 * out['changed']:.0f}% of answers changed")
    return out


# ----------------------------------------------------------------------------- the flow


def evaluate_run(run_dir: Path, overrides: dict | None = None,
                 log: Callable[[str], None] = lambda _msg: None,
                 cfg: Config | None = None, status: Callable[[str], None] | None = None) -> dict:
    """Evaluate a run directory's adapter against its base, its base with few-shot
    prompts (and the adapter it started from, if any), and run the forgetting check;
    write eval.json, eval.md and eval_predictions.jsonl. The run's config is read from
    the run directory unless given (`mlxtune run` passes its own, which may differ in
    eval.* keys after a resume). `status` gets progress lines (redrawn on a terminal)."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir, overrides)
    ev = cfg.eval
    schema, metric = check(cfg)
    which = adapter_dir(run_dir, ev.adapter)
    records, fmt = held_out(cfg, ev.split)
    shots = ev.shots if fmt != "text" else 0
    train = train_records(cfg) if shots else None

    log(f"eval: {ev.split} split of {ev.data or run_dir} ({len(records)} examples), "
        f"adapter {which.name}/")
    loaded = models.load(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    dtype = backend.compute_dtype(cfg.model.dtype)
    dense = generate.should_densify(model, ev.dense_base, dtype)
    if dense:
        generate.densify(model, dtype)
    has_start = load_adapters(model, cfg, which, log)
    model.eval()

    task = prepare_task(cfg, records, fmt, tok, schema, metric, ev.examples, log)
    inputs = {"base": (task.held, task.prompts), "start": (task.held, task.prompts),
              "tuned": (task.held, task.prompts)}
    few = None
    if shots:
        few = few_shot_inputs(cfg, task, tok, loaded.config, shots, train)
        if few is not None:
            inputs["few_shot"] = few[:2]
            log(f"few-shot: {shots} nearest training examples per request "
                f"({few[2]['shots_per_request']:.2f} on average after fitting the "
                f"{few[2]['context']}-token context)")
        else:
            shots = 0

    sides, raw, outputs = {}, {}, {}
    pad_id = _pad_id(tok)
    for name, what, setup in sides_of(model, has_start, ev.base, shots):
        log(f"{name} ({what}):")
        held, prompts = inputs[name]
        side_fmt = "chat" if name == "few_shot" and fmt == "preference" else fmt
        with setup:
            sides[name], raw[name], outputs[name] = measure_side(
                model, tok, held, prompts, task.scorer, cfg, pad_id, task.max_new, log,
                side_fmt, status, name)
    if few is not None and "few_shot" in sides:
        sides["few_shot"]["shots"] = few[2]["shots_per_request"]
    reference_side = "start" if has_start else "base"
    if (cfg.objective.type == "dpo" and fmt == "preference" and task.held
            and reference_side in raw):
        sides["tuned"].update(preference.dpo_rewards(raw["tuned"], raw[reference_side],
                                                     cfg.objective))
    forgot = forgetting_check(model, tok, cfg, pad_id, log, status) if ev.forgetting else None

    names = list(sides)
    predictions = [{"source": r.source, "prompt": p[2], "reference": p[1],
                    **{n: outputs[n][i] for n in names}}
                   for i, (r, p) in enumerate(zip(task.gen_records, task.pairs))]
    if few is not None:
        for p, used in zip(predictions, few[2]["shot_sources"]):
            p["shots"] = used
    result = {
        "run_dir": str(run_dir),
        "split": ev.split,
        "data": ev.data,
        "adapter": str(which),
        "start_adapter": cfg.model.adapter if has_start else None,
        "format": fmt,
        "objective": cfg.objective.type,
        "split_examples": len(records),
        "loss_examples": len(task.held),
        "truncated": task.truncated,
        "generated_examples": len(task.pairs),
        "max_new_tokens": task.max_new if task.pairs else None,
        "schema": ev.schema,
        "metric_name": ev.metric,
        "dense_base": dense,
        "backend": backend.name(),
        "profile": backend.profile(),
        "compute_dtype": backend.dtype_name(dtype),
        "time": round(time.time(), 3),
    }
    if few is not None:
        result["few_shot_setup"] = {k: v for k, v in few[2].items() if k != "shot_sources"}
    result.update(sides)
    if forgot is not None:
        result["forgetting"] = {k: v for k, v in forgot.items() if k != "answers"}
    result.update(report.verdict_fields(result))
    result["examples"] = [{k: v for k, v in p.items() if k != "shots"}
                          for p in predictions[:ev.show]]
    report.write(run_dir, result, [{k: v for k, v in p.items() if k != "prompt"}
                                   for p in predictions], name=report.file_stem(ev.data),
                 general=forgot["answers"] if forgot is not None else None)
    return result


def _auto_max_new_tokens(tokenizer, references: list[str]) -> int:
    """Twice the longest reference plus 16: room for any answer that could match."""
    longest = max((len(tokenizer.encode(r, add_special_tokens=False)) for r in references),
                  default=0)
    return 2 * longest + 16


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
