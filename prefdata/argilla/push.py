"""Push pairs to Argilla for human annotation, blind by default, idempotently.

Each pair becomes a record whose id is the pair id: the prompt, and the two responses as A
and B in a per-record random order (reproducible from the seed and the pair id). The A/B
order (``a_is``), the AI verdict (``ai_choice``: A or B) and the scores go to metadata
hidden from annotators, so agreement with the AI can be computed after the fact without
anchoring the annotator on the AI's answer. ``show_ai_suggestion`` (off by default)
pre-selects the AI verdict in the UI as a suggestion whose agent says it is the model's
opinion and whose score is its confidence (1 − flip_prob), explained in the guidelines.

A response cut at ``max_new_tokens`` (``finish_reason = length`` in the pair table) ends
with a visible ``[truncated at max_new_tokens]`` note, so it is not judged as a complete
answer by mistake.

Ids already in the dataset are skipped and a batch is an upsert keyed by record id, so a
push that dies half way (or whose server restarts) completes when run again, with every
pair present once. Batches go through ``Dataset.records.log`` with retries (tenacity).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import time
from dataclasses import dataclass
from typing import Callable

import polars as pl
import pyarrow as pa

from prefdata.argilla.client import connect, require_sdk, with_retries
from prefdata.argilla.dataset import (GUIDELINES, GUIDELINES_FIELD, QUESTION, DatasetConfig, dataset_settings,
                                      existing_ids, get_or_create_dataset, guidelines_text)

SCORE_METADATA = ("score_chosen", "score_rejected", "margin", "strength", "flip_prob", "route_score")
MAX_BATCH = 500  # argilla-server's maximum records per bulk upsert
TRUNCATED_NOTE = "*[truncated at max_new_tokens]*"
# columns that tell whether each side was cut at max_new_tokens (``length``) or stopped (``stop``)
FINISH_COLUMNS = (("finish_reason_chosen", "finish_reason_rejected"),
                  ("chosen_finish_reason", "rejected_finish_reason"))
# shown in the UI beside a suggestion; argilla-server allows letters, digits, spaces and -_:./ only
AI_AGENT = "AI model opinion: not a correct answer. Score: its confidence: 1 - flip probability"


@dataclass
class PushConfig(DatasetConfig):
    batch_size: int = 200
    seed: int = 0  # decides the A/B order of each pair (a hash of seed and pair id)
    show_ai_suggestion: bool = False  # blind by default: the AI verdict stays in hidden metadata
    min_submitted: int = 1  # Argilla's task distribution: responses before a record is complete
    only_routed: bool = True  # with a ``route`` column, push only rows routed to humans
    retries: int = 8
    guidelines: str = GUIDELINES


@dataclass
class PushResult:
    dataset_id: str
    created: int
    already_present: int
    batches: int
    retries: int
    seconds: float

    @property
    def records_per_second(self) -> float:
        return self.created / self.seconds if self.seconds > 0 else float("inf")


def a_is_chosen(pair_id: str, seed: int) -> bool:
    """Per-pair random order, reproducible from (seed, pair id) on any machine: True puts chosen as A."""
    return hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[0] % 2 == 0


def pairs_to_push(table: pa.Table, cfg: PushConfig) -> pl.DataFrame:
    df = pl.from_arrow(table)
    missing = [c for c in ("pair_id", "prompt", "chosen", "rejected") if c not in df.columns]
    if missing:
        raise ValueError(f"push needs a pair table; missing column(s) {missing}")
    if cfg.only_routed and "route" in df.columns:
        df = df.filter(pl.col("route") == "human")
    dupes = df.filter(pl.col("pair_id").is_duplicated())
    if dupes.height:
        raise ValueError(f"push: pair_id must be unique, {dupes['pair_id'].n_unique()} ids repeat "
                         f"(e.g. {dupes['pair_id'][0]})")
    return df.with_columns(_truncated("chosen", df.columns), _truncated("rejected", df.columns))


def _truncated(side: str, columns: list[str]) -> pl.Expr:
    """True where this side of the pair was cut at max_new_tokens; False when nothing says so."""
    for chosen_col, rejected_col in FINISH_COLUMNS:
        column = chosen_col if side == "chosen" else rejected_col
        if column in columns:
            return (pl.col(column).cast(pl.String) == "length").fill_null(False).alias(f"_truncated_{side}")
    return pl.lit(False).alias(f"_truncated_{side}")


def build_records(df: pl.DataFrame, cfg: PushConfig, guidelines_field: bool = True) -> list:
    """rg.Record objects for the rows of ``df``: the one row loop, at the edge (talking to Argilla).

    ``guidelines_field``: the dataset shows the guidelines as a field (datasets created before
    that field existed do not).
    """
    rg = require_sdk()
    metadata_cols = [c for c in SCORE_METADATA if c in df.columns]
    guidelines = {GUIDELINES_FIELD: guidelines_text(cfg.guidelines, cfg.show_ai_suggestion)} if guidelines_field \
        else {}
    records = []
    for row in df.iter_rows(named=True):
        a_chosen = a_is_chosen(row["pair_id"], cfg.seed)
        sides = ("chosen", "rejected") if a_chosen else ("rejected", "chosen")
        a, b = (render_response(row[s], row.get(f"_truncated_{s}", False)) for s in sides)
        ai_choice = "A" if a_chosen else "B"
        metadata = {"a_is": "chosen" if a_chosen else "rejected", "ai_choice": ai_choice}
        for c in metadata_cols:
            value = row[c]
            if value is not None and math.isfinite(value):
                metadata[c] = float(value)
        suggestions = []
        if cfg.show_ai_suggestion:
            suggestions.append(rg.Suggestion(QUESTION, ai_choice, score=_confidence(row.get("flip_prob")),
                                             agent=AI_AGENT, type="model"))
        records.append(rg.Record(
            id=row["pair_id"],
            fields={**guidelines,
                    "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"] or []],
                    "response_a": a, "response_b": b},
            metadata=metadata,
            suggestions=suggestions,
        ))
    return records


def _confidence(flip_prob) -> float | None:
    if flip_prob is None or not math.isfinite(flip_prob):
        return None
    return round(min(1.0, max(0.0, 1.0 - float(flip_prob))), 2)


def render_messages(messages: list[dict] | None) -> str:
    messages = messages or []
    if len(messages) == 1:
        return messages[0]["content"] or ""
    return "\n\n".join(f"**{m['role']}**: {m['content']}" for m in messages)


def render_response(messages: list[dict] | None, truncated: bool) -> str:
    text = render_messages(messages)
    return f"{text} …\n\n{TRUNCATED_NOTE}" if truncated else text


@contextlib.contextmanager
def _no_sdk_bars():
    """``Dataset.records.log`` draws a tqdm bar per call on stderr; we report progress ourselves."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def push(table: pa.Table, cfg: PushConfig | None = None, client=None,
         progress: Callable[[int, int], None] | None = None) -> PushResult:
    """Push the pairs of ``table`` not yet in the dataset; returns what was created."""
    cfg = cfg or PushConfig()
    if not 1 <= cfg.batch_size <= MAX_BATCH:
        raise ValueError(f"push: batch_size must be between 1 and {MAX_BATCH}, got {cfg.batch_size}")
    start = time.perf_counter()
    df = pairs_to_push(table, cfg)
    client = client or connect()
    settings = dataset_settings(cfg.guidelines, cfg.min_submitted, cfg.show_ai_suggestion, df.columns)
    dataset = get_or_create_dataset(client, cfg, settings, cfg.retries)
    present = existing_ids(client, dataset, cfg.retries)
    todo = df.filter(~pl.col("pair_id").is_in(list(present)))
    records = build_records(todo, cfg, GUIDELINES_FIELD in {f.name for f in dataset.settings.fields})
    retried = [0]
    batches = 0
    for i in range(0, len(records), cfg.batch_size):
        batch = records[i: i + cfg.batch_size]

        def send(batch=batch):
            with _no_sdk_bars():
                dataset.records.log(batch, batch_size=len(batch))

        with_retries(send, cfg.retries, f"pushing records {i}-{i + len(batch)} of {len(records)}", client.api_url,
                     on_retry=lambda: retried.__setitem__(0, retried[0] + 1))
        batches += 1
        if progress is not None:
            progress(i + len(batch), len(records))
    return PushResult(dataset_id=str(dataset.id), created=len(records), already_present=df.height - len(records),
                      batches=batches, retries=retried[0], seconds=time.perf_counter() - start)
