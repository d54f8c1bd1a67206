"""A pair table's length-bias report, in the run summary (``prefdata.length_bias``).

A global step that passes its table through unchanged and records the report as its
metadata (``chosen_longer_share``, ``length_margin_corr`` …), so ``prefdata run`` prints
it and ``summary.json`` keeps it; the dataset card computes the same report from the data
for every pair table.
"""

from __future__ import annotations

import polars as pl

from prefdata.length_bias import length_bias
from prefdata.pairs import to_arrow
from prefdata.step import GlobalStep, Output


class LengthBias(GlobalStep):
    """Leaves the pairs as they are; ``metadata`` holds the length-bias report."""

    name = "length_bias"
    Config = None

    def input_columns(self) -> list[str]:
        return ["chosen", "rejected"]

    def process(self, frame: pl.LazyFrame) -> Output:
        self.metadata = length_bias(frame)
        df = frame.collect()
        diff_counts = {"length_pairs": self.metadata["length_pairs"]}
        return Output(to_arrow(df), counts=diff_counts)
