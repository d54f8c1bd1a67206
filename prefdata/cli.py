"""The prefdata command: run recipes, list steps, inspect outputs, clean the cache, train."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("prefdata")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
GLOBAL_FLAGS = {"-v", "--verbose"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose, rest = _global_flags(argv)
    if rest[:1] == ["train"]:
        configure_logging(verbose)
        from prefdata.train.trainer import main as train_main

        return train_main(rest[1:])
    if rest[:1] in (["train-rm"], ["eval-rm"]):
        configure_logging(verbose)
        from prefdata.prefmodel import eval as eval_rm, train as train_rm

        return (train_rm if rest[0] == "train-rm" else eval_rm).main(rest[1:])
    if rest[:1] == ["argilla"]:
        try:
            from prefdata.argilla.cli import cli_main as argilla_main
        except ImportError:  # argilla as one module
            from prefdata.argilla import cli_main as argilla_main

        return argilla_main((["-v"] if verbose else []) + rest[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    args.verbose = args.verbose or verbose or getattr(args, "sub_verbose", False)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        if args.verbose:
            raise
        summary = getattr(exc, "summary", None)  # a worker's error: its traceback only with -v
        if summary and getattr(exc, "worker_traceback", ""):
            print(f"prefdata: error: {summary}\n(run with -v to see the worker's traceback)", file=sys.stderr)
        else:
            print(f"prefdata: error: {exc}", file=sys.stderr)
        return 2


def _global_flags(argv: list[str]) -> tuple[bool, list[str]]:
    """``-v`` given before the command (``prefdata -v train ...``), and the rest."""
    verbose = False
    i = 0
    while i < len(argv) and argv[i] in GLOBAL_FLAGS:
        verbose = True
        i += 1
    return verbose, argv[i:]


def configure_logging(verbose: bool) -> None:
    """INFO for prefdata (DEBUG with -v); chatty libraries at WARNING unless -v."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    if not verbose:
        for name in ("httpx", "httpcore", "urllib3", "filelock", "matplotlib", "PIL", "ray", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("prefdata")
    except Exception:
        from prefdata import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefdata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"prefdata {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command works too
    verbose.add_argument("-v", "--verbose", dest="sub_verbose", action="store_true",
                         help="debug logging and full tracebacks")

    run = sub.add_parser("run", parents=[verbose], help="run (or resume) a recipe", description="Run or resume a recipe.")
    run.add_argument("recipe", help="a YAML recipe, e.g. pipelines/quickstart.yaml")
    run.add_argument("--workdir", help="cache and resume folder (overrides the recipe)")
    run.add_argument("--output", help="output parquet (overrides the recipe)")
    run.add_argument("--limit", type=int, help="only the first N prompts (prompts computed before are reused)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value: workdir=..., sample.n=8, steps.1.n=8")
    run.add_argument("--executor", choices=["local", "ray"],
                     help="where map steps run (overrides the recipe's 'executor'); ray needs 'prefdata[ray]'")
    run.add_argument("--in-process", action="store_true",
                     help="local executor: run model steps in this process, not in a worker process "
                          "(for debuggers and profilers; same as PREFDATA_IN_PROCESS=1)")
    run.add_argument("--dry-run", action="store_true",
                     help="show the plan (cached, partly cached, compute, and why; models to load), run nothing")
    run.add_argument("--force", metavar="STEP",
                     help="recompute from this step on: a name, name[k] for the k-th of that name, or an index")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (the libraries' own included)")
    run.set_defaults(func=cmd_run)

    steps = sub.add_parser("steps", parents=[verbose], help="every step: kind, columns, options with defaults and help",
                           description="List the steps a recipe can name, with their options.")
    steps.add_argument("names", nargs="*", help="only these steps")
    steps.set_defaults(func=cmd_steps)

    inspect = sub.add_parser("inspect", parents=[verbose], help="schema, row count, sample rows and score summary of a parquet file or folder")
    inspect.add_argument("path")
    inspect.add_argument("--rows", type=int, default=3, help="sample rows to show")
    inspect.set_defaults(func=cmd_inspect)

    gc = sub.add_parser("gc", parents=[verbose], help="remove cache folders that no given recipe uses any more",
                        description="Remove the fingerprint folders (and prompt stores) of WORKDIR that the given "
                                    "recipes, with the same --set and --limit, would not use.")
    gc.add_argument("workdir")
    gc.add_argument("--recipe", action="append", default=[], required=True,
                    help="a recipe whose folders are kept (repeatable)")
    gc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe overrides, as for run")
    gc.add_argument("--limit", type=int, help="as for run")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, with sizes; remove nothing")
    gc.set_defaults(func=cmd_gc)

    card = sub.add_parser("card", parents=[verbose], help="(re)write the dataset card and plots of an output folder or parquet file")
    card.add_argument("outdir", help="an output folder, or a folder or .parquet file without a run summary "
                                     "(e.g. a pulled or exported file): the card then describes the data alone")
    card.set_defaults(func=cmd_card)

    hub = sub.add_parser("push-to-hub", parents=[verbose], help="upload an output folder as a Hub dataset (token from HF_TOKEN)")
    hub.add_argument("outdir")
    hub.add_argument("repo_id")
    hub.add_argument("--private", action="store_true")
    hub.set_defaults(func=cmd_push_to_hub)

    sub.add_parser("train", help="train on a pair or list parquet (see 'prefdata train --help')")
    sub.add_parser("argilla", help="dev server, push and pull with Argilla (see 'prefdata argilla --help')")
    sub.add_parser("train-rm", help="train a BT reward model or a GPM on a pair parquet (see 'prefdata train-rm --help')")
    sub.add_parser("eval-rm", help="pairwise accuracy of a reward model or GPM on held-out pairs (see 'prefdata eval-rm --help')")
    return parser


def _pipeline(args, progress: bool = True):
    from prefdata.executors.local import LocalExecutor
    from prefdata.recipe import Recipe

    recipe = Recipe.from_args(args)
    pipeline = recipe.build(progress=progress, executor_name=args.executor, force=args.force)
    if args.in_process and isinstance(pipeline.executor, LocalExecutor):
        pipeline.executor.in_process = True
    return pipeline


def cmd_run(args) -> int:
    from prefdata.pipeline import format_summary
    from prefdata.rounds import cmd_rounds, wants_rounds

    if wants_rounds(args.recipe):  # on-policy rounds: the recipe runs once per round
        return cmd_rounds(args)
    pipeline = _pipeline(args, progress=not args.no_progress)
    if args.dry_run:
        from prefdata.plan import format_plan

        pipeline.check_columns()
        print(format_plan(pipeline.plan()))
        return 0
    pipeline.run(collect=False)  # the output file is written shard by shard; nothing is loaded whole
    print(format_summary(pipeline.stats))
    if pipeline.output:
        print(f"wrote {pipeline.stats[-1].rows_out} rows to {pipeline.output}")
        q = pipeline.output_paths()["quarantine"]
        if q.exists():
            print(f"quarantined rows (with reasons) in {q}")
    return 0


def cmd_steps(args) -> int:
    from prefdata.step_docs import describe_steps, format_steps
    from prefdata.steps import STEPS

    unknown = [n for n in args.names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; known steps: {', '.join(STEPS)}")
    print(format_steps(describe_steps(args.names or None)))
    return 0


def cmd_inspect(args) -> int:
    from prefdata.inspect import describe

    print(describe(Path(args.path), rows=args.rows))
    return 0


def cmd_gc(args) -> int:
    from prefdata.workdir_gc import collect

    _, report = collect(Path(args.workdir), args.recipe, args.overrides, args.limit, dry_run=args.dry_run)
    print(report)
    return 0


def cmd_card(args) -> int:
    from prefdata.cards import card_for_folder

    print(f"wrote {card_for_folder(args.outdir)}")
    return 0


def cmd_push_to_hub(args) -> int:
    from prefdata.cards import push_to_hub

    print(f"pushed to {push_to_hub(args.outdir, args.repo_id, private=args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
