"""Helpers for the preference-model tests: a small real pair parquet."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

WORDS = ["apple", "river", "stone", "cloud", "tiger", "paper", "glass", "music"]


def pair_table(path, prompts=8, extra=None):
    rows = {"prompt_id": [], "prompt": [], "chosen": [], "rejected": [], "source": []}
    for p in range(prompts):
        prompt = [{"role": "user", "content": f"Say something about {WORDS[p % 8]} {p}."}]
        for k in range(2):
            rows["prompt_id"].append(f"p{p}")
            rows["prompt"].append(prompt)
            rows["chosen"].append([{"role": "assistant", "content": f"A long careful answer about {WORDS[(p + k) % 8]}."}])
            rows["rejected"].append([{"role": "assistant", "content": f"no {k}"}])
            rows["source"].append("a" if p % 2 else "b")
    rows.update(extra or {})
    pq.write_table(pa.table(rows), path)
    return str(path)


@pytest.fixture(scope="session")
def make_pairs():
    return pair_table
