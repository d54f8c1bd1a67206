"""Shard files: how a step's output is laid out on disk, split and computed.

``<workdir>/<step>-<fingerprint>/shard-00042.parquet`` holds one shard (whole prompts);
``quarantine-00042.parquet`` holds the rows that shard rejected; ``_SUCCESS.json`` is the
completion marker, written last. Executors call ``compute_shard`` so a shard file is the
same whichever executor made it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

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
    if store is not None and table.num_rows:
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
