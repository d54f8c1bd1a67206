"""Sources that stream: shards are written while the file is read, equal whatever the read
batch size, with every prompt's rows in one shard, nothing quarantined lost, and ``limit``
stopping the read; a kill mid-stream leaves no finished-looking step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata import readers, shards
from prefdata.pipeline import Pipeline
from prefdata.shards import KeyIndex, ShardWriter, split_by_prompt
from prefdata.step import Output
from prefdata.steps.import_pairs import ImportPairs
from prefdata.steps.import_ratings import ImportRatings
from prefdata.steps.load_prompts import LoadPrompts

ROOT = Path(__file__).resolve().parents[1]


# -- inputs -----------------------------------------------------------------------------------
def hh_rows(n: int, n_prompts: int, seed: int = 0) -> tuple[list[dict], int]:
    """HH pairs whose prompts recur far apart (random order), a few exact duplicates and a
    few bad rows (prefix mismatch); returns the rows and how many are bad."""
    rng = random.Random(seed)
    rows, bad = [], 0
    for j in range(n):
        p = rng.randrange(n_prompts)
        head = f"\n\nHuman: question {p}" + ("\n\nAssistant: hm\n\nHuman: go on" if p % 5 == 0 else "")
        row = {"chosen": f"{head}\n\nAssistant: good {j % 7}", "rejected": f"{head}\n\nAssistant: bad {j % 5}"}
        if j % 97 == 13:
            row["rejected"] = "\n\nHuman: another question\n\nAssistant: x"
            bad += 1
        rows.append(row)
    return rows, bad


def write_parquet_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def step_dir(pipe: Pipeline) -> Path:
    return pipe.step_dirs()[0]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.parquet"))}


def reshard_whole(out: Output, directory: Path, shard_size: int) -> None:
    """The runner before sources streamed: ``split_by_prompt`` of the whole table, quarantine
    and counts with shard 0."""
    for index, part in enumerate(split_by_prompt(out.table, shard_size)):
        shards.write_shard(directory, index, Output(part, out.quarantine if index == 0 else None,
                                                    out.counts if index == 0 else {}))


def run_source(source, workdir: Path, shard_size: int = 8) -> Pipeline:
    pipe = Pipeline([source], workdir=workdir, shard_size=shard_size, progress=False, card=False)
    pipe.run()
    return pipe


class Recorder:
    """Counts the rows of every piece a source yields and of the rows the writer holds."""

    real_add = ShardWriter.add

    def __init__(self, monkeypatch):
        self.pieces: list[int] = []
        self.held: list[int] = []  # rows of shards not yet written
        self.late_bytes: list[int] = []  # rows for written shards, kept in memory
        real_add = Recorder.real_add

        def add(writer, piece):
            self.pieces.append(shards.as_output(piece).table.num_rows)
            real_add(writer, piece)
            self.held.append(sum(t.num_rows for t, _ in writer.pending))
            self.late_bytes.append(writer.late_bytes)

        monkeypatch.setattr(ShardWriter, "add", add)


# -- the writer on its own ---------------------------------------------------------------------
def random_table(rng: random.Random, n: int, n_prompts: int) -> pa.Table:
    ids = [f"p{rng.randrange(n_prompts)}" for _ in range(n)]
    return pa.table({"prompt_id": ids, "x": list(range(n))})


def write_pieces(tmp_path: Path, name: str, table: pa.Table, piece: int, size: int, adjacent=False) -> dict:
    writer = ShardWriter(tmp_path / name, size, adjacent=adjacent)
    for start in range(0, max(table.num_rows, 1), piece):
        writer.add(Output(table.slice(start, piece), None, {"rows": table.slice(start, piece).num_rows}))
    writer.close()
    return {k: pq.read_table(tmp_path / name / k).replace_schema_metadata(None)
            for k in sorted(files(tmp_path / name))}


@pytest.mark.parametrize("spill", [False, True])
def test_writer_gives_the_shards_of_the_whole_table_for_any_piece_size(tmp_path, monkeypatch, spill):
    if spill:  # every row for a written shard goes to disk and is read back a shard at a time
        monkeypatch.setattr(shards, "LATE_BYTES", 1)
    rng = random.Random(1)
    table = random_table(rng, 500, 60)  # prompts recur far apart: many rows arrive after their shard is written
    expected = [t.replace_schema_metadata(None) for t in split_by_prompt(table, 7)]
    grouped = [t.replace_schema_metadata(None) for t in split_by_prompt(shards.group_prompts(table), 7)]
    for piece in (7, 1000) if spill else (1, 7, 1000):
        got = write_pieces(tmp_path, f"s{piece}", table, piece, 7)
        assert [got[f"shard-{i:05d}.parquet"] for i in range(len(expected))] == expected, piece
        assert len(got) == len(expected)
        adj = write_pieces(tmp_path, f"a{piece}", table, piece, 7, adjacent=True)
        assert [adj[f"shard-{i:05d}.parquet"] for i in range(len(grouped))] == grouped, piece
    counts = shards.shard_counts(tmp_path / "s7" / "shard-00000.parquet")
    assert counts == {"rows": 500}
    assert not (tmp_path / "s7" / shards.LATE_DIR).exists()


def test_writer_without_prompt_ids_and_with_a_column_that_comes_late(tmp_path):
    a = pa.table({"x": [1, 2, 3]})
    b = pa.table({"x": [4, 5], "y": ["late", "col"]})
    writer = ShardWriter(tmp_path / "w", 2)
    writer.add(a)
    writer.add(b)
    assert writer.close() == 3
    got = shards.read_shards(shards.shard_files(tmp_path / "w", 3))
    assert got.to_pylist() == pa.concat_tables([a, b], promote_options="permissive").to_pylist()
    assert all(pq.read_schema(p).names == ["x", "y"] for p in shards.shard_files(tmp_path / "w", 3))


def test_key_index_maps_many_keys_through_merges():
    rng = np.random.default_rng(0)
    index, truth = KeyIndex(), {}
    for step in range(40):
        keys = np.unique(rng.integers(0, 2**63, size=(int(rng.integers(1, 300)), 2), dtype=np.uint64), axis=0)
        if step % 5 == 4:  # keys that share their first half with a stored key
            keys = np.unique(np.stack([keys[:, 0] * 0 + np.uint64(7), keys[:, 1]], axis=1), axis=0)
        keys = np.array([k for k in keys if tuple(k) not in truth], np.uint64).reshape(-1, 2)
        values = rng.integers(0, 1000, size=len(keys))
        index.add(keys, values)
        truth.update(zip(map(tuple, keys.tolist()), values.tolist()))
    probe = np.array([list(k) for k in list(truth)[:500]] + [[7, 1], [1, 2]], np.uint64)
    got, found = index.get(probe)
    expected = [truth.get(tuple(k)) for k in probe.tolist()]
    assert found.tolist() == [e is not None for e in expected]
    assert got.tolist() == [-1 if e is None else e for e in expected]
    assert len(index) == len(truth) and len(index.runs) <= 16
    index.put(probe[:3], np.array([5, 6, 7]))  # updates in place
    assert index.get(probe[:3])[0].tolist() == [5, 6, 7] and len(index) == len(truth)


# -- import_pairs ----------------------------------------------------------------------------------
def test_import_pairs_streams_bounded_batches_into_the_same_shards(tmp_path, monkeypatch):
    rows, n_bad = hh_rows(1000, 150)
    path = write_parquet_rows(tmp_path / "hh.parquet", rows)
    monkeypatch.setattr(shards, "LATE_BYTES", 50_000)  # rows for written shards go to disk past 50 kB
    whole = ImportPairs(path=str(path), on_error="quarantine").read()  # all at once, as before streaming
    reshard_whole(whole, tmp_path / "whole", 16)
    baseline = files(tmp_path / "whole")
    for batch in (1, 7, 1000):
        monkeypatch.setattr(readers, "BATCH_ROWS", batch)
        record = Recorder(monkeypatch)
        pipe = run_source(ImportPairs(path=str(path), on_error="quarantine"), tmp_path / f"w{batch}", 16)
        got = files(step_dir(pipe))
        assert got == baseline, batch  # byte for byte, whatever the batch size
        assert max(record.pieces) <= 2 * batch  # two response rows per pair: never the whole file
        assert max(record.held) <= 2 * 16 * 30 + 2 * batch  # at most a partial shard and a batch
        assert max(record.late_bytes) <= shards.LATE_BYTES
        monkeypatch.setattr(ShardWriter, "add", Recorder.real_add)
    table = shards.read_shards(sorted(step_dir(pipe).glob("shard-*.parquet")))
    assert table.num_rows == whole.table.num_rows > 2 * 800
    # a recurring prompt: all its pairs in one shard, next to each other, numbered 0, 1, 2 …
    owner = {}
    for shard in sorted(step_dir(pipe).glob("shard-*.parquet")):
        t = pl.from_arrow(pq.read_table(shard, columns=["prompt_id", "sample_index"]))
        for pid in t["prompt_id"].unique().to_list():
            assert owner.setdefault(pid, shard.name) == shard.name
        runs = t.with_columns(change=(pl.col("prompt_id") != pl.col("prompt_id").shift()).fill_null(True))
        assert runs["change"].sum() == t["prompt_id"].n_unique()
        per = t.group_by("prompt_id").agg(pl.col("sample_index").sort())
        assert all(v == list(range(len(v))) for v in per["sample_index"].to_list())
    assert max(pl.from_arrow(table).group_by("prompt_id").len()["len"]) > 10  # prompts recur many times
    quarantine = Pipeline([ImportPairs(path=str(path), on_error="quarantine")], workdir=tmp_path / "w1000",
                          shard_size=16).quarantine()
    assert quarantine.num_rows == n_bad and set(quarantine["reason"].to_pylist()) == {"prefix_mismatch"}
    counts = shards.shard_counts(step_dir(pipe) / "shard-00000.parquet")
    assert counts["rows_read"] == 1000 and counts["quarantined"] == n_bad
    assert counts["imported"] + counts["skipped_duplicate"] + n_bad == 1000


def test_import_pairs_limit_stops_reading_and_counts_do_not_depend_on_the_batch(tmp_path, monkeypatch):
    rows, _ = hh_rows(3000, 400)
    path = write_parquet_rows(tmp_path / "hh.parquet", rows)
    seen = []
    real = readers.iter_parquet

    def counting(p, batch_rows):
        for batch in real(p, batch_rows):
            seen.append(len(batch))
            yield batch

    monkeypatch.setattr(readers, "iter_parquet", counting)
    outs = {}
    for batch in (7, 1000):
        monkeypatch.setattr(readers, "BATCH_ROWS", batch)
        seen.clear()
        pipe = run_source(ImportPairs(path=str(path), on_error="quarantine", limit=100), tmp_path / f"l{batch}")
        outs[batch] = files(step_dir(pipe))
        assert sum(seen) < 100 + batch + 20  # stopped near the 100th pair, not at the end of the file
    assert outs[7] == outs[1000]
    counts = shards.shard_counts(step_dir(pipe) / "shard-00000.parquet")
    assert counts["imported"] == 100 and counts["rows_read"] < 130


# -- load_prompts and import_ratings --------------------------------------------------------------
def test_load_prompts_dedupes_across_batches_and_keeps_the_layout(tmp_path, monkeypatch):
    rng = random.Random(3)
    rows = [{"prompt": f"prompt {rng.randrange(300)}", "n": i} for i in range(2000)]
    rows[500]["prompt"] = ""
    path = write_parquet_rows(tmp_path / "p.parquet", rows)
    whole = LoadPrompts(path=str(path), on_error="quarantine").read()
    reshard_whole(whole, tmp_path / "whole", 10)
    for batch in (1, 7, 1000):
        monkeypatch.setattr(readers, "BATCH_ROWS", batch)
        pipe = run_source(LoadPrompts(path=str(path), on_error="quarantine"), tmp_path / f"w{batch}", 10)
        assert files(step_dir(pipe)) == files(tmp_path / "whole"), batch
    table = shards.read_shards(sorted(step_dir(pipe).glob("shard-*.parquet")))
    assert table.num_rows == len({r["prompt"] for r in rows if r["prompt"]}) and len(table["prompt_id"].unique()) == table.num_rows
    assert shards.shard_counts(step_dir(pipe) / "shard-00000.parquet") == {
        "rows_read": 2000, "duplicates": 2000 - 1 - table.num_rows, "quarantined_empty_prompt": 1, "quarantined": 1}


def test_import_ratings_aspects_seen_late_keep_one_column_order(tmp_path, monkeypatch):
    rows = []
    for j in range(300):
        ann = {"helpfulness": {"Rating": str(1 + j % 5)}}
        if j >= 200:
            ann["honesty"] = {"Rating": "3"}
        item = {"model": "m", "response": f"r{j}", "annotations": ann}
        if j >= 250:
            item["overall_score"] = 6.0
        rows.append({"instruction": f"q{j % 120}", "completions": [item]})
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = ImportRatings(path=str(path)).read()
    reshard_whole(whole, tmp_path / "whole", 8)
    monkeypatch.setattr(readers, "BATCH_BYTES", 500)  # a few rows per batch
    pipe = run_source(ImportRatings(path=str(path)), tmp_path / "w", 8)
    assert files(step_dir(pipe)) == files(tmp_path / "whole")
    names = pq.read_schema(step_dir(pipe) / "shard-00000.parquet").names
    assert names.index("score_original_overall") < names.index("score_original_helpfulness")
    assert names[-2:] == ["score_original_honesty", "rationale_original_honesty"]


# -- kill and resume, plan -------------------------------------------------------------------------
KILLED = """
import sys, time
from prefdata import readers, shards
from prefdata.pipeline import Pipeline
from prefdata.steps.import_pairs import ImportPairs
readers.BATCH_ROWS = 20
real = shards.ShardWriter.add
def slow(self, piece):
    real(self, piece)
    time.sleep(0.02)
shards.ShardWriter.add = slow
Pipeline([ImportPairs(path=sys.argv[1])], workdir=sys.argv[2], shard_size=4, progress=False, card=False).run()
"""


def test_kill_mid_stream_leaves_no_marker_and_the_rerun_is_complete(tmp_path):
    rows, _ = hh_rows(2000, 300)
    rows = [r for j, r in enumerate(rows) if j % 97 != 13]
    path = write_parquet_rows(tmp_path / "hh.parquet", rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path), str(tmp_path / "work")], env=env)
    pipe = Pipeline([ImportPairs(path=str(path))], workdir=tmp_path / "work", shard_size=4, progress=False, card=False)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(step_dir(pipe).glob("shard-*.parquet"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(step_dir(pipe).glob("shard-*.parquet")), "the run was killed before writing a shard"
    assert not (step_dir(pipe) / shards.MARKER).exists()  # written last: the step does not look finished
    assert pipe.plan()[0]["status"] == "compute"  # a source reads again from the start
    result = pipe.run()
    clean = Pipeline([ImportPairs(path=str(path))], workdir=tmp_path / "clean", shard_size=4, progress=False,
                     card=False)
    assert result.equals(clean.run())
    assert files(step_dir(pipe)) == files(step_dir(clean))
    assert pipe.plan()[0]["status"] == "cached"
