"""Annotator accounts from the CLI, the server version check, and a quiet terminal."""

from __future__ import annotations

import json
import logging
import stat
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from prefdata.argilla import ArgillaError, PushConfig, check_server_version, cli_main, connect, push


def test_users_add_list_remove_from_the_cli(argilla_server, capsys, monkeypatch, tmp_path):
    import httpx

    monkeypatch.setenv("PREFDATA_CACHE", str(tmp_path / "cache"))  # where the password file goes
    assert cli_main(["users", "add", "alice-cli"]) == 0
    printed = capsys.readouterr().out
    password = printed.split("):\n  ", 1)[1].split("\n", 1)[0]
    files = list((tmp_path / "cache" / "argilla-users").rglob("alice-cli.password"))
    assert len(files) == 1 and files[0].read_text().strip() == password
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert printed.count(password) == 1  # shown once
    token = httpx.post(f"{argilla_server.url}/api/v1/token", data={"username": "alice-cli", "password": password})
    assert token.status_code == 201  # the annotator logs in with it
    me = httpx.get(f"{argilla_server.url}/api/v1/me",
                   headers={"Authorization": f"Bearer {token.json()['access_token']}"}).json()
    assert me["role"] == "annotator"
    with monkeypatch.context() as m:  # an annotator's key may not manage users: a clean error, no traceback
        m.setenv("ARGILLA_API_KEY", me["api_key"])
        assert cli_main(["users", "list"]) == 2
        assert "users: the Argilla server answered HTTP 403" in capsys.readouterr().err

    assert cli_main(["users", "add", "alice-cli"]) == 2
    assert "user 'alice-cli' already exists" in capsys.readouterr().err
    assert cli_main(["users", "add", "Bad Name!"]) == 2
    assert "not a valid Argilla user name" in capsys.readouterr().err

    assert cli_main(["users", "list"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["alice-cli"] == ["annotator", "prefdata"] and rows["owner"][0] == "owner"

    assert cli_main(["users", "remove", "alice-cli"]) == 0
    assert not files[0].exists()
    assert cli_main(["users", "remove", "alice-cli"]) == 2
    assert "no user 'alice-cli'" in capsys.readouterr().err


class _OldArgilla(BaseHTTPRequestHandler):
    """A real HTTP server that answers like argilla-server 1.29 (we cannot run one here)."""

    def do_GET(self):  # noqa: N802
        body = json.dumps({"version": "1.29.0"}).encode() if self.path == "/api/v1/version" else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_unsupported_server_version_is_named():
    server = HTTPServer(("127.0.0.1", 0), _OldArgilla)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(ArgillaError, match=r"runs version 1\.29\.0; prefdata supports argilla-server "
                                                r">=2\.2, <3\.0"):
            connect(url, "some-key")
    finally:
        server.shutdown()
    check_server_version("2.8.0")
    check_server_version("2.2.1")
    for bad in ("2.1.9", "3.0.0", "nightly"):
        with pytest.raises(ArgillaError, match=f"runs version {bad}"):
            check_server_version(bad)


def test_sdk_chatter_hidden_unless_verbose(argilla_server, pair_table, caplog):
    prefdata_logger = logging.getLogger("prefdata")
    with caplog.at_level(logging.INFO):
        push(pair_table(3, prefix="quiet"), PushConfig(dataset="quiet"))
    noisy = [r for r in caplog.records if r.name.startswith(("httpx", "argilla")) or r.getMessage().startswith(
        "Argilla: ")]
    assert noisy == []
    caplog.clear()
    old = prefdata_logger.level
    prefdata_logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.INFO):
            push(pair_table(3, prefix="loud"), PushConfig(dataset="loud"))
    finally:
        prefdata_logger.setLevel(old)
        push(pair_table(1, prefix="quiet-again"), PushConfig(dataset="quiet"))  # levels back to quiet
    names = {r.name for r in caplog.records}
    assert "httpx" in names and any(r.getMessage().startswith("Argilla: Logged in") for r in caplog.records)
