"""The ``prefdata`` command: run recipes, inspect outputs, train."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("prefdata")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from prefdata.train.trainer import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["argilla"]:
        from prefdata.argilla import cli_main as argilla_main

        return argilla_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"prefdata: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefdata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a recipe")
    run.add_argument("recipe", help="a YAML recipe, e.g. pipelines/quickstart.yaml")
    run.add_argument("--workdir", help="cache and resume folder (overrides the recipe)")
    run.add_argument("--output", help="output parquet (overrides the recipe)")
    run.add_argument("--limit", type=int, help="only the first N prompts")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value: workdir=..., sample.n=8, steps.1.n=8")
    run.add_argument("--executor", choices=["local", "ray"],
                     help="where map steps run (overrides the recipe's 'executor'); ray needs 'prefdata[ray]'")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="schema, row count, sample rows and score summary of a parquet file or folder")
    inspect.add_argument("path")
    inspect.add_argument("--rows", type=int, default=3, help="sample rows to show")
    inspect.set_defaults(func=cmd_inspect)

    card = sub.add_parser("card", help="(re)write the dataset card and plots of an output folder")
    card.add_argument("outdir")
    card.set_defaults(func=cmd_card)

    hub = sub.add_parser("push-to-hub", help="upload an output folder as a Hub dataset (token from HF_TOKEN)")
    hub.add_argument("outdir")
    hub.add_argument("repo_id")
    hub.add_argument("--private", action="store_true")
    hub.set_defaults(func=cmd_push_to_hub)

    sub.add_parser("train", help="train on a pair or list parquet (see 'prefdata train --help')")
    sub.add_parser("argilla", help="dev server, push and pull with Argilla (see 'prefdata argilla --help')")
    return parser


def cmd_run(args) -> int:
    from prefdata.pipeline import format_summary
    from prefdata.recipe import Recipe

    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    if args.output:
        overrides.append(f"output={args.output}")
    recipe = Recipe.load(args.recipe, overrides, limit=args.limit)
    pipeline = recipe.build(progress=not args.no_progress, executor_name=args.executor)
    result = pipeline.run()
    print(format_summary(pipeline.stats))
    if pipeline.output:
        print(f"wrote {result.num_rows} rows to {pipeline.output}")
        q = pipeline.output_paths()["quarantine"]
        if q.exists():
            print(f"quarantined rows (with reasons) in {q}")
    return 0


def cmd_inspect(args) -> int:
    from prefdata.inspect import describe

    print(describe(Path(args.path), rows=args.rows))
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
