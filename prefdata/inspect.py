"""A readable summary of a parquet file or folder: schema, rows, samples, score stats."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(".") and "quarantine" not in p.name)
        if files:
            return files
    raise FileNotFoundError(f"{path}: no parquet file here")


def describe(path: Path, rows: int = 3) -> str:
    files = parquet_files(path)
    schema = pq.read_schema(files[0])
    frame = pl.scan_parquet(files)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    out = [f"{path}: {n} rows in {len(files)} file(s)", "", "schema:"]
    out += [f"  {f.name}: {f.type}" for f in schema]
    numeric = [f.name for f in schema if f.name.startswith("score_") or f.name in
               {"margin", "strength", "flip_prob", "ches"}]
    numeric = [c for c in numeric if pl.datatypes.is_polars_dtype(frame.collect_schema()[c])
               and frame.collect_schema()[c].is_numeric()]
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
