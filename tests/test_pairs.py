"""Stable ids: the same on every machine and run, independent of batch and chunking."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.pairs import assistant_messages, hash64, hex16, pair_ids, to_arrow


def test_hash64_is_pinned():
    # Pinned values: if these change, every pair_id and node_id in existing datasets changes.
    assert hash64(["abc", "", "a" * 20, "héllo"]).tolist() == [
        14899519323945335231, 11286133854226296554, 12017495907516579015, 10406739036760096155]
    assert pair_ids(["r1"], ["r2"]).to_pylist() == ["29bd30412daf2a4f"]


def test_hash64_does_not_depend_on_neighbours_chunks_or_types():
    words = ["x", "a somewhat longer string", "", "ab", "ab\x00", "same", "same"]
    alone = [int(hash64([w])[0]) for w in words]
    together = hash64(words).tolist()
    assert together == alone
    chunked = pa.chunked_array([pa.array(words[:3]), pa.array(words[3:])])
    assert hash64(chunked).tolist() == alone
    assert hash64(pa.array(words, pa.large_string())).tolist() == alone
    assert hash64(pl.Series(words)).tolist() == alone
    assert hash64(pa.array(words).slice(2)).tolist() == alone[2:]
    assert alone[3] != alone[4] and alone[5] == alone[6]
    assert hash64(pa.array(["", None])).tolist() == [alone[2], alone[2]]


def test_hash64_has_no_collisions_on_a_million_ids():
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(200_000)]
    assert len(np.unique(hash64(ids))) == len(ids)
    assert len(np.unique(hash64([f"r{i}" for i in range(200_000)]))) == 200_000


def test_hex_and_pair_ids():
    assert hex16(np.array([0, 255, 2**64 - 1], dtype=np.uint64)).to_pylist() == [
        "0000000000000000", "00000000000000ff", "ffffffffffffffff"]
    ab, ba = pair_ids(["a", "b"], ["b", "a"]).to_pylist()
    assert ab == ba and len(ab) == 16
    assert pair_ids(["a"], ["c"]).to_pylist() != [ab]


def test_assistant_messages_and_plain_types():
    msgs = assistant_messages(pa.array(["hi", ""]))
    assert msgs.to_pylist() == [[{"role": "assistant", "content": "hi"}], [{"role": "assistant", "content": ""}]]
    table = to_arrow(pl.DataFrame({"s": ["x"], "l": [[{"role": "a", "content": "b"}]]}))
    assert table.schema.field("s").type == pa.string()
    assert table.schema.field("l").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
