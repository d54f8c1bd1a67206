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
