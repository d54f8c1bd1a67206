"""Shard files: how a step's output is laid out on disk, split and computed.

``<workdir>/<step>-<fingerprint>/shard-00042.parquet`` holds one shard (whole prompts);
``quarantine-00042.parquet`` holds the rows that shard rejected; ``_SUCCESS.json`` is the
completion marker, written last. Executors call ``compute_shard`` so a shard file is the
same whichever executor made it.

A source's or global step's table is split into shards by ``ShardWriter``, which takes the
table in pieces (a source's read batches) and writes each shard once it holds
``shard_size`` prompts, so a large input is never held whole; its shards are exactly those
``split_by_prompt`` makes of the whole table. A source's quarantine goes to
``quarantine-00000.parquet`` (then ``-00001`` … when it is large) and its counts to the
metadata of shard 0.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefdata.io import read_metadata, write_json, write_parquet
from prefdata.step import Output

MARKER = "_SUCCESS.json"
COUNTS_KEY = "prefdata_counts"

log = logging.getLogger(__name__)


def shard_path(step_dir: Path, index: int) -> Path:
    return step_dir / f"shard-{index:05d}.parquet"


def quarantine_path(step_dir: Path, index: int) -> Path:
    return step_dir / f"quarantine-{index:05d}.parquet"


def shard_files(step_dir: Path, n_shards: int) -> list[Path]:
    return [shard_path(step_dir, i) for i in range(n_shards)]


def read_marker(step_dir: Path) -> dict | None:
    path = step_dir / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def write_marker(step_dir: Path, info: dict) -> None:
    write_json(info, step_dir / MARKER)


def as_output(result) -> Output:
    """Normalise what a step returned (table, polars frame or Output) to an Output."""
    if isinstance(result, Output):
        out = result
    else:
        out = Output(table=result)
    if isinstance(out.table, pl.LazyFrame):
        out.table = out.table.collect()
    if isinstance(out.table, pl.DataFrame):
        out.table = out.table.to_arrow()
    if not isinstance(out.table, pa.Table):
        raise TypeError(f"a step must return a pyarrow Table, polars frame or Output, got {type(out.table)}")
    return out


def split_by_prompt(table: pa.Table, shard_size: int) -> list[pa.Table]:
    """Split into shards of ``shard_size`` prompts, keeping every prompt's rows together."""
    if table.num_rows == 0:
        return [table]
    if "prompt_id" not in table.column_names:
        return [table.slice(i, shard_size) for i in range(0, table.num_rows, shard_size)]
    ids = pl.from_arrow(table.select(["prompt_id"])).with_row_index("_row")
    order = ids.group_by("prompt_id", maintain_order=True).agg(pl.col("_row").min().alias("_first"))
    order = order.with_row_index("_rank").select("prompt_id", (pl.col("_rank") // shard_size).alias("_shard"))
    rows = ids.join(order, on="prompt_id", how="left").sort(["_shard", "_row"])
    shards = []
    for (_, ), part in rows.group_by("_shard", maintain_order=True):
        shards.append(table.take(pa.array(part["_row"].to_numpy())))
    return shards


def write_shard(step_dir: Path, index: int, out: Output, extra_counts: dict | None = None) -> dict:
    """Write the quarantine (if any) first, then the shard: its existence means done."""
    counts = dict(out.counts)
    counts.update(extra_counts or {})
    if out.quarantine is not None and out.quarantine.num_rows:
        write_parquet(out.quarantine, quarantine_path(step_dir, index))
        counts["quarantined"] = counts.get("quarantined", 0) + out.quarantine.num_rows
    write_parquet(out.table, shard_path(step_dir, index), metadata={COUNTS_KEY: counts})
    return counts


def compute_shard(step, in_path: Path, step_dir: Path, index: int, store=None) -> dict:
    """Run a map step on one shard file and write its output atomically.

    With a ``PromptStore`` the prompts it already holds are taken from it and the step
    runs on the others only; the shard is then assembled from the store, so its content
    never depends on which prompts were computed when.
    """
    table = pq.read_table(in_path)
    start = time.perf_counter()
    if store is not None and table.num_rows and "prompt_id" in table.column_names:
        counts = _compute_with_store(step, table, store, step_dir, index, start)
        if counts is not None:
            return counts
    out = as_output(step.process(table))
    counts = write_shard(step_dir, index, out, {"seconds": round(time.perf_counter() - start, 3)})
    return counts


def _compute_with_store(step, table: pa.Table, store, step_dir: Path, index: int, start: float) -> dict | None:
    """Compute the prompts the store lacks, store them, write the shard from the store.

    Returns None (compute the shard as a whole) when the output cannot be attributed to
    prompts; that is logged, not silent.
    """
    from prefdata.prompt_store import prompt_keys

    keys = prompt_keys(table)
    known = store.known(keys["key"].to_list())
    fresh = keys.filter(~pl.col("key").is_in(list(known)))
    counts: dict = {}
    if fresh.height:
        sub = table if not known else table.filter(pc.is_in(
            table["prompt_id"], value_set=fresh["prompt_id"].to_arrow()))
        out = as_output(step.process(sub))
        try:
            store.write_part(out, fresh, out.counts)
        except ValueError as exc:
            log.warning("step %s: results not stored per prompt (%s); computing shard %d as a whole",
                        step.name, exc, index)
            if known:
                return None
            return write_shard(step_dir, index, out, {"seconds": round(time.perf_counter() - start, 3)})
    rows, quarantine, reused_counts = store.assemble(keys)
    for k, v in reused_counts.items():
        counts[k] = counts.get(k, 0) + v
    counts.update(prompts_computed=fresh.height, prompts_reused=keys.height - fresh.height,
                  seconds=round(time.perf_counter() - start, 3))
    return write_shard(step_dir, index, Output(rows, quarantine, counts))


def shard_counts(path: Path) -> dict:
    return read_metadata(path, COUNTS_KEY) or {}


def num_rows(paths: list[Path]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def read_shards(paths: list[Path]) -> pa.Table:
    tables = [pq.read_table(p) for p in paths]
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


# -- streaming: shards written while a table arrives in pieces --------------------------------
LATE_DIR = "_late"
LATE_BYTES = 128 << 20  # rows for already written shards held in memory before they go to disk
QUARANTINE_ROWS = 100_000  # quarantined rows per quarantine file


def hash128(frame: pl.DataFrame) -> np.ndarray:
    """A 128-bit key per row: two seeded 64-bit row hashes, an ``(n, 2)`` uint64 array.
    Stable within one polars version only, so keys live in memory for one run, never stored."""
    return np.stack([frame.hash_rows(seed=0).to_numpy(), frame.hash_rows(seed=1).to_numpy()], axis=1)


class KeyIndex:
    """A growing map from 128-bit keys (``hash128``) to int64 values: 24 bytes a key, no
    Python object per key, so a stream of millions of prompts can be remembered.

    Sorted runs (by the key's first half, searched with ``searchsorted`` on uint64), merged
    when a newer one is as large as the one before: a binary counter, so about
    log2(keys / batch) runs and each key copied about that many times.
    """

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (first half sorted, second half, value)

    def __len__(self) -> int:
        return sum(len(h) for h, _, _ in self.runs)

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(run, position) of each key; run -1 where the key is absent."""
        run = np.full(len(keys), -1, np.int64)
        pos = np.zeros(len(keys), np.int64)
        for r, (h, lo, _) in enumerate(self.runs):
            at = np.searchsorted(h, keys[:, 0])
            idx = np.flatnonzero((run < 0) & (at < len(h)))
            while len(idx):  # more than once only where two keys share a first half
                a = at[idx]
                same = h[a] == keys[idx, 0]
                hit = same & (lo[a] == keys[idx, 1])
                run[idx[hit]], pos[idx[hit]] = r, a[hit]
                idx = idx[same & ~hit]
                at[idx] += 1
                idx = idx[at[idx] < len(h)]
        return run, pos

    def get(self, keys: np.ndarray, default: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(values, found) for ``keys``; ``default`` where a key is absent."""
        run, pos = self._locate(keys)
        values = np.full(len(keys), default, np.int64)
        for r, (_, _, v) in enumerate(self.runs):
            hit = run == r
            values[hit] = v[pos[hit]]
        return values, run >= 0

    def put(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Set ``keys`` (unique) to ``values``: existing keys are updated, new ones added."""
        run, pos = self._locate(keys)
        values = np.asarray(values, np.int64)
        for r, (_, _, v) in enumerate(self.runs):
            hit = run == r
            v[pos[hit]] = values[hit]
        self.add(keys[run < 0], values[run < 0])

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add ``keys`` that are not in the index yet (not checked)."""
        if not len(keys):
            return
        order = np.argsort(keys[:, 0], kind="stable")
        self.runs.append((keys[order, 0], keys[order, 1], np.asarray(values, np.int64)[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= len(self.runs[-1][0]):
            newer, older = self.runs.pop(), self.runs.pop()
            h, lo, v = (np.concatenate([a, b]) for a, b in zip(older, newer))
            order = np.argsort(h, kind="stable")  # two sorted runs: a linear merge
            self.runs.append((h[order], lo[order], v[order]))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, order and types (columns it lacks are null), as
    concatenating it with the other pieces would have made it."""
    if table.schema.equals(schema):
        return table
    if table.num_columns:
        table = pa.concat_tables([schema.empty_table(), table], promote_options="permissive")
    else:
        table = schema.empty_table() if not table.num_rows else pa.table(
            [pa.nulls(table.num_rows, f.type) for f in schema], schema=schema)
    table = table.select(schema.names)
    return table if table.schema.equals(schema) else table.cast(schema)


def group_prompts(table: pa.Table) -> pa.Table:
    """Rows of a prompt together, prompts in first-seen order, rows in order within a prompt."""
    if "prompt_id" not in table.column_names or table.num_rows < 2:
        return table
    ids = pl.from_arrow(table.select(["prompt_id"])).with_row_index("_row")
    order = ids.with_columns(pl.col("_row").min().over("prompt_id").alias("_first")).sort(["_first", "_row"])
    rows = order["_row"].to_numpy()
    return table if bool((np.diff(rows.astype(np.int64)) == 1).all()) else table.take(pa.array(rows))


def collect(pieces: Iterable, adjacent: bool = False, final_schema: Callable | None = None) -> Output:
    """The pieces of a stream as one Output (``Source.read``): tables concatenated with the
    final schema, counts added up, quarantines concatenated."""
    tables, quarantine, counts = [], [], {}
    for piece in pieces:
        out = as_output(piece)
        for k, v in out.counts.items():
            counts[k] = counts.get(k, 0) + v
        if out.quarantine is not None and out.quarantine.num_rows:
            quarantine.append(out.quarantine)
        if out.table.num_columns or out.table.num_rows:
            tables.append(out.table)
    table = pa.concat_tables(tables, promote_options="permissive").combine_chunks() if tables else pa.table({})
    table = conform(table, (final_schema or _same)(table.schema))
    table = group_prompts(table) if adjacent else table
    return Output(table, pa.concat_tables(quarantine, promote_options="permissive") if quarantine else None, counts)


def _same(schema: pa.Schema) -> pa.Schema:
    return schema


def clear_step_dir(step_dir: Path) -> None:
    """Remove the shards, quarantine and set-aside rows a killed run may have left."""
    for pattern in ("shard-*.parquet", "quarantine-*.parquet"):
        for path in step_dir.glob(pattern):
            path.unlink()
    shutil.rmtree(step_dir / LATE_DIR, ignore_errors=True)


class ShardWriter:
    """Writes a table that arrives in pieces as shards of ``shard_size`` whole prompts.

    The shards equal ``split_by_prompt`` of the whole table, whatever the pieces' sizes:
    prompts are numbered in first-seen order (``KeyIndex``: prompt key -> rank) and prompt
    ``r`` goes to shard ``r // shard_size``; rows keep their stream order within a shard,
    or (``adjacent``) stay next to the prompt's other rows. A shard is written as soon as
    its last prompt is seen. Rows that come later for a prompt whose shard is written are
    set aside (in memory, on disk under ``_late/`` past ``LATE_BYTES``) and merged into
    their shards by ``close``, which also gives every shard the final schema (columns a
    late piece adds, types a later piece widens) and writes the counts into shard 0. The
    step's marker, written by the caller after ``close``, is what says "finished".
    """

    def __init__(self, step_dir: Path, shard_size: int, adjacent: bool = False,
                 final_schema: Callable[[pa.Schema], pa.Schema] | None = None):
        self.dir, self.size, self.adjacent = Path(step_dir), shard_size, adjacent
        self.final_schema = final_schema or _same
        self.dir.mkdir(parents=True, exist_ok=True)
        clear_step_dir(self.dir)
        self.index = KeyIndex()
        self.prompts = self.seq = self.written = 0
        self.schema: pa.Schema | None = None
        self.schemas: list[pa.Schema] = []  # of each written shard
        self.pending: list[tuple[pa.Table, pl.DataFrame]] = []  # rows of shards not yet written
        self.late: list[pa.Table] = []
        self.late_bytes, self.spills, self.late_rows = 0, [], {}  # late_rows: shard -> rows set aside
        self.counts: dict = {}
        self.quarantine: list[pa.Table] = []
        self.quarantine_files = self.quarantined = 0

    # -- taking pieces -------------------------------------------------------------------
    def add(self, piece) -> None:
        out = as_output(piece)
        for k, v in out.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if out.quarantine is not None and out.quarantine.num_rows:
            self._add_quarantine(out.quarantine)
        table = out.table
        if not (table.num_columns or table.num_rows):
            return
        self.schema = table.schema if self.schema is None else pa.unify_schemas(
            [self.schema, table.schema], promote_options="permissive")
        if table.num_rows:
            self._place(table)
            self._write_full(self.prompts // self.size)

    def _place(self, table: pa.Table) -> None:
        """Give each row its prompt's rank; queue it, or set it aside for a written shard."""
        n = table.num_rows
        seq = np.arange(self.seq, self.seq + n, dtype=np.int64)
        self.seq += n
        if "prompt_id" in table.column_names:
            ids = pl.from_arrow(table.select(["prompt_id"]))
            uniq = ids.unique(maintain_order=True).with_row_index("_u")
            keys = hash128(uniq.select("prompt_id"))
            ranks, found = self.index.get(keys)
            fresh = ~found
            ranks[fresh] = np.arange(self.prompts, self.prompts + int(fresh.sum()))
            self.prompts += int(fresh.sum())
            self.index.add(keys[fresh], ranks[fresh])
            at = ids.join(uniq, on="prompt_id", how="left", nulls_equal=True, maintain_order="left")["_u"].to_numpy()
            rank = ranks[at]
        else:  # no prompts: every row is one
            rank = seq
            self.prompts += n
        shard = rank // self.size
        meta = pl.DataFrame({"_shard": shard, "_rank": rank, "_seq": seq})
        late = shard < self.written
        if late.any():
            self._add_late(table.filter(pa.array(late)), meta.filter(pl.Series(late)))
            table, meta = table.filter(pa.array(~late)), meta.filter(pl.Series(~late))
        if table.num_rows:
            self.pending.append((table, meta))

    def _write_full(self, upto: int) -> None:
        """Write the queued shards below ``upto`` (all their prompts seen)."""
        if upto <= self.written or not self.pending:
            return
        table = pa.concat_tables([t for t, _ in self.pending], promote_options="permissive")
        order = ["_shard", "_rank", "_seq"] if self.adjacent else ["_shard", "_seq"]
        meta = pl.concat([m for _, m in self.pending]).with_row_index("_i").sort(order)
        bounds = np.searchsorted(meta["_shard"].to_numpy(), np.arange(self.written, upto + 1))
        rows = meta["_i"].to_numpy()
        breaks = np.concatenate([[0], np.cumsum(np.diff(rows) != 1)])  # where the order is not row after row
        for j, index in enumerate(range(self.written, upto)):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if breaks[b - 1] == breaks[a]:  # the shard's rows are a run of the batch: no copy
                part = table.slice(int(rows[a]), b - a)
            else:  # (take on a table of several chunks would combine them at every call)
                table = table.combine_chunks() if table.column(0).num_chunks > 1 else table
                part = table.take(pa.array(rows[a:b]))
            write_shard(self.dir, index, Output(part))
            self.schemas.append(part.schema)
        rest = rows[int(bounds[-1]):]  # copied (a slice would keep the whole batch alive)
        self.pending = [(table.take(pa.array(rest)), meta[int(bounds[-1]):].drop("_i"))] if len(rest) else []
        self.written = upto

    def _add_late(self, table: pa.Table, meta: pl.DataFrame) -> None:
        table = table.append_column("_shard", pa.array(meta["_shard"].to_numpy())).append_column(
            "_seq", pa.array(meta["_seq"].to_numpy()))
        for shard, count in meta.group_by("_shard").len().iter_rows():
            self.late_rows[shard] = self.late_rows.get(shard, 0) + count
        self.late.append(table)
        self.late_bytes += table.nbytes
        if self.late_bytes > LATE_BYTES:
            self._spill()

    def _spill(self) -> None:
        if not self.late:
            return
        table = pa.concat_tables(self.late, promote_options="permissive").sort_by([("_shard", "ascending"),
                                                                                    ("_seq", "ascending")])
        path = self.dir / LATE_DIR / f"late-{len(self.spills):05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(table, path, row_group_size=16_384)
        self.spills.append((path, table.schema))
        self.late, self.late_bytes = [], 0

    def _add_quarantine(self, table: pa.Table) -> None:
        self.quarantine.append(table)
        self.quarantined += table.num_rows
        if sum(t.num_rows for t in self.quarantine) >= QUARANTINE_ROWS:
            self._flush_quarantine()

    def _flush_quarantine(self) -> None:
        if self.quarantine:
            write_parquet(pa.concat_tables(self.quarantine, promote_options="permissive"),
                          quarantine_path(self.dir, self.quarantine_files))
            self.quarantine_files += 1
            self.quarantine = []

    # -- finishing -------------------------------------------------------------------------
    def close(self) -> int:
        """Write what is left, merge the set-aside rows, conform every shard; the shard count."""
        self._write_full(-(-self.prompts // self.size))
        schema = self.final_schema(self.schema if self.schema is not None else pa.schema([]))
        if self.written == 0:  # an empty table is one empty shard
            write_shard(self.dir, 0, Output(schema.empty_table()))
            self.schemas, self.written = [schema], 1
        redo = {0} | set(self.late_rows) | {k for k, s in enumerate(self.schemas) if not s.equals(schema)}
        for index, late in self._late_groups(sorted(redo)):
            written = self.schemas[index]  # read back as written (parquet renames list items)
            table = pq.read_table(shard_path(self.dir, index), schema=written)
            table = table.replace_schema_metadata(_without_counts(table.schema.metadata))
            if late is not None:
                table = pa.concat_tables([table, late.drop_columns(["_shard", "_seq"])], promote_options="permissive")
                table = group_prompts(table) if self.adjacent else table
            counts = dict(self.counts) if index == 0 else {}
            if index == 0 and self.quarantined:
                counts["quarantined"] = counts.get("quarantined", 0) + self.quarantined
            write_shard(self.dir, index, Output(conform(table, schema), None, counts))
        self._flush_quarantine()
        shutil.rmtree(self.dir / LATE_DIR, ignore_errors=True)
        return self.written

    def _late_groups(self, shards: list[int]):
        """(shard, its set-aside rows or None), reading the spilled rows a range at a time."""
        if self.spills:
            self._spill()
        avg = max(1, sum(p.stat().st_size for p, _ in self.spills) // max(1, sum(self.late_rows.values())))
        chunk: list[int] = []
        rows = 0
        for index in shards + [None]:
            if index is not None:
                chunk.append(index)
                rows += self.late_rows.get(index, 0)
                if rows * avg < LATE_BYTES // 2:
                    continue
            if chunk:
                yield from self._late_chunk(chunk)
            chunk, rows = [], 0

    def _late_chunk(self, shards: list[int]):
        lo, hi = shards[0], shards[-1]
        parts = list(self.late)
        for path, schema in self.spills:
            parts.append(pq.read_table(path, schema=schema, filters=[("_shard", ">=", lo), ("_shard", "<=", hi)]))
        parts = [p for p in parts if p.num_rows]
        late = pa.concat_tables(parts, promote_options="permissive").sort_by(
            [("_shard", "ascending"), ("_seq", "ascending")]) if parts else None
        if late is not None:
            starts = np.searchsorted(late["_shard"].to_numpy(), np.array(shards + [hi + 1]))
        for j, index in enumerate(shards):
            n = 0 if late is None else int(starts[j + 1] - starts[j])
            yield index, late.slice(int(starts[j]), n) if n else None


def _without_counts(metadata: dict | None) -> dict | None:
    if not metadata:
        return None
    rest = {k: v for k, v in metadata.items() if k != COUNTS_KEY.encode()}
    return rest or None
