"""Combine several score columns into one ensemble score with an uncertainty.

Each member column (``score_rm``, ``score_cdr``, ``score_judge`` …) is first put on a common
scale — standardised over the whole dataset (``standardize: global``, the default, which
is why this is a global step), within each prompt's responses (``prompt``), or left as is
(``none``) — then ``score_<name>`` is the mean of the standardised members and
``score_<name>_std`` their population standard deviation (ddof = 0): how much the
scorers disagree about a response. ``<name>_members`` counts the members present;
missing member values (a judge that gave up) are skipped, and a row with fewer than
``min_members`` gets null. With ``member_std: true`` a member's own ``<member>_std``
(MC dropout, a nested ensemble), scaled like the member, adds its variance (law of total
variance: std = √(Var_k z_k + mean_k σ_k²)).

A constant member (std 0 over its scope) is centred but not scaled. Everything is a
polars expression over the whole table; no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from prefdata.step import GlobalStep, Output

SCOPES = ("global", "prompt", "none")


@dataclass
class EnsembleConfig:
    members: list[str] = field(default_factory=list)
    name: str = "ensemble"
    standardize: str = "global"
    min_members: int = 1
    member_std: bool = False


class Ensemble(GlobalStep):
    """Writes ``score_<name>``, ``score_<name>_std`` and ``<name>_members``."""

    name = "score_ensemble"
    Config = EnsembleConfig

    def check(self) -> None:
        c = self.config
        problems = []
        if len(c.members) < 2:
            problems.append(f"needs at least two member columns, got {c.members}")
        if len(set(c.members)) != len(c.members):
            problems.append(f"members repeat: {c.members}")
        if c.standardize not in SCOPES:
            problems.append(f"standardize must be one of {list(SCOPES)}, got {c.standardize!r}")
        if not 1 <= c.min_members <= max(len(c.members), 1):
            problems.append(f"min_members must be between 1 and {len(c.members)}, got {c.min_members}")
        if f"score_{c.name}" in c.members:
            problems.append(f"the output score_{c.name} cannot also be a member")
        if problems:
            raise ValueError("score_ensemble: " + "; ".join(problems))

    def input_columns(self) -> list[str]:
        c = self.config
        cols = list(c.members)
        if c.standardize == "prompt":
            cols.append("prompt_id")
        if c.member_std:
            cols += [f"{m}_std" for m in c.members]
        return cols

    def new_columns(self) -> list[str]:
        n = self.config.name
        return [f"score_{n}", f"score_{n}_std", f"{n}_members"]

    def output_columns(self, columns: list[str]) -> list[str]:
        new = self.new_columns()
        return [c for c in columns if c not in new] + new

    def process(self, frame: pl.LazyFrame) -> Output:
        names = frame.collect_schema().names()
        missing = [c for c in self.input_columns() if c not in names]
        if missing:
            raise ValueError(f"score_ensemble: column(s) {missing} are not in the table; "
                             f"it has {[c for c in names if c.startswith('score_')]}")
        frame = frame.drop([c for c in self.new_columns() if c in names])
        df = frame.with_columns(ensemble_columns(self.config)).collect()
        n = self.config.name
        counts = {f"{n}_rows": df.height,
                  f"{n}_null": int(df.get_column(f"score_{n}").null_count())}
        return Output(df.to_arrow(), counts=counts)


def ensemble_columns(cfg: EnsembleConfig) -> list[pl.Expr]:
    """Expressions for the ensemble mean, its population std and the member count."""
    zs, own = [], []
    for m in cfg.members:
        x = pl.col(m).cast(pl.Float64).fill_nan(None)
        if cfg.standardize == "none":
            centre, scale = pl.lit(0.0), pl.lit(1.0)
        else:
            centre, scale = x.mean(), x.std(ddof=0)
            if cfg.standardize == "prompt":
                centre, scale = centre.over("prompt_id"), scale.over("prompt_id")
            scale = pl.when(scale > 0).then(scale).otherwise(1.0)
        zs.append(((x - centre) / scale).alias(f"__z_{m}"))
        if cfg.member_std:
            own.append(((pl.col(f"{m}_std").cast(pl.Float64).fill_nan(None) / scale) ** 2).alias(f"__v_{m}"))
    count = pl.sum_horizontal([z.is_not_null().cast(pl.Int64) for z in zs])
    mean = pl.mean_horizontal(zs)
    var = pl.mean_horizontal([(z - mean) ** 2 for z in zs])
    if own:
        var = var + pl.mean_horizontal(own).fill_null(0.0)
    enough = count >= cfg.min_members
    n = cfg.name
    return [
        pl.when(enough).then(mean).otherwise(None).alias(f"score_{n}"),
        pl.when(enough).then(var.sqrt()).otherwise(None).alias(f"score_{n}_std"),
        count.alias(f"{n}_members"),
    ]
