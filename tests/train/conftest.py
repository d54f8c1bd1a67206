"""Fixtures for the trainer tests: a tiny random Llama with the SmolLM2 tokenizer, and pair files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from train_data import GOOD, direct_logps, pair_rows, pair_table  # noqa: F401  (re-exported)


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_factory) -> str:
    """A 2-layer Llama (random weights, hidden 32, tied embeddings) with SmolLM2's tokenizer."""
    return tiny_llama_factory(0, hidden_size=32, tie_embeddings=True, init_range=0.02)  # tests/conftest.py


@pytest.fixture
def pairs_file(tmp_path):
    import pyarrow.parquet as pq

    def make(n: int = 24, seed: int = 0, flip_prob: bool = True, table: pa.Table | None = None):
        path = tmp_path / "data" / f"pairs-{n}-{seed}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table if table is not None else pair_table(n, seed, flip_prob), path)
        return str(path)

    return make
