"""A real argilla-server 2.8 for the tests of this folder, started once per test session.

The server venv is built (or reused) under the prefdata cache dir; without network to
build it, the server tests skip with the reason. The server runs on a free loopback port
with a temporary data dir and a random owner API key given through ARGILLA_API_KEY.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from prefdata.schema import PAIR, conform


@dataclass
class ArgillaServer:
    url: str
    api_key: str
    data_dir: Path
    port: int

    def kill(self) -> None:
        """SIGKILL the whole server (launcher, Redis, worker), like a crash."""
        from prefdata.argilla_dev import server

        server.stop(self.data_dir, force=True)

    def restart(self) -> None:
        from prefdata.argilla_dev import server

        server.stop(self.data_dir)
        server.serve(self.data_dir, port=self.port)

    def client(self, api_key: str | None = None):
        from prefdata.argilla import connect

        return connect(self.url, api_key or self.api_key)


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    pytest.importorskip("argilla", reason="the argilla SDK is not installed: pip install 'prefdata[argilla]'")
    from prefdata.argilla_dev import server

    try:
        server.ensure_venv()
    except server.ServerError as exc:
        pytest.skip(f"cannot build the argilla-server environment (needs PyPI): {exc}")
    data = tmp_path_factory.mktemp("argilla-data")
    key = "test." + secrets.token_urlsafe(24)
    saved = {k: os.environ.get(k) for k in ("ARGILLA_API_URL", "ARGILLA_API_KEY")}
    os.environ["ARGILLA_API_KEY"] = key
    try:
        info = server.serve(data, port=0)
        os.environ["ARGILLA_API_URL"] = info.url
        yield ArgillaServer(url=info.url, api_key=key, data_dir=data, port=int(info.url.rsplit(":", 1)[1]))
    finally:
        server.stop(data)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_pairs(n: int, prefix: str = "pair", special: dict[int, str] | None = None) -> pa.Table:
    """``n`` literal pairs with AI scores, strength and flip_prob; ``special`` adds a word to some."""
    special = special or {}
    rows = []
    for i in range(n):
        extra = f" {special[i]}" if i in special else ""
        rows.append({
            "pair_id": f"{prefix}-{i:05d}", "prompt_id": f"{prefix}-prompt-{i:05d}",
            "prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"The answer is {2 * i}.{extra}"}],
            "rejected": [{"role": "assistant", "content": f"I believe it is {2 * i + 1}."}],
            "chosen_id": f"{prefix}-c{i}", "rejected_id": f"{prefix}-r{i}",
            "score_chosen": 1.0 + i / max(n, 1), "score_rejected": 0.5, "margin": 0.5 + i / max(n, 1),
            "pair_strategy": "best_vs_random", "label_source": "ai",
            "strength": round(0.1 * (i % 7) - 0.2, 6), "flip_prob": (i % 10) / 10,
        })
    return conform(pa.Table.from_pylist(rows), PAIR)


@pytest.fixture(scope="session")
def pair_table():
    """The ``make_pairs`` factory (conftest helpers are not importable across test folders)."""
    return make_pairs


def submit_responses(dataset, answers) -> None:
    """Log responses through the public SDK, as the users they belong to (one bulk upsert).

    ``answers``: (pair_id, user_id, label, rationale, status). Annotators cannot upsert
    records themselves (an owner/admin right), so the owner logs each response with the
    annotator's user id: the SDK's documented way to bring annotations in. Call once per
    round when the order of responses matters (the server orders them by insertion time).
    """
    import argilla as rg

    records = {r.id: r for r in dataset.records(with_responses=True, with_suggestions=True)}
    touched = {}
    for pair_id, user_id, label, rationale, status in answers:
        record = records[pair_id]
        record.responses.add(rg.Response("preference", label, user_id=user_id, status=status))
        if rationale:
            record.responses.add(rg.Response("rationale", rationale, user_id=user_id, status=status))
        touched[pair_id] = record
    dataset.records.log(list(touched.values()), batch_size=min(500, len(touched)))


@pytest.fixture(scope="session")
def submit():
    return submit_responses


@dataclass
class Annotator:
    username: str
    user_id: object
    password: str
    headers: dict  # a bearer token from logging in with the password, as the web UI does


def login(url: str, username: str, password: str) -> dict:
    """Log in with user name and password (argilla-server's /api/v1/token, the UI's login)."""
    import httpx

    resp = httpx.post(f"{url}/api/v1/token", data={"username": username, "password": password}, timeout=30)
    resp.raise_for_status()
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


def pending_for(url: str, headers: dict, dataset_id) -> list[dict]:
    """An annotator's queue, asked as the web UI asks (the SDK has no annotator-side reads)."""
    import argilla as rg
    import httpx

    body = rg.Query(filter=rg.Filter(("response.status", "==", "pending"))).api_model().model_dump(by_alias=True)
    resp = httpx.post(f"{url}/api/v1/me/datasets/{dataset_id}/records/search", json=body, headers=headers,
                      params={"limit": 100, "include": ["suggestions"]}, timeout=30)
    resp.raise_for_status()
    return [item["record"] for item in resp.json()["items"]]


@pytest.fixture(scope="session")
def make_annotator(argilla_server, tmp_path_factory):
    """Creates an annotator with prefdata's ``add_user`` and logs it in with its password."""
    import uuid

    from prefdata.argilla import add_user

    def make(prefix: str = "ann") -> Annotator:
        owner = argilla_server.client()
        user = add_user(owner, f"{prefix}-{uuid.uuid4().hex[:6]}", folder=tmp_path_factory.mktemp("passwords"))
        found = owner.users(username=user.username)
        return Annotator(user.username, found.id, user.password,
                         login(argilla_server.url, user.username, user.password))

    return make


@pytest.fixture(scope="session")
def annotator_queue(argilla_server):
    return lambda annotator, dataset_id: pending_for(argilla_server.url, annotator.headers, dataset_id)
