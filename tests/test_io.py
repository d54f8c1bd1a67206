"""Atomic writes: finished files get the mode a plain open() would give them."""

from __future__ import annotations

import json
import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata.io import write_json, write_parquet, write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = [write_json({"b": 1, "a": 2}, tmp_path / "s.json"), write_text("x", tmp_path / "t.md"),
                 write_text(b"\x89PNG", tmp_path / "p.png"),
                 write_parquet(pa.table({"x": [1]}), tmp_path / "d.parquet")]
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths} == {p.name: mode for p in paths}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "p.png", "s.json", "t.md"]  # no temp left


def test_json_keeps_insertion_order_unless_asked(tmp_path):
    assert write_json({"b": 1, "a": 2}, tmp_path / "s.json").read_text().index('"b"') < \
        (tmp_path / "s.json").read_text().index('"a"')
    text = write_json({"b": 1, "a": 2}, tmp_path / "t.json", sort_keys=True).read_text()
    assert text.index('"a"') < text.index('"b"')


def test_parquet_files_are_concatenated_one_at_a_time_like_concat_tables(tmp_path):
    from prefdata.io import write_parquet_files
    from prefdata.shards import read_shards

    parts = [pa.table({"a": [1, 2], "b": pa.nulls(2)}),                    # b all null here
             pa.table({"a": [3], "b": ["x"], "c": [0.5]}),                  # c only here
             pa.table({"a": pa.array([], pa.int64())}),                       # an empty shard
             pa.table({"b": ["y", None], "a": [4, 5]})]                     # other column order
    files = []
    for i, t in enumerate(parts):
        files.append(write_parquet(t, tmp_path / f"shard-{i}.parquet"))
    out = tmp_path / "out.parquet"
    assert write_parquet_files(files, out, metadata={"prefdata_run": {"k": 1}}, row_group_rows=2) == 5
    got = pq.read_table(out)
    assert got.replace_schema_metadata(None).equals(read_shards(files))    # what the whole-table path writes
    assert got.column_names == ["a", "b", "c"] and got["c"].to_pylist() == [None, None, 0.5, None, None]
    assert json.loads(got.schema.metadata[b"prefdata_run"]) == {"k": 1}
    # rows gathered into groups of >= 2 as they come (never the whole output in memory);
    # no empty row group (readers such as `datasets` batch by row group and fail on 0 rows)
    groups = [pq.ParquetFile(out).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(out).num_row_groups)]
    assert groups == [2, 3]
    from datasets import load_dataset                                       # the consumer that failed on an empty group
    assert load_dataset("parquet", data_files=str(out), cache_dir=str(tmp_path / "hf"))["train"]["a"] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temp left
