"""Ranked lists: each prompt's responses sorted best first, with their scores.

Song et al. 2024, "Preference Ranking Optimization for Human Alignment" (PRO, AAAI 2024):
the loss takes a prompt with n responses ranked by preference and raises the likelihood of
each response over every one ranked below it (with the reward gaps as temperatures), so
the data is a list per prompt, not pairs. The same shape feeds listwise losses such as
LiPO (Liu et al. 2024, "LiPO: Listwise Preference Optimization through
Learning-to-Rank").

One row per prompt (``LIST`` schema): ``responses`` as assistant messages best first,
``scores`` aligned with them, and ``response_ids``. Ties keep a stable order (the smaller
``response_id`` first) and ``has_ties`` says so, as PRO treats tied responses as ranked.
A response whose text repeats a better-ranked one is left out (it would be ranked both
above and below itself); prompts left with fewer than ``min_responses`` are counted, and
responses without a score are quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from prefdata.pairs import to_arrow
from prefdata.schema import LIST, conform
from prefdata.step import MapStep, Output

PROMPT_LEVEL = ("prompt", "source")


@dataclass
class BuildListsConfig:
    score: str = "score_cdr"
    max_responses: int | None = None  # keep the top n (PRO trains on a fixed ranking length)
    min_responses: int = 2


class BuildLists(MapStep):
    """One ranked list per prompt, best response first."""

    name = "build_lists"
    Config = BuildListsConfig

    def check(self) -> None:
        c = self.config
        if c.min_responses < 2:
            raise ValueError(f"build_lists: min_responses must be >= 2 (a ranking), got {c.min_responses}")
        if c.max_responses is not None and c.max_responses < c.min_responses:
            raise ValueError("build_lists: max_responses must be >= min_responses")

    def input_columns(self) -> list[str]:
        return ["prompt_id", "prompt", "response_id", "response", self.config.score]

    def output_columns(self, columns: list[str]) -> list[str]:
        extra = [c for c in PROMPT_LEVEL if c in columns and c not in LIST.names]
        return list(LIST.names) + ["response_ids", "has_ties"] + extra

    def process(self, table: pa.Table) -> Output:
        return build_lists(table, self.config)


def build_lists(table: pa.Table, cfg: BuildListsConfig) -> Output:
    score = cfg.score
    keep = [c for c in PROMPT_LEVEL if c in table.column_names]
    df = pl.from_arrow(table.select(["prompt_id", *keep, "response_id", "response", score]))
    df = df.with_columns(pl.col(score).cast(pl.Float64).alias("_s"))
    missing = (pl.col("_s").is_null() | pl.col("_s").is_nan()).fill_null(True)
    scored = df.filter(~missing).sort(["prompt_id", "_s", "response_id"], descending=[False, True, False])
    scored = scored.filter(pl.struct("prompt_id", "response").is_first_distinct())
    if cfg.max_responses is not None:
        scored = scored.group_by("prompt_id", maintain_order=True).head(cfg.max_responses)
    first_seen = df.select("prompt_id").unique(maintain_order=True).with_row_index("_order")
    lists = scored.group_by("prompt_id", maintain_order=True).agg(
        *[pl.col(c).first() for c in keep],
        responses=pl.struct(role=pl.lit("assistant"), content=pl.col("response")),
        scores=pl.col("_s"),
        response_ids=pl.col("response_id"),
        has_ties=pl.col("_s").is_duplicated().any(),
    ).filter(pl.col("scores").list.len() >= cfg.min_responses)
    lists = lists.join(first_seen, on="prompt_id").sort("_order").drop("_order")
    out = lists.select(list(LIST.names) + ["response_ids", "has_ties"] + [c for c in keep if c not in LIST.names])
    n_prompts = first_seen.height
    counts = {"lists": out.height, "prompts_without_list": n_prompts - out.height}
    quarantine = None
    n_missing = int(df.select(missing.sum()).item())
    if n_missing:
        rows = df.with_row_index("_row").filter(missing)["_row"].to_numpy()
        quarantine = table.take(pa.array(rows)).append_column(
            "reason", pa.repeat(pa.scalar(f"no {score} (score is null or NaN)"), n_missing))
    return Output(conform(to_arrow(out), LIST), quarantine=quarantine, counts=counts)
