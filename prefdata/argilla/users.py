"""Annotator accounts: each annotator logs in with their own user, never as the owner.

An owner sees every metadata value (the A/B order, the AI verdict, the scores); an
annotator sees only the record and the question, which is what keeps annotation blind.
``add`` creates a user with a generated password, adds it to the workspace, prints the
password once and keeps it only in a 0600 file under the prefdata cache, one folder per
server (so the operator can hand it over later); ``remove`` deletes the user and that file.
"""

from __future__ import annotations

import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from prefdata.argilla.client import ArgillaError, require_sdk, with_retries

ROLES = ("annotator", "admin")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,62}$")  # argilla-server's username rule, lowercase


@dataclass
class NewUser:
    username: str
    role: str
    password: str
    password_file: Path


def password_dir(api_url: str) -> Path:
    from prefdata.models.hub import cache_dir

    parsed = urlparse(api_url)
    server = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{parsed.hostname}-{parsed.port or 'default'}")
    return cache_dir() / "argilla-users" / server


def add_user(client, username: str, role: str = "annotator", workspace: str = "prefdata",
             retries: int = 2, folder: Path | None = None) -> NewUser:
    """Create ``username`` with a generated password and make it a member of ``workspace``.

    The password goes to ``folder`` (default: ``password_dir(server)``) in a 0600 file.
    """
    rg = require_sdk()
    if role not in ROLES:
        raise ValueError(f"users add: role must be one of {ROLES}, got '{role}'")
    if not NAME.match(username):
        raise ValueError(f"users add: '{username}' is not a valid Argilla user name (2-63 characters: lowercase "
                         "letters, digits, '_', '-', '.'; starting with a letter or digit)")
    if find_user(client, username) is not None:
        raise ArgillaError(f"user '{username}' already exists at {client.api_url}; pick another name, or "
                           f"`prefdata argilla users remove {username}` first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ws = client.workspaces(workspace)
    if ws is None:
        raise ArgillaError(f"workspace '{workspace}' does not exist at {client.api_url}; create it in Argilla "
                           "or pass --workspace")
    password = secrets.token_urlsafe(12)
    user = rg.User(username=username, role=role, password=password, client=client).create()
    with_retries(lambda: user.add_to_workspace(ws), retries, f"adding {username} to {workspace}", client.api_url)
    path = _write_password(folder or password_dir(client.api_url), username, password)
    return NewUser(username=username, role=role, password=password, password_file=path)


def find_user(client, username: str):
    with warnings.catch_warnings():  # the SDK warns when a user is not found
        warnings.simplefilter("ignore", UserWarning)
        return client.users(username=username)


def list_users(client) -> list[dict]:
    """Every user of the server: name, role and workspaces."""
    member_of: dict[str, list[str]] = {}
    for ws in client.workspaces:
        for user in ws.users:
            member_of.setdefault(user.username, []).append(ws.name)
    return [{"username": user.username, "role": getattr(user.role, "value", str(user.role)),
             "workspaces": sorted(member_of.get(user.username, []))} for user in client.users]


def remove_user(client, username: str, folder: Path | None = None) -> bool:
    """Delete ``username`` and its password file; False when there is no such user."""
    user = find_user(client, username)
    if user is None:
        return False
    if getattr(user.role, "value", user.role) == "owner":
        raise ArgillaError(f"'{username}' is an owner; prefdata does not remove owners")
    user.delete()
    ((folder or password_dir(client.api_url)) / f"{username}.password").unlink(missing_ok=True)
    return True


def _write_password(folder: Path, username: str, password: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / f"{username}.password"
    tmp = folder / f".{username}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    os.replace(tmp, path)
    return path
