"""CHES: which preference pairs make DPO push down the likelihood of the chosen response.

Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization" (ICLR 2025). With H⁺ and H⁻ the last-layer hidden states of
prompt+chosen and prompt+rejected, summed over the positions that predict response
tokens (from the last prompt token to the second-to-last response token — the model's
``hidden_states``), the centred hidden embedding similarity is

    CHES = ⟨H⁺, H⁻⟩ − ‖H⁺‖²

and LN-CHES is the same on per-token means (H⁺/T⁺, H⁻/T⁻). High CHES means the two
responses look alike to the model, and DPO on the pair tends to lower the chosen
response's probability too. This follows the reference code (``compute_ches_scores`` in
princeton-nlp/unintentional-unalignment): final-norm hidden states (``hidden_states[-1]``
of transformers), the EOS that ends a response is a target but its own position is not
used, and LN-CHES divides each sum by its response's token count.

``ches`` (map step) writes ``ches`` and ``ln_ches`` per pair; a response that appears in
several pairs (all_pairs, several pairs per prompt) goes through the model once. The
backend sums the states on its device in float64 (``hidden_state_sums``), so no
per-token array of a response is ever copied to the host.
``ches_filter`` (global step) removes the highest-CHES pairs — above a quantile, or all
but the ``keep_lowest`` k — quarantining each with its reason, so nothing disappears
silently; the threshold and counts go to the run summary and the step's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.pairs import to_arrow
from prefdata.step import GlobalStep, MapStep, Output

COLUMNS = ("ches", "ln_ches")


@dataclass
class ScoreCHESConfig:
    model: str = "smollm2-135m-instruct"
    backend: str = "transformers"  # vLLM does not expose hidden states
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16


class ScoreCHES(MapStep):
    """Writes ``ches`` and ``ln_ches`` for each pair from the model's hidden states."""

    name = "ches"
    version = "2"  # 2: hidden states independent of batch composition (duplicates computed once)
    Config = ScoreCHESConfig

    def check(self) -> None:
        from prefdata.models import check_backend

        check_backend(self.config.backend)
        if self.config.batch_size < 1:
            raise ValueError(f"ches: batch_size must be >= 1, got {self.config.batch_size}")

    def input_columns(self) -> list[str]:
        return ["prompt", "chosen", "rejected"]

    def output_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c not in COLUMNS] + list(COLUMNS)

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        return [ModelRef(c.model, backend=c.backend, device=c.device, dtype=c.dtype)]

    def setup(self) -> None:
        from prefdata.models import load_model

        c = self.config
        self.model = load_model(c.model, backend=c.backend, device=c.device, dtype=c.dtype, batch_size=c.batch_size)

    def teardown(self) -> None:
        self.model = None

    def process(self, table: pa.Table) -> pa.Table:
        ches, ln_ches = ches_scores(self.model, table)
        table = table.drop_columns([c for c in COLUMNS if c in table.column_names])
        return table.append_column("ches", pa.array(ches, pa.float64())).append_column(
            "ln_ches", pa.array(ln_ches, pa.float64()))


def ches_scores(model, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(CHES, LN-CHES) per pair; each distinct (conversation, response) is run once."""
    prompts = table.column("prompt").to_pylist()
    keys, items = {}, []
    index = {"chosen": [], "rejected": []}
    for side in ("chosen", "rejected"):
        ids = table.column(f"{side}_id").to_pylist() if f"{side}_id" in table.column_names else None
        for row, messages in enumerate(table.column(side).to_pylist()):
            conversation = list(prompts[row]) + list(messages[:-1])
            response = messages[-1]["content"]
            key = (ids[row], response) if ids is not None else (repr(conversation), response)
            if key not in keys:
                keys[key] = len(items)
                items.append((conversation, response))
            index[side].append(keys[key])
    if not items:
        return np.zeros(0), np.zeros(0)
    sums, counts = model.hidden_state_sums([c for c, _ in items], [r for _, r in items])
    lengths = counts.astype(np.float64)
    return ches_from_sums(sums[index["chosen"]], sums[index["rejected"]],
                          lengths[index["chosen"]], lengths[index["rejected"]])


def ches_from_sums(h_pos: np.ndarray, h_neg: np.ndarray, t_pos: np.ndarray, t_neg: np.ndarray):
    """CHES on summed hidden states ``[n, d]`` and LN-CHES on their per-token means."""
    ches = np.einsum("nd,nd->n", h_pos, h_neg) - np.einsum("nd,nd->n", h_pos, h_pos)
    m_pos, m_neg = h_pos / t_pos[:, None], h_neg / t_neg[:, None]
    ln = np.einsum("nd,nd->n", m_pos, m_neg) - np.einsum("nd,nd->n", m_pos, m_pos)
    return ches, ln


@dataclass
class CHESFilterConfig:
    column: str = "ches"  # or ln_ches
    quantile: float | None = None  # drop pairs above this quantile (linear interpolation)
    keep_lowest: int | None = None  # or keep the k lowest (ties: pair_id)


class CHESFilter(GlobalStep):
    """Removes the highest-CHES pairs over the whole dataset, quarantined with a reason."""

    name = "ches_filter"
    Config = CHESFilterConfig

    def check(self) -> None:
        c = self.config
        if c.column not in COLUMNS:
            raise ValueError(f"ches_filter: column must be one of {COLUMNS}, got '{c.column}'")
        if (c.quantile is None) == (c.keep_lowest is None):
            raise ValueError("ches_filter: set exactly one of 'quantile' (e.g. 0.9) or 'keep_lowest' (a count)")
        if c.quantile is not None and not 0.0 < c.quantile <= 1.0:
            raise ValueError(f"ches_filter: quantile must be in (0, 1], got {c.quantile}")
        if c.keep_lowest is not None and c.keep_lowest < 0:
            raise ValueError(f"ches_filter: keep_lowest must be >= 0, got {c.keep_lowest}")

    def input_columns(self) -> list[str]:
        return ["pair_id", self.config.column]

    def process(self, frame: pl.LazyFrame) -> Output:
        out = ches_filter(frame.collect(), self.config)
        self.metadata = out.pop("metadata")
        return Output(**out)


def ches_filter(df: pl.DataFrame, cfg: CHESFilterConfig) -> dict:
    col = cfg.column
    df = df.with_row_index("_row")
    missing = pl.col(col).is_null() | pl.col(col).is_nan()
    scored = df.filter(~missing)
    if cfg.quantile is not None:
        threshold = scored.select(pl.col(col).quantile(cfg.quantile, interpolation="linear")).item()
        high = pl.lit(False) if threshold is None else pl.col(col) > threshold
        rule = f"{col} above its {cfg.quantile:g}-quantile ({threshold:.6g})" if threshold is not None else ""
    else:
        kept = scored.sort([col, "pair_id"]).head(cfg.keep_lowest)["_row"]
        high = ~pl.col("_row").is_in(kept.implode()) & ~missing
        threshold = scored.filter(pl.col("_row").is_in(kept.implode()))[col].max() if len(kept) else None
        rule = f"{col} not among the {cfg.keep_lowest} lowest"
    reason = pl.when(missing).then(pl.lit(f"no {col}")).when(high).then(pl.lit(rule))
    df = df.with_columns(reason=reason)
    keep = df.filter(pl.col("reason").is_null()).drop("_row", "reason")
    drop = df.filter(pl.col("reason").is_not_null()).drop("_row")
    n_missing = int(df.select(missing.sum()).item())
    counts = {f"dropped_high_{col}": drop.height - n_missing, f"dropped_no_{col}": n_missing}
    metadata = {"column": col, "quantile": cfg.quantile, "keep_lowest": cfg.keep_lowest,
                "threshold": threshold, "kept": keep.height, **counts}
    return {"table": to_arrow(keep), "quarantine": to_arrow(drop) if drop.height else None,
            "counts": counts, "metadata": metadata}
