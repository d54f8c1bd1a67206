"""Curry-DPO: several pairs per prompt, trained from easy (large gap) to hard, in iterations.

Pattnaik et al. 2024, "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked
Preferences" (Findings of EMNLP 2024). With n responses per prompt the reference builds
n − 1 pairs with the best response as chosen and each other response as rejected
(``build_pairs`` with ``strategy: best_vs_worst`` and ``pairs_per_prompt: n − 1``), ranks
each prompt's pairs by the score gap — the widest gap is the easiest — and trains one
DPO iteration per rank, each iteration starting from the previous one's model (and
using it as the reference).

This global step writes ``curriculum_rank`` (0 = the prompt's easiest pair), ``iteration``
and ``curriculum_order`` (the position in training order). By default iteration = rank,
as in the reference; ``iterations: k`` spreads each prompt's pairs over k iterations
proportionally (iteration = ⌊rank · k / n_pairs⌋), so a prompt with fewer pairs still
starts easy and ends hard. Within an iteration the order is a seeded shuffle (a stable
hash of pair_id), or the widest gap first with ``within: gap``. ``by: strength`` orders by
the ensemble's preference strength (from the ``noise`` step) instead of the margin.
The pipeline stores shards by prompt, so a trainer must sort by ``curriculum_order``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from prefdata.pairs import fmix64, hash64, to_arrow
from prefdata.step import GlobalStep, Output

COLUMNS = ("curriculum_rank", "iteration", "curriculum_order")


@dataclass
class CurriculumConfig:
    by: str = "margin"  # or strength
    iterations: int | None = None  # default: one iteration per rank (the reference)
    within: str = "shuffle"  # or gap
    seed: int = 0


class Curriculum(GlobalStep):
    """Orders each prompt's pairs from the widest gap (easy) to the narrowest (hard)."""

    name = "curriculum"
    Config = CurriculumConfig

    def check(self) -> None:
        c = self.config
        if c.by not in ("margin", "strength"):
            raise ValueError(f"curriculum: by must be 'margin' or 'strength', got '{c.by}'")
        if c.within not in ("shuffle", "gap"):
            raise ValueError(f"curriculum: within must be 'shuffle' or 'gap', got '{c.within}'")
        if c.iterations is not None and c.iterations < 1:
            raise ValueError(f"curriculum: iterations must be >= 1, got {c.iterations}")

    def input_columns(self) -> list[str]:
        return ["pair_id", "prompt_id", self.config.by]

    def output_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c not in COLUMNS] + list(COLUMNS)

    def process(self, frame: pl.LazyFrame) -> Output:
        df = curriculum(frame.collect(), self.config)
        sizes = df.group_by("iteration").len().sort("iteration")
        self.metadata = {"by": self.config.by, "iterations": int(df["iteration"].max() + 1) if df.height else 0,
                         "pairs_per_iteration": sizes["len"].to_list()}
        return Output(to_arrow(df), counts={"iterations": self.metadata["iterations"]})


def curriculum(df: pl.DataFrame, cfg: CurriculumConfig) -> pl.DataFrame:
    df = df.drop([c for c in COLUMNS if c in df.columns]).with_row_index("_i")
    shuffle = fmix64(hash64(df["pair_id"]) ^ fmix64(np.uint64(cfg.seed)))
    df = df.with_columns(_gap=pl.col(cfg.by).fill_nan(None).fill_null(float("-inf")), _shuffle=pl.Series(shuffle))
    df = df.sort(["prompt_id", "_gap", "pair_id"], descending=[False, True, False]).with_columns(
        curriculum_rank=pl.int_range(pl.len(), dtype=pl.Int64).over("prompt_id"),
        _n=pl.len().over("prompt_id").cast(pl.Int64),
    )
    iteration = pl.col("curriculum_rank") if cfg.iterations is None else (
        pl.col("curriculum_rank") * cfg.iterations // pl.col("_n"))
    df = df.with_columns(iteration=iteration.cast(pl.Int64))
    if cfg.within == "shuffle":
        df = df.sort(["iteration", "_shuffle"])
    else:
        df = df.sort(["iteration", "_gap", "pair_id"], descending=[False, True, False])
    df = df.with_columns(curriculum_order=pl.int_range(pl.len(), dtype=pl.Int64))
    return df.sort("_i").drop("_i", "_gap", "_shuffle", "_n")
