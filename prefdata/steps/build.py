"""Build preference pairs from scored responses, in TRL's conversational format.

``best_vs_random`` follows UltraFeedback-binarized (Cui et al. 2023, "UltraFeedback:
Boosting Language Models with Scaled AI Feedback"; the binarized recipe of Tunstall et
al. 2023, "Zephyr: Direct Distillation of LM Alignment"): chosen = the highest-scored
response, rejected = a random one of the rest. It is also the pairing of the CDR
reference code. ``best_vs_worst`` takes the lowest instead. Ties with the best and
responses whose text equals the chosen one are never used as rejected; a prompt left
with no candidate yields no pair and is counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from prefdata.schema import PAIR, conform
from prefdata.step import MapStep, Output

STRATEGIES = ("best_vs_random", "best_vs_worst")
PROMPT_LEVEL = ("prompt", "source")


@dataclass
class BuildPairsConfig:
    score: str = "score_cdr"
    strategy: str = "best_vs_random"
    seed: int = 0
    min_margin: float = 0.0


class BuildPairs(MapStep):
    """One pair per prompt: chosen = best by ``score``, rejected by ``strategy``."""

    name = "build_pairs"
    Config = BuildPairsConfig

    def check(self) -> None:
        if self.config.strategy not in STRATEGIES:
            raise ValueError(f"build_pairs: strategy must be one of {STRATEGIES}, got '{self.config.strategy}'")
        if self.config.min_margin < 0:
            raise ValueError("build_pairs: min_margin must be >= 0")

    def input_columns(self) -> list[str]:
        return ["prompt_id", "prompt", "response_id", "response", self.config.score]

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(PAIR.names) + [c for c in PROMPT_LEVEL if c in columns and c not in PAIR.names]

    def process(self, table: pa.Table) -> Output:
        return build_pairs(table, self.config)


def build_pairs(table: pa.Table, cfg: BuildPairsConfig) -> Output:
    score = cfg.score
    df = pl.from_arrow(table)
    missing = df.filter(pl.col(score).is_null() | pl.col(score).is_nan())
    df = df.filter(pl.col(score).is_not_null() & pl.col(score).is_not_nan())
    order = [pl.col(score), pl.col("response_id")]
    best = (
        df.sort(order, descending=[True, False])
        .group_by("prompt_id", maintain_order=True)
        .first()
        .select("prompt_id", pl.col("response_id").alias("_best_id"), pl.col("response").alias("_best_text"),
                pl.col(score).alias("_best_score"))
    )
    cand = df.join(best, on="prompt_id").filter(
        (pl.col("response_id") != pl.col("_best_id"))
        & (pl.col("response") != pl.col("_best_text"))
        & (pl.col("_best_score") - pl.col(score) > cfg.min_margin)
        & (pl.col(score) < pl.col("_best_score"))
    )
    if cfg.strategy == "best_vs_worst":
        key, desc = [pl.col(score), pl.col("response_id")], [False, False]
    else:
        key, desc = [pl.col("response_id").hash(seed=cfg.seed)], [False]
    rejected = cand.sort(key, descending=desc).group_by("prompt_id", maintain_order=True).first()
    chosen = df.join(best.select("prompt_id", "_best_id"), on="prompt_id").filter(pl.col("response_id") == pl.col("_best_id"))
    keep = [c for c in PROMPT_LEVEL if c in df.columns]
    pairs = chosen.select(
        "prompt_id", *keep, pl.col("response_id").alias("chosen_id"), pl.col("response").alias("_chosen"),
        pl.col(score).cast(pl.Float64).alias("score_chosen"),
    ).join(
        rejected.select("prompt_id", pl.col("response_id").alias("rejected_id"), pl.col("response").alias("_rejected"),
                        pl.col(score).cast(pl.Float64).alias("score_rejected")),
        on="prompt_id", how="inner", maintain_order="left",
    )
    pairs = pairs.with_columns(
        chosen=_assistant("_chosen"), rejected=_assistant("_rejected"),
        margin=pl.col("score_chosen") - pl.col("score_rejected"),
        pair_strategy=pl.lit(cfg.strategy), label_source=pl.lit("ai"),
    ).drop("_chosen", "_rejected")
    ids = [_pair_id(c, r) for c, r in zip(pairs["chosen_id"].to_list(), pairs["rejected_id"].to_list())]
    pairs = pairs.with_columns(pair_id=pl.Series(ids, dtype=pl.String))
    out = conform(pairs.select(list(PAIR.names) + [c for c in keep if c not in PAIR.names]).to_arrow(), PAIR)
    n_prompts = df["prompt_id"].n_unique()
    counts = {
        "pairs": out.num_rows,
        "prompts_without_pair": n_prompts - out.num_rows,
    }
    quarantine = None
    if missing.height:
        quarantine = missing.with_columns(reason=pl.lit(f"no {score} (score is null or NaN)")).to_arrow()
    return Output(out, quarantine=quarantine, counts=counts)


def _assistant(column: str) -> pl.Expr:
    return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(column)))


def _pair_id(chosen_id: str, rejected_id: str) -> str:
    return hashlib.sha256(f"{chosen_id}|{rejected_id}".encode()).hexdigest()[:16]

