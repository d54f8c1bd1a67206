"""Merging human verdicts into AI-labelled pairs, with provenance.

Several annotators are resolved by a policy (``majority``: a split vote is a tie;
``first``: the earliest response; ``keep_all``: one row per response, so a pair id
repeats). A/B is mapped back to chosen/rejected (a human flip swaps every chosen/rejected
column), and the pair is marked ``label_source = human`` with the AI label kept beside it
(``ai_chosen_id``, ``ai_rejected_id``, ``human_verdict`` agree|flip|tie,
``human_agrees_with_ai``, ``annotator_count``, ``annotators`` (user names),
``human_rationale``). Unanswered pushed pairs stay AI-labelled or go to quarantine
(``unanswered``); human ties are excluded or keep the AI label (``ties``).

Pure functions over Arrow tables: no server needed, so they are tested on literal tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl
import pyarrow as pa

from prefdata.schema import PAIR, PAIR_OPTIONAL, conform, stable_hash
from prefdata.step import Output

CLEARED_ON_FLIP = ("ches", "ln_ches", "rationale")
PROVENANCE = ("ai_chosen_id", "ai_rejected_id", "human_verdict", "human_agrees_with_ai", "annotator_count",
              "discarded_count", "annotators", "human_rationale")
# one row per (record, response) as fetched from Argilla; ``user`` is the annotator's user name
ANNOTATIONS = pa.schema([
    ("pair_id", pa.string()),
    ("a_is", pa.string()),
    ("user", pa.string()),
    ("status", pa.string()),
    ("label", pa.string()),
    ("rationale", pa.string()),
    ("rank", pa.int64()),  # the response's place among the record's responses, earliest first
])


@dataclass
class MergeConfig:
    policy: Literal["majority", "first", "keep_all"] = "majority"
    unanswered: Literal["keep_ai", "exclude"] = "keep_ai"  # pushed pairs with no submitted response
    ties: Literal["exclude", "keep_ai"] = "exclude"  # a human tie (or a split vote)


def annotations_fingerprint(annotations: pa.Table) -> str:
    """A hash of the human labels; changes exactly when a response is added or changed."""
    df = pl.from_arrow(annotations).sort(["pair_id", "user", "rank"], nulls_last=True)
    return stable_hash(df.select("pair_id", "user", "status", "label", "rationale").rows())


def resolve(annotations: pa.Table, policy: str) -> pl.DataFrame:
    """One verdict per pair (two or more rows per pair under ``keep_all``), from submitted responses.

    verdict: ``agree`` (the human picked the AI's chosen), ``flip`` or ``tie``. Under
    ``majority`` a split vote between A and B counts as a tie.
    """
    if policy not in ("majority", "first", "keep_all"):
        raise ValueError(f"merge: policy must be majority, first or keep_all, got '{policy}'")
    ann = pl.from_arrow(annotations)
    pushed = ann.select("pair_id").unique()
    discarded = ann.filter(pl.col("status") == "discarded").group_by("pair_id").agg(
        pl.len().cast(pl.Int64).alias("discarded_count"))
    sub = ann.filter((pl.col("status") == "submitted") & pl.col("label").is_not_null()).with_columns(
        pl.when(pl.col("label") == "tie").then(pl.lit("tie"))
        .when((pl.col("label") == "A") == (pl.col("a_is") == "chosen")).then(pl.lit("agree"))
        .otherwise(pl.lit("flip")).alias("verdict")
    ).sort(["pair_id", "rank", "user"], nulls_last=True)
    per_pair = sub.group_by("pair_id", maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("annotator_count"),
        pl.col("user").alias("annotators"),
    )
    if policy == "keep_all":
        chosen = sub.select("pair_id", "verdict", pl.col("rationale").alias("human_rationale"),
                            pl.concat_list(pl.col("user")).alias("annotators_one"),
                            pl.int_range(pl.len()).over("pair_id").alias("_k"))
        out = chosen.join(per_pair.select("pair_id", "annotator_count"), on="pair_id")
        out = out.rename({"annotators_one": "annotators"})
    else:
        if policy == "first":
            verdicts = sub.group_by("pair_id", maintain_order=True).first().select("pair_id", "verdict")
        else:
            counts = sub.group_by(["pair_id", "verdict"]).agg(pl.len().alias("n"))
            top = counts.filter(pl.col("n") == pl.col("n").max().over("pair_id"))
            verdicts = top.group_by("pair_id").agg(pl.len().alias("k"), pl.col("verdict").first()).select(
                "pair_id", pl.when(pl.col("k") > 1).then(pl.lit("tie")).otherwise(pl.col("verdict")).alias("verdict"))
        why = sub.join(verdicts, on=["pair_id", "verdict"]).filter(
            pl.col("rationale").is_not_null() & (pl.col("rationale").str.strip_chars() != "")
        ).group_by("pair_id", maintain_order=True).agg(pl.col("rationale").first().alias("human_rationale"))
        out = verdicts.join(why, on="pair_id", how="left").join(per_pair, on="pair_id").with_columns(
            pl.lit(0, pl.Int64).alias("_k"))
    out = pushed.join(out, on="pair_id", how="left").join(discarded, on="pair_id", how="left")
    return out.with_columns(
        pl.col("annotator_count").fill_null(0), pl.col("discarded_count").fill_null(0),
        pl.col("annotators").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.lit(True).alias("_pushed"),
    ).select("pair_id", "verdict", "human_rationale", "annotator_count", "discarded_count", "annotators", "_pushed",
             pl.col("_k").cast(pl.Int64))


def merge(pairs: pa.Table, annotations: pa.Table, cfg: MergeConfig | None = None) -> Output:
    """Pairs with human verdicts applied and provenance added; excluded rows go to quarantine."""
    cfg = cfg or MergeConfig()
    if cfg.unanswered not in ("keep_ai", "exclude") or cfg.ties not in ("exclude", "keep_ai"):
        raise ValueError("merge: unanswered must be keep_ai or exclude; ties must be exclude or keep_ai")
    df = _undo_merge(pl.from_arrow(pairs))
    if "label_source" not in df.columns:
        df = df.with_columns(pl.lit("ai").alias("label_source"))
    verdicts = resolve(annotations, cfg.policy)
    df = df.with_columns(pl.col("chosen_id").alias("ai_chosen_id") if "chosen_id" in df.columns
                         else pl.lit(None, pl.String).alias("ai_chosen_id"),
                         pl.col("rejected_id").alias("ai_rejected_id") if "rejected_id" in df.columns
                         else pl.lit(None, pl.String).alias("ai_rejected_id"))
    df = df.with_row_index("_pos").join(verdicts, on="pair_id", how="left").sort(
        ["_pos", "_k"], nulls_last=True).drop("_pos", "_k").with_columns(
        pl.col("annotator_count").fill_null(0), pl.col("discarded_count").fill_null(0),
        pl.col("annotators").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("_pushed").fill_null(False),
    )
    flip = pl.col("verdict") == "flip"
    df = df.with_columns(_swap_exprs(df.columns, flip))
    human = pl.col("verdict").is_in(["agree", "flip"])
    df = df.with_columns(
        pl.when(human).then(pl.lit("human")).otherwise(pl.col("label_source")).alias("label_source"),
        pl.col("verdict").alias("human_verdict"),
        pl.when(pl.col("verdict").is_null()).then(None).otherwise(pl.col("verdict") == "agree")
        .alias("human_agrees_with_ai"),
    )
    reason = (
        pl.when((pl.col("verdict") == "tie") & pl.lit(cfg.ties == "exclude")).then(pl.lit("human_tie"))
        .when(pl.col("_pushed") & pl.col("verdict").is_null() & pl.lit(cfg.unanswered == "exclude"))
        .then(pl.lit("unanswered"))
        .otherwise(None)
    )
    counts = {
        "human_agreed": int(df.filter(pl.col("verdict") == "agree").height),
        "human_flipped": int(df.filter(pl.col("verdict") == "flip").height),
        "human_ties": int(df.filter(pl.col("verdict") == "tie").height),
        "unanswered": int(df.filter(pl.col("_pushed") & pl.col("verdict").is_null()).height),
    }
    df = df.with_columns(reason.alias("_reason")).drop("verdict", "_pushed")
    kept = df.filter(pl.col("_reason").is_null()).drop("_reason")
    dropped = df.filter(pl.col("_reason").is_not_null()).rename({"_reason": "reason"})
    for r, n in dropped.group_by("reason").len().iter_rows():
        counts[f"dropped_{r}"] = int(n)
    return Output(_contract(kept), _contract(dropped) if dropped.height else None, counts)


def _contract(df: pl.DataFrame) -> pa.Table:
    return conform(conform(df.to_arrow(), PAIR), PAIR_OPTIONAL)


def _undo_merge(df: pl.DataFrame) -> pl.DataFrame:
    """Back to the AI labels if ``df`` is itself the output of a merge, so pulling twice is safe."""
    if "human_verdict" in df.columns:
        flipped = pl.col("human_verdict") == "flip"
        human = pl.col("human_verdict").is_in(["agree", "flip"]).fill_null(False)
        df = df.with_columns(_swap_exprs(df.columns, flipped.fill_null(False))).with_columns(
            pl.when(human).then(pl.lit("ai")).otherwise(pl.col("label_source")).alias("label_source"))
        df = df.unique(subset="pair_id", keep="first", maintain_order=True)  # keep_all repeated pairs
    return df.drop([c for c in PROVENANCE if c in df.columns])


def _swap_exprs(columns: list[str], flip: pl.Expr) -> list[pl.Expr]:
    """Expressions that turn the pair around where ``flip``: every chosen/rejected column pair
    (``chosen``/``rejected``, ``score_chosen``/``score_rejected`` …) swaps, ``margin`` and
    ``strength`` change sign, ``flip_prob`` becomes 1 − p, and CHES and the AI rationale
    (about the other order) become null, as in the noise step's flips."""
    exprs = []
    for c in columns:
        if "chosen" in c and c.replace("chosen", "rejected") in columns and not c.startswith("ai_"):
            other = c.replace("chosen", "rejected")
            exprs.append(pl.when(flip).then(pl.col(other)).otherwise(pl.col(c)).alias(c))
            exprs.append(pl.when(flip).then(pl.col(c)).otherwise(pl.col(other)).alias(other))
    for c in ("margin", "strength"):
        if c in columns:
            exprs.append(pl.when(flip).then(-pl.col(c)).otherwise(pl.col(c)).alias(c))
    if "flip_prob" in columns:
        exprs.append(pl.when(flip).then(1.0 - pl.col("flip_prob")).otherwise(pl.col("flip_prob")).alias("flip_prob"))
    for c in CLEARED_ON_FLIP:
        if c in columns:
            exprs.append(pl.when(flip).then(None).otherwise(pl.col(c)).alias(c))
    return exprs
