"""Export to the layouts trainers read, validated row by row on the way out.

* ``trl_conversational`` — TRL's conversational preference format: ``prompt``,
  ``chosen``, ``rejected`` as message lists; each completion is exactly one assistant
  message and the prompt ends with a user (or tool) turn.
* ``trl_standard`` — TRL's standard format: ``prompt``, ``chosen``, ``rejected`` strings.
  The prompt string is the content of a single user turn; a multi-turn prompt (or one with
  a system message) is refused, unless ``flatten: true`` renders it as an HH-style
  transcript (``"\\n\\nSystem: …\\n\\nHuman: …\\n\\nAssistant: …\\n\\nHuman: …"``).
* ``ranked_list`` — one row per prompt from a RESPONSE table: ``prompt_id``, ``prompt``,
  ``responses`` (assistant messages, best first by ``score``), ``scores``,
  ``response_ids`` — the LIST schema plus ids. Ties are ordered by ``response_id``.

Rows that break the format raise (``on_error: raise``) or are quarantined with a
``reason``; responses without a score and prompts with fewer than ``min_responses``
(ranked_list) are always quarantined, never dropped silently. ``keep`` names the other
columns to carry (default: all of them for the pair formats, ``source`` for lists).
The checks are polars expressions over the whole table, no Python row loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import polars as pl

from prefdata.pairs import to_arrow
from prefdata.schema import LIST, MESSAGES
from prefdata.step import GlobalStep, Output

FORMATS = ("trl_conversational", "trl_standard", "ranked_list")
PAIR_COLUMNS = ["prompt", "chosen", "rejected"]
LIST_COLUMNS = list(LIST.names) + ["response_ids"]
HH_PREFIX = {"system": "\n\nSystem: ", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "tool": "\n\nTool: "}


@dataclass
class ExportConfig:
    format: str = "trl_conversational"  # trl_conversational | trl_standard | ranked_list
    flatten: bool = False  # trl_standard: render multi-turn prompts as HH transcripts
    score: str = "score_original"  # ranked_list: the column that ranks responses
    min_responses: int = 2  # ranked_list
    keep: list[str] | None = None
    on_error: str = "raise"  # raise | quarantine


class Export(GlobalStep):
    """Reshape pairs (or responses) into a trainer's format and check every row."""

    name: ClassVar[str] = "export"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = ExportConfig

    def check(self) -> None:
        c = self.config
        if c.format not in FORMATS:
            raise ValueError(f"step 'export': format must be one of {list(FORMATS)}, got {c.format!r}")
        if c.on_error not in ("raise", "quarantine"):
            raise ValueError(f"step 'export': on_error must be 'raise' or 'quarantine', got {c.on_error!r}")
        if c.min_responses < 1:
            raise ValueError(f"step 'export': min_responses must be >= 1, got {c.min_responses}")

    def input_columns(self) -> list[str]:
        if self.config.format == "ranked_list":
            return ["prompt_id", "prompt", "response_id", "response", self.config.score]
        return list(PAIR_COLUMNS) + list(self.config.keep or [])

    def output_columns(self, columns: list[str]) -> list[str]:
        own = LIST_COLUMNS if self.config.format == "ranked_list" else PAIR_COLUMNS
        return own + [k for k in _keep(self.config, columns) if k not in own]

    def process(self, frame: pl.LazyFrame) -> Output:
        df = frame.collect()
        if self.config.format == "ranked_list":
            return export_ranked_list(df, self.config)
        return export_pairs(df, self.config)


def _keep(c: ExportConfig, columns: list[str]) -> list[str]:
    if c.keep is not None:
        return list(c.keep)
    if c.format == "ranked_list":
        return ["source"] if "source" in columns else []
    return [k for k in columns if k not in PAIR_COLUMNS]


# -- pairs ------------------------------------------------------------------------------
def _one_assistant(col: str) -> pl.Expr:
    first = pl.col(col).list.first().struct
    return ((pl.col(col).list.len() == 1) & (first.field("role") == "assistant")
            & (first.field("content").str.strip_chars().str.len_chars() > 0)).fill_null(False)


def _problems(c: ExportConfig) -> list[tuple[str, pl.Expr]]:
    """(reason, expression true on bad rows), checked in this order."""
    prompt = pl.col("prompt")
    last_role = prompt.list.last().struct.field("role")
    blank = prompt.list.eval(pl.element().struct.field("content").str.strip_chars().str.len_chars() == 0).list.any()
    checks = [
        ("empty_prompt", (prompt.list.len() == 0).fill_null(True) | blank.fill_null(True)),
        ("bad_last_turn", ~last_role.is_in(["user", "tool"]).fill_null(False)),
        ("bad_chosen", ~_one_assistant("chosen")),
        ("bad_rejected", ~_one_assistant("rejected")),
    ]
    if c.format == "trl_standard" and not c.flatten:
        single = (prompt.list.len() == 1) & (prompt.list.first().struct.field("role") == "user")
        checks.append(("multi_turn_prompt", ~single.fill_null(False)))
    return checks


def export_pairs(df: pl.DataFrame, c: ExportConfig) -> Output:
    missing = [k for k in PAIR_COLUMNS + list(c.keep or []) if k not in df.columns]
    if missing:
        raise ValueError(f"export ({c.format}): the table has no column(s) {missing} (columns: {df.columns}); "
                         "export pairs after build_pairs, or fix `keep:`")
    reason = pl.lit(None, pl.String)
    for code, bad in reversed(_problems(c)):
        reason = pl.when(bad).then(pl.lit(code)).otherwise(reason)
    df = df.with_columns(reason.alias("_reason"))
    bad = df.filter(pl.col("_reason").is_not_null())
    good = df.filter(pl.col("_reason").is_null()).drop("_reason")
    counts = {"exported": good.height}
    quarantine = None
    if bad.height:
        by_reason = bad.group_by("_reason").len().sort("_reason").rows()
        if c.on_error == "raise":
            row = bad.with_row_index().row(0, named=True)
            raise ValueError(f"export ({c.format}): {bad.height} row(s) do not fit the format "
                             f"({', '.join(f'{r}: {n}' for r, n in by_reason)}); the first is pair "
                             f"{row.get('pair_id', '?')} ({row['_reason']}): {_hint(row['_reason'], c)}; "
                             "or set `on_error: quarantine` to set them aside")
        counts.update({f"quarantined_{r}": n for r, n in by_reason})
        quarantine = to_arrow(bad.rename({"_reason": "reason"}))
    if c.format == "trl_standard":
        good = _as_strings(good, c)
    keep = [k for k in _keep(c, good.columns) if k not in PAIR_COLUMNS]
    table = to_arrow(good.select(PAIR_COLUMNS + keep))
    return Output(table, quarantine, counts)


def _hint(reason: str, c: ExportConfig) -> str:
    return {
        "empty_prompt": "the prompt is empty or has a blank message",
        "bad_last_turn": "the prompt must end with a user or tool message",
        "bad_chosen": "chosen must be one non-empty assistant message",
        "bad_rejected": "rejected must be one non-empty assistant message",
        "multi_turn_prompt": "trl_standard holds one user turn as the prompt string; set `flatten: true` "
                             "to render the conversation as a transcript, or export trl_conversational",
    }[reason]


def _as_strings(df: pl.DataFrame, c: ExportConfig) -> pl.DataFrame:
    content = pl.element().struct.field("content")
    if c.flatten:
        prefix = pl.element().struct.field("role").replace_strict(HH_PREFIX, default="\n\nHuman: ")
        prompt = pl.col("prompt").list.eval(pl.concat_str([prefix, content])).list.join("")
    else:
        prompt = pl.col("prompt").list.first().struct.field("content")
    return df.with_columns(
        prompt.alias("prompt"),
        pl.col("chosen").list.first().struct.field("content").alias("chosen"),
        pl.col("rejected").list.first().struct.field("content").alias("rejected"),
    )


# -- ranked lists -----------------------------------------------------------------------
def export_ranked_list(df: pl.DataFrame, c: ExportConfig) -> Output:
    need = ["prompt_id", "prompt", "response_id", "response", c.score] + list(c.keep or [])
    missing = [k for k in need if k not in df.columns]
    if missing:
        raise ValueError(f"export (ranked_list): the table has no column(s) {missing} (columns: {df.columns}); "
                         "ranked_list reads a response table (one row per response) with a score column")
    keep = [k for k in _keep(c, df.columns) if k not in LIST_COLUMNS]
    score = pl.col(c.score).cast(pl.Float64)
    unscored = df.filter(score.is_null() | score.is_nan())
    scored = df.filter(score.is_not_null() & score.is_not_nan()).with_row_index("_order")
    empty = scored.filter(pl.col("response").str.strip_chars().str.len_chars() == 0)
    scored = scored.filter(pl.col("response").str.strip_chars().str.len_chars() > 0)
    message = pl.struct(pl.lit("assistant").alias("role"), pl.col("response").alias("content"))
    lists = (
        scored.sort([pl.col(c.score).cast(pl.Float64), "response_id"], descending=[True, False])
        .group_by("prompt_id", maintain_order=False)
        .agg(pl.col("_order").min().alias("_first"), pl.col("prompt").first(), message.alias("responses"),
             score.alias("scores"), pl.col("response_id").alias("response_ids"),
             *[pl.col(k).first() for k in keep])
        .sort("_first").drop("_first")
    )
    short = lists.filter(pl.col("responses").list.len() < c.min_responses)
    lists = lists.filter(pl.col("responses").list.len() >= c.min_responses)
    parts = [unscored.with_columns(pl.lit(f"no {c.score} (null or NaN)").alias("reason")),
             empty.drop("_order").with_columns(pl.lit("empty_response").alias("reason")),
             df.join(short.select("prompt_id"), on="prompt_id", how="semi")
               .filter(score.is_not_null() & score.is_not_nan())
               .with_columns(pl.lit(f"too_few_responses (< {c.min_responses})").alias("reason"))]
    parts = [p for p in parts if p.height]
    counts = {"lists": lists.height, "responses_listed": int(lists["responses"].list.len().sum() or 0),
              "unscored": unscored.height, "empty_responses": empty.height, "too_few_responses": short.height}
    quarantine = to_arrow(pl.concat(parts, how="diagonal_relaxed")) if parts else None
    table = to_arrow(lists.select(LIST_COLUMNS + keep))
    table = table.set_column(table.column_names.index("responses"), "responses",
                             table["responses"].cast(MESSAGES))
    return Output(table, quarantine, counts)
