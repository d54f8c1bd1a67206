"""Atomic parquet, JSON and text writes: a temp file in the same folder, then a rename.

A run killed at any moment never leaves a half-written file under a final name. The temp
file is created private (``mkstemp`` makes it 0600) and given the mode a plain ``open``
would have given it (0666 less the umask) before the rename, so finished files are
readable like any other file the user writes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (no thread race)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX (Windows has no mode bits to fix)
            os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def write_parquet(table: pa.Table, path: str | Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


ROW_GROUP_ROWS = 100_000  # rows per row group of a concatenated output (readers batch by row group)


def write_parquet_files(files: list[Path], path: str | Path, metadata: dict | None = None,
                        row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Concatenate parquet files into one, atomically, holding at most about
    ``row_group_rows`` rows in memory; returns the row count.

    A run's output of millions of rows is written without being loaded whole. Small shards
    are gathered into row groups of ``row_group_rows`` (a row group per 64-prompt shard
    would make readers such as ``datasets`` take tiny batches; an empty one makes them
    fail). Schemas are unified as ``concat_tables`` would (``permissive``: a column that is
    all-null in one shard takes the other shards' type).
    """
    path = Path(path)
    schemas = [pq.read_schema(f).remove_metadata() for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    if metadata:
        schema = schema.with_metadata({k.encode(): json.dumps(v).encode() for k, v in metadata.items()})
    tmp, rows, pending = _tmp_path(path), 0, []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for f in files:
                table = _conform(pq.read_table(f), schema)
                if table.num_rows:
                    pending.append(table)
                    rows += table.num_rows
                if sum(t.num_rows for t in pending) >= row_group_rows:
                    writer.write_table(pa.concat_tables(pending), row_group_size=max(row_group_rows, 1) * 2)
                    pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=max(row_group_rows, 1) * 2)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order (missing ones all null) and types."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD", re.I)


def redact(text: str) -> str:
    """Replace the value of every secret-looking environment variable found in ``text``."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and value and len(value) >= 6 and value in text:
            text = text.replace(value, "***")
    return text


def write_json(obj, path: str | Path, redact_secrets: bool = False, sort_keys: bool = False) -> Path:
    """Keys stay in their insertion order by default: a recipe saved in a summary reads back
    in the order its author wrote it (the dataset card shows it)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str)
    return write_text(redact(text) if redact_secrets else text, path)


def write_text(text: str | bytes, path: str | Path) -> Path:
    """Atomically write text (or bytes: a rendered PNG)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


STEP_METADATA = "prefdata_step:"  # + step name: that step's metadata (e.g. noise's ε) in the output parquet


def step_metadata(summary: dict) -> dict:
    """Key-value metadata for a run's output parquet: each step's metadata under
    ``prefdata_step:<name>``, so what a global step measured (ε and its standard error)
    travels with the data file itself."""
    out = {}
    for s in summary.get("steps", []):
        if s.get("metadata"):
            out[STEP_METADATA + s["step"]] = json.loads(json.dumps(s["metadata"], default=str))
    return out


def read_metadata(path: str | Path, key: str):
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(key.encode())
    return json.loads(raw) if raw is not None else None
