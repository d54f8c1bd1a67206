"""A readable summary of a parquet file or folder: schema, rows, samples, score stats.

A folder whose files share one schema (a step's shards, a Hub ``data/`` folder) is read as
one table; files with different schemas (``pairs.parquet`` beside ``pairs_human.parquet``
after a pull) are described one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

SCORE_COLUMNS = {"margin", "strength", "flip_prob", "ches"}


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(".") and "quarantine" not in p.name)
        if files:
            return files
        raise FileNotFoundError(f"{path}: no parquet file in this folder")
    raise FileNotFoundError(f"{path}: no such file or folder")


def read_schema(path: Path) -> pa.Schema:
    """The file's schema, or an error naming the file when it is not parquet."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a parquet file ({exc}); give a .parquet file or a folder of them") from None


def describe(path: Path, rows: int = 3) -> str:
    path = Path(path)
    files = parquet_files(path)
    groups: dict[str, list[Path]] = {}
    schemas: dict[str, pa.Schema] = {}
    for f in files:
        schema = read_schema(f).remove_metadata()
        key = schema.to_string()
        groups.setdefault(key, []).append(f)
        schemas[key] = schema
    if len(groups) == 1:
        (key, group), = groups.items()
        return _describe_group(str(path), group, schemas[key], rows)
    parts = [f"{path}: {len(files)} files with {len(groups)} different schemas; each described on its own"]
    for key, group in groups.items():
        for f in group:
            parts.append(_describe_group(str(f), [f], schemas[key], rows))
    return "\n\n".join(parts)


def _describe_group(label: str, files: list[Path], schema: pa.Schema, rows: int) -> str:
    frame = pl.scan_parquet(files)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    out = [f"{label}: {n} rows in {len(files)} file(s)", "", "schema:"]
    out += [f"  {f.name}: {f.type}" for f in schema]
    frame_schema = frame.collect_schema()
    numeric = [f.name for f in schema if f.name.startswith("score_") or f.name in SCORE_COLUMNS]
    numeric = [c for c in numeric if frame_schema[c].is_numeric()]
    if numeric:
        stats = frame.select(
            [pl.struct(
                pl.col(c).count().alias("count"), pl.col(c).mean().alias("mean"),
                pl.col(c).std().alias("std"), pl.col(c).min().alias("min"), pl.col(c).max().alias("max"),
            ).alias(c) for c in numeric]
        ).collect().row(0, named=True)
        out += ["", "scores:"]
        for c in numeric:
            s = stats[c]
            out.append(f"  {c}: n={s['count']} mean={_f(s['mean'])} std={_f(s['std'])} min={_f(s['min'])} max={_f(s['max'])}")
    out += ["", f"first {rows} row(s):"]
    for row in frame.head(rows).collect().to_dicts():
        out.append("  " + _short(json.dumps(row, ensure_ascii=False, default=str), 400))
    return "\n".join(out)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
