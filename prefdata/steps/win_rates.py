"""Each response's estimated win probability against the policy that sampled it (SPPO).

With N samples y_1..y_N of one prompt from the current policy π_t and a score s (any
scorer: reward model, CDR, judge), the probability that y_i beats a fresh sample of π_t is
estimated by the Bradley–Terry form averaged over the prompt's other samples:

    P̂(y_i ≻ π_t | x) = 1/(N−1) Σ_{j≠i} σ((s_i − s_j) / scale)

This is the quantity SPPO regresses the log-ratio on (``loss: sppo`` in the trainer).
Wu et al., "Self-Play Preference Optimization for Language Model Alignment", 2024: the
paper estimates P(y_i ≻ y_j) with the PairRM preference model over K = 5 samples; here
σ of a score difference stands in for that pairwise model (a pairwise judge's verdicts are
not read yet). A prompt with a single scored response has no opponent: its ``win_prob``
is null and counted as ``no_opponent``; a response without a score gets a null too
(``unscored``), and is not anyone's opponent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import polars as pl
import pyarrow as pa

from prefdata.step import MapStep, Output


@dataclass
class WinRatesConfig:
    score: str = "score_cdr"   # the score column whose differences give the pairwise estimate
    scale: float = 1.0         # σ((s_i − s_j) / scale): the score units of one logit


class WinRates(MapStep):
    """``win_prob`` = mean over the prompt's other responses of σ(score difference / scale)."""

    name: ClassVar[str] = "win_rates"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = WinRatesConfig

    def check(self) -> None:
        if self.config.scale <= 0:
            raise ValueError(f"win_rates: option 'scale' must be > 0, got {self.config.scale}")
        if not self.config.score.startswith("score_"):
            raise ValueError(f"win_rates: option 'score' must name a score column (score_<name>), "
                             f"got '{self.config.score}'")

    def input_columns(self) -> list[str]:
        return ["prompt_id", "response_id", self.config.score]

    def output_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c != "win_prob"] + ["win_prob"]

    def process(self, table: pa.Table) -> Output:
        frame = pl.from_arrow(table)
        if "win_prob" in frame.columns:
            frame = frame.drop("win_prob")
        probs = win_probabilities(frame, self.config.score, self.config.scale)
        out = frame.with_row_index("_row").join(probs, on="_row", how="left").sort("_row").drop("_row")
        counts = {
            "unscored": int(frame[self.config.score].is_null().sum()),
            "no_opponent": int(out["win_prob"].is_null().sum()) - int(frame[self.config.score].is_null().sum()),
        }
        return Output(out.to_arrow(), counts={k: v for k, v in counts.items() if v})


def win_probabilities(frame: pl.DataFrame, score: str, scale: float) -> pl.DataFrame:
    """``_row`` (the row index in ``frame``) and ``win_prob``, for the scored rows."""
    scored = (frame.select("prompt_id", score).with_row_index("_row")
              .filter(pl.col(score).is_not_null() & pl.col(score).is_finite()))
    opponents = scored.select(pl.col("prompt_id"), pl.col("_row").alias("_other"), pl.col(score).alias("_s_other"))
    pairs = scored.join(opponents, on="prompt_id").filter(pl.col("_row") != pl.col("_other"))
    diff = (pl.col(score) - pl.col("_s_other")) / scale
    return (pairs.with_columns((1.0 / (1.0 + (-diff).exp())).alias("win_prob"))
            .group_by("_row").agg(pl.col("win_prob").mean())
            .with_columns(pl.col("_row").cast(pl.UInt32)))
