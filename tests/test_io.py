"""Atomic writes: finished files get the mode a plain open() would give them."""

from __future__ import annotations

import os
import stat

import pyarrow as pa
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
