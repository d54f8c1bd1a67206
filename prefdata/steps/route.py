"""Route pairs to human or AI annotation within a budget (a global step).

Annotator time is scarce, so it goes where the AI label is least trustworthy. Each
strategy gives every pair a ``route_score`` (higher = more in need of a human); the
``budget`` highest-scoring pairs get ``route = human``, the rest ``route = ai``:

* ``flip_prob``: the probability that the AI label is flipped (from an ensemble, noise step).
* ``strength``: the smallest |preference strength| first (close calls).
* ``judge_disagreement``: a pairwise judge that disagrees with itself when the two
  responses swap positions. ``judge_column`` holds agreement, as a bool or a rate in
  [0, 1]; the score is 1 − agreement.
* ``hybrid``: a linear gain over pair features after Miranda et al. 2024, "Hybrid
  Preferences: Learning to Route Instances for Human vs. AI Feedback" (HyPER), whose
  performance-prediction model is linear in instance features; here three lexical
  features of a pair: the length difference of the two responses (relative, in words),
  the prompt length (log words) and the lexical similarity of the responses (word-set
  Jaccard).
  Features are standardised over the table, so ``weights`` are comparable; the defaults
  (similar responses, long prompts and length-imbalanced pairs go to humans first) are a
  starting point, not the paper's fitted coefficients.

Ties are broken by a seeded stable hash of the pair id (``prefdata.pairs.hash64``), so a
routing is the same on every machine and library version. Pairs already labelled by
humans (``label_source = human``) keep ``route = human`` and use no budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from prefdata.pairs import hash64
from prefdata.schema import PAIR, PAIR_OPTIONAL, conform
from prefdata.step import GlobalStep, Output

STRATEGIES = ("flip_prob", "strength", "judge_disagreement", "hybrid")
HYBRID_FEATURES = ("length_diff", "prompt_length", "similarity")


@dataclass
class RouteConfig:
    strategy: Literal["flip_prob", "strength", "judge_disagreement", "hybrid"] = "flip_prob"
    budget: int | float = 0.1  # an int is a count of pairs, a float in [0, 1] a fraction of them
    judge_column: str = "judge_agreement"
    weights: dict[str, float] = field(
        default_factory=lambda: {"length_diff": 0.5, "prompt_length": 0.5, "similarity": 1.0})
    seed: int = 0


class Route(GlobalStep):
    """Mark pairs ``route = human | ai`` by a trust strategy within a budget."""

    name = "route"
    Config = RouteConfig

    def check(self) -> None:
        cfg = self.config
        if cfg.strategy not in STRATEGIES:
            raise ValueError(f"route: strategy must be one of {STRATEGIES}, got '{cfg.strategy}'")
        if isinstance(cfg.budget, bool) or not isinstance(cfg.budget, (int, float)):
            raise ValueError(f"route: budget must be a count (int) or a fraction (float), got {cfg.budget!r}")
        if isinstance(cfg.budget, int) and cfg.budget < 0:
            raise ValueError(f"route: a budget count must be >= 0, got {cfg.budget}")
        if isinstance(cfg.budget, float) and not 0.0 <= cfg.budget <= 1.0:
            raise ValueError(f"route: a budget fraction must be in [0, 1], got {cfg.budget} "
                             "(write a count without a decimal point, e.g. 500)")
        unknown = sorted(set(cfg.weights) - set(HYBRID_FEATURES))
        if unknown:
            raise ValueError(f"route: unknown hybrid feature(s) {unknown}; known: {list(HYBRID_FEATURES)}")

    def input_columns(self) -> list[str]:
        needs = {"flip_prob": ["flip_prob"], "strength": ["strength"],
                 "judge_disagreement": [self.config.judge_column],
                 "hybrid": ["prompt", "chosen", "rejected"]}[self.config.strategy]
        return ["pair_id"] + needs

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(columns) + [c for c in ("route", "route_score") if c not in columns]

    def process(self, frame: pl.LazyFrame) -> Output:
        return route_pairs(frame.collect(), self.config)


def budget_count(budget: int | float, n: int) -> int:
    """Pairs the budget pays for: a count as is, a fraction rounded down; never more than ``n``."""
    if isinstance(budget, float):
        return min(n, math.floor(budget * n + 1e-9))
    return min(n, budget)


def route_score(cfg: RouteConfig) -> pl.Expr:
    """The strategy's priority as an expression (higher = route to a human first)."""
    if cfg.strategy == "flip_prob":
        return pl.col("flip_prob").cast(pl.Float64)
    if cfg.strategy == "strength":
        return -pl.col("strength").cast(pl.Float64).abs()
    if cfg.strategy == "judge_disagreement":
        column = pl.col(cfg.judge_column)
        return 1.0 - column.cast(pl.Float64)  # bools cast to 0/1
    features = hybrid_features()
    gain = pl.lit(0.0)
    for name in HYBRID_FEATURES:
        weight = float(cfg.weights.get(name, 0.0))
        if weight:
            gain = gain + weight * _standardised(features[name])
    return gain


def hybrid_features() -> dict[str, pl.Expr]:
    """HyPER-style lexical features of a pair, as polars expressions."""
    chosen, rejected, prompt = _text("chosen"), _text("rejected"), _text("prompt")
    wc, wr = _words(chosen), _words(rejected)
    set_c = chosen.str.to_lowercase().str.extract_all(r"\w+").list.unique()
    set_r = rejected.str.to_lowercase().str.extract_all(r"\w+").list.unique()
    union = set_c.list.set_union(set_r).list.len()
    return {
        "length_diff": (wc - wr).abs() / pl.max_horizontal(wc, wr, pl.lit(1)),
        "prompt_length": _words(prompt).log1p(),
        "similarity": pl.when(union > 0).then(set_c.list.set_intersection(set_r).list.len() / union)
        .otherwise(1.0),
    }


def _text(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("content")).list.join("\n").fill_null("")


def _words(text: pl.Expr) -> pl.Expr:
    return text.str.count_matches(r"\S+").cast(pl.Float64)


def _standardised(x: pl.Expr) -> pl.Expr:
    std = x.std()
    return pl.when(std > 0).then((x - x.mean()) / std).otherwise(0.0).fill_null(0.0)


def route_pairs(df: pl.DataFrame, cfg: RouteConfig) -> Output:
    already_human = (pl.col("label_source") == "human").fill_null(False) if "label_source" in df.columns \
        else pl.lit(False)
    df = df.with_row_index("_row").with_columns(
        route_score(cfg).alias("_score"),
        already_human.alias("_done"),
        pl.Series("_tie", hash64(df["pair_id"], seed=cfg.seed)),
    ).with_columns(pl.col("_score").fill_nan(None))
    candidates = df.filter(~pl.col("_done") & pl.col("_score").is_not_null())
    k = budget_count(cfg.budget, df.filter(~pl.col("_done")).height)
    picked = candidates.sort(["_score", "_tie"], descending=[True, False]).head(k)["_row"]
    human = pl.col("_done") | pl.col("_row").is_in(picked.implode())
    out = df.with_columns(
        pl.when(human).then(pl.lit("human")).otherwise(pl.lit("ai")).alias("route"),
        pl.col("_score").alias("route_score"),
    ).drop("_row", "_score", "_done", "_tie", strict=False)
    n_human = int(out.filter(pl.col("route") == "human").height)
    counts = {"routed_human": n_human, "routed_ai": out.height - n_human,
              "route_no_score": int(df.filter(~pl.col("_done") & pl.col("_score").is_null()).height)}
    return Output(conform(conform(out.to_arrow(), PAIR), PAIR_OPTIONAL), None, counts)
