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
from mlxtune.errors import MlxtuneError

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
def run(config_path, overrides, run_dir, resume, quiet):
    """Train as CONFIG says; write a run directory."""
    from mlxtune import config
    from mlxtune.run import run as run_training

    cfg = config.load(config_path, list(overrides))
    run_dir, result = run_training(cfg, run_dir, resume=resume, quiet=quiet)
    if not quiet:
        best = f", best val loss {result.best_val:.4f}" if result.best_val is not None else ""
        click.echo(f"{result.reason}: step {result.step}{best}", err=True)
    click.echo(str(run_dir))
    if result.reason == "interrupted":
        sys.exit(130)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def doctor(as_json):
    """Backend, device, BLAS, memory and versions."""
    from mlxtune.doctor import report

    info = report()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        click.echo(f"{k:<{width}}  {v}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
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
