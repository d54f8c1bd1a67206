"""``prefdata argilla``: the dev server, push, pull and annotator accounts, from the shell.

Errors are one line on stderr (exit code 2); httpx and SDK INFO lines appear only with -v.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from prefdata.argilla.client import ArgillaError, connect, quiet_sdk_logs, status_of
from prefdata.argilla.dataset import DatasetConfig
from prefdata.argilla.pull import PullConfig, pull
from prefdata.argilla.push import PushConfig, push
from prefdata.argilla.users import ROLES, add_user, list_users, remove_user


def cli_main(argv: list[str]) -> int:
    """``prefdata argilla serve | stop | status | push | pull | users``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger("prefdata").setLevel(logging.DEBUG)
    if not logging.getLogger().handlers:  # retries and recoveries are warnings
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    quiet_sdk_logs()
    try:
        return args.func(args)
    except (ArgillaError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"prefdata argilla: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an SDK error with an HTTP status (e.g. 403 for a role that may not do this)
        status = status_of(exc)
        if status is None or args.verbose:
            raise
        detail = str(exc).split("Details: ", 1)[-1][:300]
        print(f"prefdata argilla: error: {args.command}: the Argilla server answered HTTP {status}: {detail} "
              "(403: the API key's user lacks the role for this; use an owner's key)", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefdata argilla", description=(
        "Send hard pairs to human annotators in Argilla and merge their labels back. The server "
        "and key come from ARGILLA_API_URL / ARGILLA_API_KEY, or from a local dev server ('serve')."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, with the SDK's HTTP lines")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local argilla-server 2.8 (own venv, SQLite, Redis, in-process search)")
    serve.add_argument("--data-dir", help="where the server keeps its data (default: <cache>/argilla-dev)")
    serve.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default 6900; 0 = any free port)")
    serve.add_argument("--no-worker", action="store_true", help="no rq worker for argilla's background jobs")
    serve.set_defaults(func=_cmd_serve)
    for name, func, text in (("stop", _cmd_stop, "stop the local server"),
                             ("status", _cmd_status, "show the local server's state")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data-dir")
        p.set_defaults(func=func)

    push_p = sub.add_parser("push", help="push pairs (those routed to humans) to an Argilla dataset")
    push_p.add_argument("pairs", help="a pair parquet file")
    _dataset_args(push_p)
    push_p.add_argument("--batch-size", type=int, default=PushConfig.batch_size)
    push_p.add_argument("--seed", type=int, default=PushConfig.seed, help="seed of the A/B order")
    push_p.add_argument("--all", action="store_true", help="push every pair, ignoring the route column")
    push_p.add_argument("--show-ai-suggestion", action="store_true",
                        help="pre-select the AI verdict in the UI, labelled as the model's opinion with its "
                             "confidence (default: blind; the verdict stays in hidden metadata)")
    push_p.add_argument("--min-submitted", type=int, default=PushConfig.min_submitted,
                        help="responses needed before a record counts as complete")
    push_p.set_defaults(func=_cmd_push)

    pull_p = sub.add_parser("pull", help="merge submitted human labels into a pair parquet")
    pull_p.add_argument("pairs", help="the pair parquet that was pushed")
    pull_p.add_argument("-o", "--output", required=True, help="merged pair parquet to write")
    _dataset_args(pull_p)
    pull_p.add_argument("--policy", choices=["majority", "first", "keep_all"], default="majority")
    pull_p.add_argument("--unanswered", choices=["keep_ai", "exclude"], default="keep_ai")
    pull_p.add_argument("--ties", choices=["exclude", "keep_ai"], default="exclude")
    pull_p.set_defaults(func=_cmd_pull)
    _users_parser(sub)
    return parser


def _users_parser(sub) -> None:
    users = sub.add_parser("users", help="annotator accounts on the server (dev server or any Argilla)")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="create a user with a generated password (printed once)")
    add.add_argument("name", help="user name (lowercase letters, digits, '_', '-', '.')")
    add.add_argument("--role", choices=ROLES, default="annotator")
    add.add_argument("--workspace", default=DatasetConfig.workspace, help="workspace the user joins")
    add.set_defaults(func=_cmd_users_add)
    ls = users_sub.add_parser("list", help="list users, their roles and workspaces")
    ls.set_defaults(func=_cmd_users_list)
    rm = users_sub.add_parser("remove", help="delete a user (and its password file)")
    rm.add_argument("name")
    rm.set_defaults(func=_cmd_users_remove)


def _dataset_args(p) -> None:
    p.add_argument("--dataset", default=DatasetConfig.dataset, help="Argilla dataset name")
    p.add_argument("--workspace", default=DatasetConfig.workspace, help="Argilla workspace")


def _cmd_serve(args) -> int:
    from prefdata.argilla_dev import serve

    info = serve(args.data_dir, port=args.port, worker=not args.no_worker)
    print(info.describe())
    if info.new_api_key:
        print("\nOwner API key (shown once; also kept, mode 0600, in the file above):\n"
              f"  export ARGILLA_API_URL={info.url}\n  export ARGILLA_API_KEY={info.new_api_key}")
    else:
        print(f"  export ARGILLA_API_URL={info.url}   (API key: ARGILLA_API_KEY, or the one shown at first start)")
    return 0


def _cmd_stop(args) -> int:
    from prefdata.argilla_dev import stop

    print("stopped" if stop(args.data_dir) else "no dev server running")
    return 0


def _cmd_status(args) -> int:
    from prefdata.argilla_dev import status

    print(json.dumps(status(args.data_dir), indent=2))
    return 0


def _cmd_push(args) -> int:
    import pyarrow.parquet as pq

    cfg = PushConfig(dataset=args.dataset, workspace=args.workspace, batch_size=args.batch_size, seed=args.seed,
                     only_routed=not args.all, show_ai_suggestion=args.show_ai_suggestion,
                     min_submitted=args.min_submitted)
    result = push(pq.read_table(args.pairs), cfg)
    print(f"pushed {result.created} new record(s) to {cfg.workspace}/{cfg.dataset} in {result.batches} batch(es); "
          f"{result.already_present} already there; {result.seconds:.1f} s")
    return 0


def _cmd_pull(args) -> int:
    import pyarrow.parquet as pq

    from prefdata.io import write_parquet

    cfg = PullConfig(dataset=args.dataset, workspace=args.workspace, policy=args.policy,
                     unanswered=args.unanswered, ties=args.ties)
    out = pull(pq.read_table(args.pairs), cfg)
    output = Path(args.output)
    write_parquet(out.table, output)
    qpath = output.with_name(output.stem + ".quarantine.parquet")
    if out.quarantine is not None:
        write_parquet(out.quarantine, qpath)
    elif qpath.exists():
        qpath.unlink()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(out.counts.items()))
    print(f"wrote {out.table.num_rows} pairs to {output} ({summary})")
    if out.quarantine is not None:
        print(f"excluded pairs, with reasons, in {qpath}")
    return 0


def _cmd_users_add(args) -> int:
    client = connect()
    user = add_user(client, args.name, role=args.role, workspace=args.workspace)
    print(f"created {user.role} '{user.username}' in workspace '{args.workspace}' at {client.api_url}\n"
          f"  password (shown once; kept, mode 0600, in {user.password_file}):\n  {user.password}\n"
          f"Log in at {client.api_url} with this user name and password.")
    return 0


def _cmd_users_list(args) -> int:
    rows = list_users(connect())
    width = max([len(r["username"]) for r in rows] + [8])
    print(f"{'username':{width}s}  {'role':9s}  workspaces")
    for r in rows:
        print(f"{r['username']:{width}s}  {r['role']:9s}  {', '.join(r['workspaces']) or '-'}")
    return 0


def _cmd_users_remove(args) -> int:
    if not remove_user(connect(), args.name):
        print(f"prefdata argilla: error: no user '{args.name}'", file=sys.stderr)
        return 2
    print(f"removed user '{args.name}'")
    return 0
