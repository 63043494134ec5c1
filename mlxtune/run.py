"""One run, in the order of the flow: config -> data -> model -> adapter -> trainer.

Everything that can fail on bad input (config, data files, model, tokenization) is
checked before the run directory is created, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import mlx.core as mx

from mlxtune import (adapters, attention, backend, config, data, models, native, objectives,
                     quant)
from mlxtune.config import Config, EvalConfig, dump
from mlxtune.data.batcher import training_batches
from mlxtune.data.preference import encode_pairs
from mlxtune.errors import ConfigError, DataError
from mlxtune.quant import kernel_check
from mlxtune.train import checkpoint, distributed, tracking
from mlxtune.train.events import EventWriter, read_events
from mlxtune.train.loop import PAD_MULTIPLE, Result, Trainer
from mlxtune.train.progress import Progress

CONFIG_FILE = "config.yaml"
# Keys a resumed run may change: how long it runs and how often it reports.
RESUMABLE_CHANGES = {"train.iters", "train.epochs", "train.eval_every", "train.save_every",
                     "train.log_every", "train.keep_checkpoints", "train.val_batches",
                     "train.early_stopping.patience", "train.early_stopping.min_delta",
                     "train.report_to"}
# Evaluation settings never change what trains.
RESUMABLE_CHANGES |= {f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)}
# The reference log-probs are the same computed once or per step.
RESUMABLE_CHANGES |= {"objective.precompute_reference"}


def default_run_dir(cfg: Config, runs_root: Path = Path("runs")) -> Path:
    return runs_root / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run_dir(cfg: Config, runs_root: Path = Path("runs")) -> Path | None:
    found = sorted(p for p in runs_root.glob(f"{cfg.name}-*") if (p / CONFIG_FILE).exists())
    return found[-1] if found else None



def _check_resumable(cfg: Config, run_dir: Path) -> None:
    import yaml

    saved = config.flatten(yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {})
    now = config.flatten(cfg.to_dict())
    changed = sorted(k for k in set(saved) | set(now)
                     if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: cannot resume with a different "
                          f"configuration: {', '.join(changed)} changed")


def _encode(split: str, records, fmt, tokenizer, cfg: Config, progress: Progress):
    if cfg.objective.type == "grpo":  # prompts to sample completions for
        from mlxtune.objectives.rollout import encode_prompts

        enc = encode_prompts(records, fmt, tokenizer, cfg.data.max_seq_len,
                             cfg.objective.max_completion_tokens)
        if enc.n_truncated:
            progress.message(f"{split}: {enc.n_truncated} of {len(records)} prompts left out: "
                             "longer than data.max_seq_len - objective.max_completion_tokens")
        return enc
    if fmt == "preference":
        enc = encode_pairs(records, tokenizer, cfg.data.max_seq_len)
        what = "pairs"
    else:
        enc = data.encode(records, tokenizer, cfg.data.max_seq_len, cfg.data.mask_prompt, fmt,
                          cfg.data.mask_history)
        what = "examples"
    if enc.n_truncated or enc.n_dropped:
        progress.message(f"{split}: {enc.n_truncated} of {len(records)} {what} truncated to "
                         f"data.max_seq_len={cfg.data.max_seq_len}; {enc.n_dropped} dropped "
                         "(no loss-bearing token left)")
    return enc


def _check_objective_data(cfg: Config, fmt: str, where: str) -> None:
    """Preference objectives train on preference pairs, and only they do."""
    kind = cfg.objective.type
    if (kind in objectives.PREFERENCE) != (fmt == "preference"):
        if fmt == "preference":
            raise DataError(f"{where}: this is preference data (prompt/chosen/rejected), which "
                            f"objective.type {kind} does not train on; set objective.type to "
                            "dpo, orpo or simpo")
        raise DataError(f"{where}: objective.type {kind} trains on preference pairs "
                        "(\"prompt\", \"chosen\", \"rejected\"), but this file is "
                        f"{fmt} data")
    if fmt == "preference" and cfg.data.packing is True:
        raise ConfigError(f"{cfg.source}: data.packing: preference pairs are not packed "
                          "(set it to auto or false)")


def _where(cfg: Config, run_dir: Path | None, resume: bool) -> tuple[Path, Path | None]:
    """(the run directory, the checkpoint to resume from)."""
    if resume:
        run_dir = Path(run_dir) if run_dir else latest_run_dir(cfg)
        if run_dir is None or not (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"--resume: no run directory to resume "
                              f"({run_dir or 'runs/' + cfg.name + '-*'} has no {CONFIG_FILE})")
        resume_from = checkpoint.latest(run_dir / "checkpoints")
        if resume_from is None:
            raise ConfigError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        _check_resumable(cfg, run_dir)
    else:
        run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"--run-dir: {run_dir} already exists and is not empty (use "
                              "--resume to continue it, or another --run-dir)")
        resume_from = None
    return run_dir, resume_from


def _dense_for_rollouts(cfg: Config, model, progress: Progress) -> None:
    """GRPO decodes a token at a time; on the CPU profile a quantized base would be
    dequantized at every product of every step. objective.dense_base (auto there) swaps
    in the dequantized weights once: the same function, one copy of the base (the
    planner counts it dense)."""
    from mlxtune.evaluate import generate

    dtype = backend.compute_dtype(cfg.model.dtype)
    if generate.should_densify(model, cfg.objective.dense_base, dtype):
        gb = generate.dense_bytes(model, dtype) / 1e9
        n = generate.densify(model, dtype)
        progress.message(f"grpo: the quantized base computes dequantized ({n} layers, "
                         f"{gb:.2f} GB; objective.dense_base: {cfg.objective.dense_base})")


@distributed.preflight()
def run(cfg: Config, run_dir: Path | None = None, resume: bool = False,
        quiet: bool = False, evaluate: bool = True,
        memory_check: bool = True) -> tuple[Path, Result]:
    """Train; then, unless `evaluate` is false or eval.auto is off, evaluate base vs tuned
    on the held-out split (eval.split) when it has examples. Unless `memory_check` is
    false, a configuration the memory planner predicts not to fit this machine is refused
    before anything is loaded (mlxtune.memory.guard), and MLX's memory limit is set to
    what the planner counts as usable here.

    Under mlx.launch every rank calls this (mlxtune.train.distributed): rank 0 decides
    the run directory and alone writes to it; the ranks check their inputs together."""
    world = distributed.world()
    progress = Progress(quiet=quiet or not world.main)
    evaluate = evaluate and world.main  # rank 0 evaluates (eval.* is its business alone)

    # Where the run goes; decided first, created last.
    if world.main:
        tracking.check(cfg.train.report_to)  # a tracker's missing package: one line, now
        run_dir, resume_from = _where(cfg, run_dir, resume)
        if resume_from is not None:
            distributed.check_resume(resume_from, world)
    else:
        resume_from = None  # rank 0 reads the checkpoint and hands its state over
    run_dir = Path(world.agree(lambda: distributed.config_items(cfg), cfg.source, str(run_dir)))
    distributed.check_batch_size(cfg, world)
    plan = _memory_plan(cfg, world.size, memory_check)

    # Until every input has been checked, messages are held back: bad input gets one line.
    progress.hold()
    grpo = cfg.objective.type == "grpo"  # reads prompts: answers are optional references
    splits, fmt = data.load_splits(cfg.data, cfg.train.seed, prompts=grpo)
    _check_objective_data(cfg, fmt, splits["train"][0].source.rpartition(":")[0])
    progress.message(f"data: {len(splits['train'])} train, {len(splits['valid'])} valid, "
                     f"{len(splits['test'])} test examples ({fmt})")
    from mlxtune.datacheck import note_leakage  # `mlxtune data`'s cheap part: one line
    note_leakage(cfg, splits, fmt, progress.message)
    loaded = models.load(cfg.model)
    progress.message(f"model: {cfg.model.path} ({loaded.source.kind})")
    if plan is not None:
        progress.message(f"memory: planned peak {plan.peak_gb:.2f} GB per rank of "
                         f"{plan.machine.usable_gb:.1f} GB usable here ({plan.verdict})")
    train_set = _encode("train", splits["train"], fmt, loaded.tokenizer, cfg, progress)
    valid_set = _encode("valid", splits["valid"], fmt, loaded.tokenizer, cfg, progress)
    evaluate = evaluate and cfg.eval.auto and bool(splits[cfg.eval.split])
    if evaluate:
        from mlxtune.evaluate import check as check_eval

        check_eval(cfg)  # a bad schema file or metric fails now, not after training
    if grpo:  # reward files and functions load now, before anything is written
        from mlxtune.objectives import rewards as grpo_rewards
        from mlxtune.train import grpo_loop

        rewards = grpo_rewards.build(cfg.objective.rewards, cfg.source)
        grpo_loop.check(cfg, world.size, rewards, train_set.examples, valid_set.examples)
        missing = grpo_loop.without_reference(splits[cfg.eval.split], fmt) if evaluate else 0
        if missing:  # eval compares generations with the held-out answers
            progress.message(f"eval: skipped after training: {missing} of the "
                             f"{len(splits[cfg.eval.split])} {cfg.eval.split} prompts have no "
                             "reference answer to compare with")
            evaluate = False
    if not train_set.examples:
        raise DataError(f"{cfg.data.train or cfg.data.path}: no training example has a "
                        "loss-bearing token within data.max_seq_len")

    model = loaded.model
    if grpo:
        _dense_for_rollouts(cfg, model, progress)
    mx.random.seed(cfg.train.seed)  # LoRA initialisation
    if cfg.model.adapter:
        adapter_config = adapters.load(model, Path(cfg.model.adapter))
    else:
        adapter_config = adapters.apply_lora(model, cfg.adapter)
    progress.message(adapters.describe(model, adapter_config))
    if cfg.objective.type in objectives.WITH_REFERENCE or (grpo and cfg.objective.beta):
        if cfg.model.adapter:  # the reference: base + the starting adapter, frozen
            adapters.freeze_reference(model)
            progress.message(f"reference: the base with a frozen copy of {cfg.model.adapter}")
        else:
            progress.message("reference: the base (the adapter switched off)")
    adapter_config["base_model"] = cfg.model.path
    trainable, total = adapters.parameter_counts(model)
    batches = grpo_loop.PromptBatcher(
        train_set.examples, cfg.train.batch_size, cfg.train.seed,
        cfg.objective.group_size) if grpo else training_batches(
        train_set.examples, fmt == "preference", cfg.data, cfg.train, _pad_id(loaded.tokenizer),
        PAD_MULTIPLE, loaded.config,
        attention.skips_other_examples(model, backend.compute_dtype(cfg.model.dtype)))
    world.agree(lambda: distributed.run_items(train_set.examples, valid_set.examples, loaded,
                                              model, cfg.model.adapter, batches.layout),
                cfg.source, last=True)

    progress.release()
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / CONFIG_FILE).write_text(dump(cfg))
    events = EventWriter(run_dir, enabled=world.main)
    try:
        info = backend.device_info()
        dtype = backend.dtype_name(backend.compute_dtype(cfg.model.dtype))
        # Our kernels' first-use self-checks (Metal/CUDA): run before step 1, recorded here.
        kernel_checks = kernel_check.self_check_summary(quant.own_formats(model), dtype)
        cpu_kernels = native.status_line()
        events.emit("start", config=cfg.to_dict(), trainable_params=trainable,
                    total_params=total, backend=info["backend"], blas=info["blas"],
                    profile=info["profile"], compute_dtype=dtype, kernels=kernel_checks,
                    cpu_kernels=cpu_kernels.removeprefix("CPU kernels: "),
                    planned_peak_gb=None if plan is None else round(plan.peak_gb, 3),
                    model_source=dataclasses.asdict(loaded.source),
                    train_examples=len(train_set.examples),
                    valid_examples=len(valid_set.examples),
                    truncated=train_set.n_truncated + valid_set.n_truncated,
                    resumed_from=str(resume_from) if resume_from else None,
                    packing=batches.packed, batches=batches.layout,
                    ranks=world.size)
        progress.message(f"run: {run_dir}  ({trainable:,} trainable of {total:,} parameters, "
                         f"{info['backend']}, {info['blas']}, {info['profile']} profile, "
                         f"{dtype})")
        progress.message(cpu_kernels)  # which CPU kernels run, and why (a failed build too)
        trainer = (partial(grpo_loop.GRPOTrainer, tokenizer=loaded.tokenizer, rewards=rewards)
                   if grpo else Trainer)(
            model, adapter_config, cfg, train_set.examples, valid_set.examples,
            run_dir, events, progress, pad_id=_pad_id(loaded.tokenizer),
            batches=batches, world=world)
        progress.message(trainer.batches.describe())
        if world.size > 1:
            progress.message(f"data parallel: {world.size} ranks, "
                             f"{cfg.train.batch_size // world.size} of each batch per rank")
        backend.reset_peak_memory()  # train events report the training peak, as planned
        result = trainer.run(resume_from)
    finally:
        events.close()
    if evaluate and result.reason in ("done", "early_stopping"):
        from mlxtune.evaluate import evaluate_run, report

        del trainer, model, loaded  # the evaluation loads the model afresh
        progress.message(report.table(evaluate_run(run_dir, log=progress.message, cfg=cfg,
                                                   status=progress.status)))
    return run_dir, result


def _memory_plan(cfg: Config, ranks: int, check: bool):
    """The planner's fit for this machine (mlxtune.memory.Fit, per rank), after refusing
    a configuration predicted not to fit unless `check` is false; sets MLX's memory limit
    to the usable memory. None when the planner cannot tell: it never blocks a run it
    cannot plan (the loader then reports what is wrong with the model, if anything)."""
    from mlxtune import memory

    try:
        here = memory.guard(cfg, ranks, hints=check)
    except memory.MemoryPlanError:
        if check:
            raise  # one line, nothing written
        here = None
    except Exception:  # noqa: BLE001  (the planner is advice here, never a blocker)
        return None
    if here is None:
        here = memory.fit(cfg, memory.tiers_mod.this_machine(),
                          memory.resolve_shape(cfg.model), ranks, with_hints=False)
    mx.set_memory_limit(here.machine.usable_bytes)
    return here


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def run_status(run_dir: Path) -> dict:
    """A summary of a run directory from its events (for the CLI and the TUI)."""
    events = read_events(run_dir)
    stops = [e for e in events if e["event"] == "stop"]
    trains = [e for e in events if e["event"] == "train"]
    vals = [e for e in events if e["event"] == "val"]
    return {
        "run_dir": str(run_dir),
        "status": stops[-1]["reason"] if stops else ("running" if events else "empty"),
        "step": trains[-1]["step"] if trains else 0,
        "last_loss": trains[-1]["loss"] if trains else None,
        "best_val": min((v["loss"] for v in vals), default=None),
    }
