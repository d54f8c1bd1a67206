"""Shared plumbing of the steps that score responses by language-model log-probabilities.

``score_cdr`` (a strong-over-weak density ratio) and ``score_flr`` (follow-up likelihood)
differ in *what* they score, but not in how: a model named in the step's config is
identified for the fingerprint and loaded with the config's backend, device, dtype and
batch size; each scored continuation's token log-probabilities are reduced to their sum
or their mean (the backend returns both); and the result replaces the step's score column
as float64, an empty shard giving an empty column without loading any model
(``ResponseScoreStep``). Steps may not import each other, so that part lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from prefdata.step import MapStep

REDUCTIONS = ("sum", "mean")


def model_ref(name: str, cfg: Any):
    """The fingerprint identity of model ``name`` under ``cfg``'s backend, device and dtype."""
    from prefdata.models.identity import ModelRef

    return ModelRef(name, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype)


def load_scorer(name: str, cfg: Any):
    """Model ``name`` loaded (cached) with ``cfg``'s backend, device, dtype and batch size."""
    from prefdata.models import load_model

    return load_model(name, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)


def option_problems(cfg: Any) -> list[str]:
    """The config errors every log-prob scorer shares (reduction, batch size)."""
    problems = []
    if cfg.reduction not in REDUCTIONS:
        problems.append(f"option 'reduction' must be 'sum' or 'mean', got {cfg.reduction!r}")
    if cfg.batch_size < 1:
        problems.append(f"option 'batch_size' must be at least 1, got {cfg.batch_size}")
    return problems


def reduced(scored: Sequence, reduction: str) -> np.ndarray:
    """Each continuation's summed (``sum``) or per-token mean (``mean``) log-probability."""
    return np.array([getattr(s, reduction) for s in scored], dtype=np.float64)


def with_score_column(table: pa.Table, column: str, scores: Callable[[pa.Table], Sequence[float]]) -> pa.Table:
    """``table`` with ``column`` (dropped first if present) set to ``scores(table)`` as float64;
    ``scores`` is not called for an empty table."""
    if column in table.column_names:
        table = table.drop_columns([column])
    values = scores(table) if table.num_rows else []
    return table.append_column(column, pa.array(np.asarray(values, dtype=np.float64), pa.float64()))


class ResponseScoreStep(MapStep):
    """A map step writing one float64 column, ``score_<config.name>``, per (prompt, response)
    row; a subclass gives ``scores(table)`` for a non-empty table."""

    def input_columns(self) -> list[str]:
        return ["prompt", "response"]

    @property
    def score_column(self) -> str:
        return f"score_{self.config.name}"

    def output_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c != self.score_column] + [self.score_column]

    def process(self, table: pa.Table) -> pa.Table:
        return with_score_column(table, self.score_column, self.scores)

    def scores(self, table: pa.Table) -> np.ndarray:
        raise NotImplementedError
