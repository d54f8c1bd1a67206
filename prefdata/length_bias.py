"""How much a pair table's labels follow response length.

Longer answers win preference labels more often than their quality warrants, and a
policy trained on such pairs learns verbosity (the motivation of Liu et al. 2024, "Length
Desensitization in Direct Preference Optimization", and of many length-controlled
evaluations). This report makes the bias visible for any pair table: the share of pairs
whose chosen response is longer (0.5 means length tells nothing), the share of equal
lengths, the mean length difference, and the Pearson correlation of the length
difference (chosen − rejected) with the pair's ``margin``. Lengths are characters of the
response text (the last message of a conversational pair, or the string of a standard
one), so the report needs no tokenizer and compares across models.
"""

from __future__ import annotations

import math

import polars as pl

FIELDS = ("length_pairs", "chosen_longer_share", "same_length_share", "length_diff_mean", "length_margin_corr")


def response_length(frame_schema: pl.Schema, column: str) -> pl.Expr:
    """Characters of a pair side: the last message's content, or the text itself."""
    dtype = frame_schema[column]
    if isinstance(dtype, pl.List):
        return pl.col(column).list.last().struct.field("content").str.len_chars().cast(pl.Int64)
    return pl.col(column).cast(pl.String).str.len_chars().cast(pl.Int64)  # signed: differences go negative


def length_bias(frame: pl.LazyFrame | pl.DataFrame) -> dict:
    """The report as a flat dict (see ``FIELDS``); values are None where they cannot be computed."""
    frame = frame.lazy()
    schema = frame.collect_schema()
    if "chosen" not in schema or "rejected" not in schema:
        raise ValueError(f"length bias: a pair table needs 'chosen' and 'rejected' columns, got {schema.names()}")
    diff = (response_length(schema, "chosen") - response_length(schema, "rejected")).cast(pl.Float64)
    exprs = [diff.is_not_null().sum().alias("n"), (diff > 0).sum().alias("longer"), (diff == 0).sum().alias("same"),
             diff.mean().alias("mean")]
    if "margin" in schema:
        exprs.append(pl.corr(diff, pl.col("margin").cast(pl.Float64), method="pearson").alias("corr"))
    row = frame.select(exprs).collect().row(0, named=True)
    n = int(row["n"] or 0)
    corr = row.get("corr")
    return {
        "length_pairs": n,
        "chosen_longer_share": row["longer"] / n if n else None,
        "same_length_share": row["same"] / n if n else None,
        "length_diff_mean": row["mean"],
        "length_margin_corr": None if corr is None or math.isnan(corr) else float(corr),
    }


def length_bias_lines(frame: pl.LazyFrame, columns: list[str]) -> list[str]:
    """The report as dataset-card lines (nothing for a table that is not a pair table)."""
    if "chosen" not in columns or "rejected" not in columns:
        return []
    report = length_bias(frame)
    n = report["length_pairs"]
    if not n:
        return []
    text = (f"- Length bias: the chosen response is longer in {report['chosen_longer_share']:.1%} of {n} pairs "
            f"(equal length in {report['same_length_share']:.1%}; 50% would mean length does not predict the "
            f"label), {report['length_diff_mean']:+.1f} characters on average")
    corr = report["length_margin_corr"]
    if corr is not None:
        text += f"; correlation of the length difference with the margin: {corr:+.3f}"
    return [text + "."]
