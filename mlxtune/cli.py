"""The `mlxtune` command (DESIGN.md section 3, CLI).

On bad input every command prints one line naming what is wrong and where, exits non-zero
and leaves nothing half-written; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import traceback

import click

import mlxtune  # noqa: F401  (preloads OpenBLAS before anything imports mlx.core)
from mlxtune.errors import ConfigError, MlxtuneError

_SET_HELP = "Override a config key: --set train.iters=50 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(mlxtune.__version__, prog_name="mlxtune")
def cli(debug: bool) -> None:
    """Fine-tune language models with LoRA / QLoRA on MLX."""


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Where the run goes (default: runs/NAME-TIMESTAMP).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --run-dir (or the latest runs/NAME-*) from its last "
                   "checkpoint.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; the run directory "
              "path is still printed at the end.")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation against the base model "
              "that follows training when there is a held-out split.")
@click.option("--ignore-memory-plan", is_flag=True, help="Train even when the memory planner "
              "predicts the step will not fit this machine (see mlxtune plan).")
def run(config_path, overrides, run_dir, resume, quiet, no_eval, ignore_memory_plan):
    """Train as CONFIG says; write a run directory.

    Data-parallel over several processes or Macs: start it with mlx.launch (README,
    "Several ranks"); every rank runs this command, rank 0 writes the run directory."""
    from mlxtune import config
    from mlxtune.run import run as run_training
    from mlxtune.train import distributed

    with distributed.preflight() as world:  # a bad config on one rank stops every rank
        cfg = config.load(config_path, list(overrides))
        run_dir, result = run_training(cfg, run_dir, resume=resume, quiet=quiet,
                                       evaluate=not no_eval,
                                       memory_check=not ignore_memory_plan)
    if not world.main:
        sys.exit(130 if result.reason == "interrupted" else 0)
    if not quiet:
        best = ""
        if result.best_val is not None:  # grpo's val loss is minus its validation reward
            best = (f", best val reward {0.0 - result.best_val:.4f}"
                    if cfg.objective.type == "grpo" else f", best val loss {result.best_val:.4f}")
        click.echo(f"{result.reason}: step {result.step}{best}", err=True)
    click.echo(str(run_dir))
    if result.reason == "interrupted":
        sys.exit(130)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--kernels", "run_kernels", is_flag=True,
              help="Run every quantized-kernel self-check (format x op x dtype x variant) "
                   "and print a table; exit status 1 if any fails. Without a GPU, each "
                   "kernel's source runs through the C++ shim of a source checkout.")
def doctor(as_json, run_kernels):
    """Backend, device, BLAS, memory and versions."""
    from mlxtune import doctor as doc

    notes, records = [], []
    if run_kernels:
        notes, records = doc.check_kernels(
            log=None if as_json else (lambda m: click.echo(m, err=True)))
    info = doc.report()
    if as_json:
        if run_kernels:
            info["kernel checks"] = notes
            info["kernels"] = records
        click.echo(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            click.echo(f"{k:<{width}}  {v}")
        if run_kernels:
            click.echo("")
            for note in notes:
                click.echo(note)
            click.echo("")
            for line in doc.kernel_table(records):
                click.echo(line)
    if any(r["status"] in ("mismatch", "error") for r in records):
        sys.exit(1)


@cli.command("eval")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "valid"]),
              help="Held-out split to evaluate on (default: eval.split, test).")
@click.option("--adapter", type=click.Choice(["best", "final"]),
              help="best/ (when it exists) or the final adapters/ (default: eval.adapter).")
@click.option("--limit", type=click.IntRange(min=0), metavar="N",
              help="Generate for the split's first N examples only (loss: whole split).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), metavar="N")
@click.option("--schema", type=click.Path(dir_okay=False), help="JSON Schema file.")
@click.option("--metric", metavar="MODULE:FUNCTION",
              help="User metric function(prediction, reference) -> float.")
@click.option("--data", "data_file", type=click.Path(dir_okay=False),
              help="Evaluate on another data file (its held-out split under the run's "
                   "data.split; generation for all of it unless --limit); writes "
                   "eval-NAME.json etc. beside the run's own eval.")
@click.option("--no-base", is_flag=True,
              help="Skip the base side (adapters off), the slowest to decode.")
@click.option("--shots", type=click.IntRange(min=0), metavar="K",
              help="The few-shot side: the base with K training examples as earlier turns "
                   "(default: eval.shots, 3; 0 skips it).")
@click.option("--general", type=click.Path(dir_okay=False), metavar="FILE",
              help="The forgetting check's prompts (JSONL of {\"prompt\": ...}); default: "
                   "eval.general, else the probe shipped with mlxtune.")
@click.option("--no-forgetting", is_flag=True, help="Skip the forgetting check.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def eval_command(run_dir, split, adapter, limit, max_new_tokens, schema, metric, data_file,
                 no_base, shots, general, no_forgetting, as_json, quiet):
    """Base, few-shot base and tuned on a held-out split, and the forgetting check;
    writes eval.json and eval.md (opening with the verdict) into RUN_DIR."""
    from pathlib import Path

    from mlxtune.evaluate import evaluate_run, report
    from mlxtune.train.progress import Progress

    if metric and ".py:" in metric:  # a file path is relative to the working directory
        file, _, func = metric.rpartition(":")
        metric = f"{Path(file).resolve()}:{func}"
    overrides = {"split": split, "adapter": adapter, "examples": limit,
                 "max_new_tokens": max_new_tokens, "metric": metric,
                 "schema": str(Path(schema).resolve()) if schema else None,
                 "data": str(Path(data_file).resolve()) if data_file else None,
                 "base": False if no_base else None, "shots": shots,
                 "general": str(Path(general).resolve()) if general else None,
                 "forgetting": False if no_forgetting else None}
    progress = Progress(quiet=quiet)
    try:
        result = evaluate_run(Path(run_dir), overrides, log=progress.message,
                              status=progress.status)
    finally:
        progress.close()
    click.echo(report.to_json(result) if as_json else report.table(result))


@cli.command("export")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("--to", "to", required=True, metavar="FORMAT",
              help="gguf | peft | mlx-fused | gguf-fused | ollama | hub")
@click.option("--out", type=click.Path(), help="Output file or folder "
              "(default: RUN_DIR/export/...).")
@click.option("--adapter", default="auto", metavar="best|final",
              help="best/ (the best validation loss) or adapters/ (the last step); "
                   "default: best/ when the run has one.")
@click.option("--outtype", metavar="TYPE", help="gguf: f32|f16; gguf-fused: f16|q8_0|f32; "
              "mlx-fused: f16|bf16|f32|q8|q4; hub (its GGUF adapter): f16|f32.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--push", metavar="REPO_ID", help="hub: upload the folder to this Hugging Face "
              "repository (one commit; needs a token: hf auth login or HF_TOKEN).")
@click.option("--private", is_flag=True, help="hub --push: create the repository private.")
def export_command(run_dir, to, out, adapter, outtype, force, push, private):
    """Export RUN_DIR's adapter for llama.cpp / Ollama / PEFT / mlx-lm, or as a folder for
    the Hugging Face Hub (--to hub, with a model card; --push uploads it); prints the
    path."""
    from mlxtune.export import export

    result = export(run_dir, to, out, adapter=adapter, force=force, outtype=outtype,
                    push=push, private=private)
    click.echo(f"{to}{f' ({result.outtype})' if result.outtype else ''} from "
               f"{result.adapter_dir}{f'; {result.note}' if result.note else ''}", err=True)
    click.echo(str(result.path))


@cli.command("tui")
@click.argument("target", metavar="[CONFIG | RUN_DIR]", required=False,
                type=click.Path(exists=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--runs", "runs_root", default="runs", show_default=True,
              type=click.Path(file_okay=False), help="The runs folder (runs view, new runs).")
def tui_command(target, overrides, runs_root):
    """The terminal UI: plan a config, train with live curves, compare runs."""
    from mlxtune.tui import main as tui_main

    tui_main(target, runs_root, list(overrides))


@cli.command("plan")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes: memory is planned per rank, each with "
                   "train.batch_size / ranks of every batch.")
@click.option("--attention", type=click.Choice(["materialised", "fused"]),
              default="materialised", show_default=True,
              help="How attention's backward pass is computed: MLX's composed attention "
                   "keeps the scores; 'fused' plans for a kernel that keeps none.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (peak_gb, breakdown, "
              "tiers, ...).")
def plan_command(config_path, overrides, ranks, attention, as_json):
    """Predicted peak memory of a training step, per item, and whether it fits a 32, 64 or
    128 GB Mac and this machine; loads no weights."""
    from mlxtune import config, memory
    from mlxtune.memory.report import text

    cfg = config.load(config_path, list(overrides))
    result = memory.plan(cfg, ranks=ranks, attention=attention)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else text(result))


def _check_profile() -> None:
    """A bad MLXTUNE_PROFILE stops every command before anything runs."""
    from mlxtune import backend

    try:
        backend.profile()
    except ValueError as e:
        raise ConfigError(str(e)) from None


@cli.command("data")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (splits, duplicates, "
              "leakage, conflicts, ...).")
@click.option("--fix", "fix_dir", type=click.Path(file_okay=False), metavar="OUT_DIR",
              help="Write a cleaned copy (train without copies of held-out examples or "
                   "exact duplicates) and OUT_DIR/config.yaml training on it; OUT_DIR must "
                   "be new or empty.")
def data_command(config_path, overrides, as_json, fix_dir):
    """Leakage, duplicates, conflicts and truncation in the data CONFIG trains on (same
    files, split, template and max_seq_len as a run). Exit 0 when clean, 1 when it finds
    leakage, conflicts or empty answers, 2 on bad input."""
    from mlxtune import config
    from mlxtune.datacheck import check
    from mlxtune.datacheck.fix import fix
    from mlxtune.datacheck.report import text

    cfg = config.load(config_path, list(overrides))
    say = (lambda m: click.echo(f"mlxtune data: {m}", err=True)) \
        if sys.stderr.isatty() and not as_json else None
    result = check(cfg, progress=say)
    if fix_dir:
        result.data["fix"] = fix(result, cfg, fix_dir)
    if as_json:
        click.echo(json.dumps(result.data, indent=2, ensure_ascii=False))
    else:
        click.echo(text(result.data))
        if fix_dir:
            done = result.data["fix"]
            kept = ", ".join(f"{n:,} {s}" for s, n in done["written"].items())
            gone = ", ".join(f"{n:,} {why.replace('_', ' ')}"
                             for why, n in done["dropped"].items() if n) or "nothing"
            click.echo(f"--fix: {kept} written to {done['out_dir']} (dropped: {gone}); "
                       f"train on it with: mlxtune run {done['config']}")
    sys.exit(result.exit_code)


@cli.command("compare")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--models", "candidates", multiple=True, required=True, metavar="A B ...",
              help="Candidate bases: packaged names, hub ids in the local cache, mlx-lm "
                   "folders, .gguf files (the list ends at the next option).")
@click.option("--shots", "shots", multiple=True, type=click.IntRange(min=0),
              metavar="K ...", help="Few-shot settings to measure the base with "
              "(default: 0 and eval.shots).")
@click.option("--train-steps", type=click.IntRange(min=0), default=0, metavar="N",
              help="A pilot LoRA run of N steps per candidate, measured zero-shot.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="The held-out split's first N examples only (loss and generation).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--usable-gb", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="This machine's usable memory for the planner (default: what MLX "
                   "reports).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where compare.json, compare.md and pilot runs go "
                   "(default: runs/compare-NAME-TIMESTAMP).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def compare_command(config_path, candidates, shots, train_steps, limit, overrides, usable_gb,
                    out_dir, as_json, quiet):
    """Candidate bases for CONFIG on its held-out split: size, planned memory per tier,
    step time, decoding speed, zero- and few-shot metrics (and a pilot run's), ranked by
    the main metric per GB, with a recommendation."""
    from mlxtune import config
    from mlxtune.evaluate import report
    from mlxtune.evaluate.compare import compare, markdown
    from mlxtune.train.progress import Progress

    cfg = config.load(config_path, list(overrides))
    progress = Progress(quiet=quiet)
    try:
        result = compare(cfg, list(candidates), list(shots) or [0, cfg.eval.shots],
                         train_steps, limit, usable_gb, out_dir, log=progress.message,
                         status=progress.status)
    finally:
        progress.close()
    click.echo(report.to_json(result) if as_json else markdown(result))


def _spread(argv: list[str], options=("--models", "--shots")) -> list[str]:
    """`compare --models A B C` as click reads it: --models A --models B --models C."""
    if "compare" not in argv:
        return argv
    out, current = [], None
    for arg in argv:
        if arg in options:
            current = arg
            continue
        if current is not None and not arg.startswith("-"):
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


@cli.command("init")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--example", type=click.Choice(["tasks"]), default="tasks", show_default=True,
              help="tasks: the quickstart (requests -> strict task JSON, QLoRA on the "
                   "packaged SmolLM2).")
def init_command(directory, example):
    """Write a ready example into DIR (new or empty): its config, data, JSON schema and
    metric, so that `mlxtune run DIR/quickstart.yaml` works from an installed wheel."""
    from mlxtune import examples

    config_path = examples.init(directory, example)
    click.echo(f"{example}: {', '.join(sorted(p.name for p in config_path.parent.iterdir()))}"
               f" in {config_path.parent}; train with: mlxtune run {config_path}", err=True)
    click.echo(str(config_path))


def main(argv=None) -> None:
    argv = _spread(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    try:
        _check_profile()
        cli.main(args=argv, prog_name="mlxtune", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("mlxtune: aborted", err=True)
        sys.exit(130)
    except MlxtuneError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"mlxtune: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("mlxtune: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug or an unexpected failure: still one line by default
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"mlxtune: internal error: {type(e).__name__}: {first} "
                   "(run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
