"""Preference trees: responses split into steps, shared prefixes merged, pairs from siblings.

Liao et al. 2024, "TPO: Aligning Large Language Models with Multi-branch & Multi-step
Preference Trees"; Yuan et al. 2024, "Advancing LLM Reasoning Generalists with
Preference Trees" (Eurus / UltraInteract); Lai et al. 2024, "Step-DPO: Step-wise
Preference Optimization for Long-chain Reasoning of LLMs". Each response is a path of
steps (its non-empty lines, or its sentences); paths of one prompt that start with the
same steps share those nodes, so the responses of a prompt form a trie under the prompt.

``build_tree`` writes one row per node: ``node_id`` (a stable hash of the prompt and the
step texts from the top to this node, so equal prefixes are one node), ``parent_id``
(null for a first step: the prompts' tries together form a forest), ``prompt_id``,
``text`` (the step), ``depth``, ``value`` = mean score of the responses through the node
(the leaves below it; a Monte-Carlo value as in Math-Shepherd-style step labels),
``n_responses`` and ``is_leaf`` (some response ends here).

``tree_pairs`` pairs siblings — two children of one node, i.e. two different next steps
after the same prefix — with chosen = the higher value (gap >= ``min_margin``, > 0). In
TRL's format ``chosen``/``rejected`` hold the shared prefix plus the step; the prefix
is the same on both sides, so its log-ratio cancels in the DPO margin and plain DPO on
these rows is step-level DPO. ``prefix``, ``chosen_step`` and ``rejected_step`` give the
Step-DPO layout for trainers that want it. Sentence splitting is a simple rule (a run of
text up to ``.``, ``!`` or ``?``), so "3.14" splits; use ``lines`` for reasoning traces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.pairs import assistant_messages, combine_unordered, fmix64, hash64, hex16, to_arrow
from prefdata.schema import PAIR, conform
from prefdata.step import MapStep, Output

SPLITS = {"lines": "\n", "sentences": " "}  # how steps are split, and joined back
NODE_COLUMNS = ["node_id", "parent_id", "prompt_id", "text", "depth", "value", "n_responses", "is_leaf"]
PAIR_EXTRA = ["parent_id", "depth", "prefix", "chosen_step", "rejected_step"]
_SENTENCE = r"[^.!?]*[.!?]+|[^.!?]+$"


@dataclass
class BuildTreeConfig:
    score: str = "score_cdr"
    split: str = "lines"


@dataclass
class TreePairsConfig:
    score: str = "score_cdr"
    split: str = "lines"
    min_margin: float = 0.0
    pairs_per_parent: int | None = None  # the widest gaps first; default every sibling pair


def _check_split(step: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{step}: split must be one of {list(SPLITS)}, got '{split}'")


class BuildTree(MapStep):
    """One row per node of each prompt's response tree."""

    name = "build_tree"
    Config = BuildTreeConfig

    def check(self) -> None:
        _check_split(self.name, self.config.split)

    def input_columns(self) -> list[str]:
        return ["prompt_id", "response_id", "response", self.config.score]

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(NODE_COLUMNS)

    def process(self, table: pa.Table) -> Output:
        nodes, _, quarantine, counts = tree_nodes(table, self.config.score, self.config.split)
        return Output(to_arrow(nodes.select(NODE_COLUMNS)), quarantine=quarantine, counts=counts)


class TreePairs(MapStep):
    """Step-level pairs from sibling nodes of each prompt's response tree."""

    name = "tree_pairs"
    Config = TreePairsConfig

    def check(self) -> None:
        _check_split(self.name, self.config.split)
        if self.config.min_margin < 0:
            raise ValueError("tree_pairs: min_margin must be >= 0")
        if self.config.pairs_per_parent is not None and self.config.pairs_per_parent < 1:
            raise ValueError("tree_pairs: pairs_per_parent must be >= 1")

    def input_columns(self) -> list[str]:
        return ["prompt_id", "prompt", "response_id", "response", self.config.score]

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(PAIR.names) + PAIR_EXTRA + (["source"] if "source" in columns else [])

    def process(self, table: pa.Table) -> Output:
        return tree_pairs(table, self.config)


def split_steps(text: pl.Expr, split: str) -> pl.Expr:
    """The non-empty, stripped steps of each text, as a list."""
    parts = text.str.split("\n") if split == "lines" else text.str.extract_all(_SENTENCE)
    return parts.list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))


def tree_nodes(table: pa.Table, score: str, split: str):
    """(nodes, paths, quarantine, counts); ``paths`` has one row per (response, step) with
    its ``node_id``/``parent_id``, ``_row`` (the response's input row) and ``_steps`` (all its steps)."""
    df = pl.from_arrow(table.select(["prompt_id", "response_id", "response", score]))
    df = df.with_row_index("_row").with_columns(pl.col(score).cast(pl.Float64).alias("_s"))
    missing = (pl.col("_s").is_null() | pl.col("_s").is_nan()).fill_null(True)
    quarantine = None
    n_missing = int(df.select(missing.sum()).item())
    if n_missing:
        rows = df.filter(missing)["_row"].to_numpy()
        quarantine = table.take(pa.array(rows)).append_column(
            "reason", pa.repeat(pa.scalar(f"no {score} (score is null or NaN)"), n_missing))
    df = df.filter(~missing).with_columns(_steps=split_steps(pl.col("response"), split))
    df = df.with_columns(_last=pl.col("_steps").list.len().cast(pl.Int64) - 1)
    order = df.select("prompt_id").unique(maintain_order=True).with_row_index("_po")
    paths = (df.filter(pl.col("_last") >= 0).join(order, on="prompt_id", maintain_order="left")
             .with_columns(text=pl.col("_steps"), depth=pl.int_ranges(0, pl.col("_last") + 1))
             .explode(["text", "depth"]))
    node = _prefix_hashes(paths)
    parent = np.where(paths["depth"].to_numpy() > 0, np.roll(node, 1), 0)
    paths = paths.with_columns(
        node_id=pl.Series(hex16(node)), parent_id=pl.Series(hex16(parent)),
    ).with_columns(parent_id=pl.when(pl.col("depth") > 0).then(pl.col("parent_id")))
    nodes = paths.group_by("node_id").agg(
        pl.col("parent_id").first(), pl.col("prompt_id").first(), pl.col("text").first(),
        pl.col("depth").first().cast(pl.Int64), pl.col("_po").first(),
        value=pl.col("_s").mean(), n_responses=pl.len().cast(pl.Int64),
        is_leaf=(pl.col("depth") == pl.col("_last")).any(),
    ).sort(["_po", "depth", "node_id"])
    counts = {"nodes": nodes.height, "responses_without_steps": int(df.select((pl.col("_last") < 0).sum()).item())}
    return nodes, paths, quarantine, counts


def _prefix_hashes(paths: pl.DataFrame) -> np.ndarray:
    """Node hash per path row: the prompt, then each step text folded in, top down.

    Rows are ordered by response, then depth, so a row's parent is the row before it; the
    loop runs over depths (not rows), each level one vectorised update.
    """
    depth = paths["depth"].to_numpy()
    steps = hash64(paths["text"])
    h = fmix64(hash64(paths["prompt_id"]) ^ np.uint64(0x5851F42D4C957F2D))
    out = np.empty_like(h)
    for d in range(int(depth.max(initial=-1)) + 1):
        rows = np.flatnonzero(depth == d)
        parent = h[rows] if d == 0 else out[rows - 1]
        out[rows] = fmix64(fmix64(parent) ^ steps[rows])
    return out


def tree_pairs(table: pa.Table, cfg: TreePairsConfig) -> Output:
    nodes, paths, quarantine, counts = tree_nodes(table, cfg.score, cfg.split)
    sib = nodes.with_columns(_pk=pl.concat_str(pl.col("prompt_id"), pl.col("parent_id").fill_null("")))
    sib = sib.select("_po", "_pk", "prompt_id", "parent_id", "depth", "node_id", "text", "value")
    pairs = sib.join(sib.select("_pk", "node_id", "text", "value"), on="_pk", suffix="_r").filter(
        (pl.col("value") > pl.col("value_r")) & (pl.col("value") - pl.col("value_r") >= cfg.min_margin)
    ).with_columns(margin=pl.col("value") - pl.col("value_r"))
    pairs = pairs.sort(["_po", "depth", "_pk", "margin", "node_id", "node_id_r"],
                       descending=[False, False, False, True, False, False])
    if cfg.pairs_per_parent is not None:
        pairs = pairs.group_by("_pk", maintain_order=True).head(cfg.pairs_per_parent)
    sep = SPLITS[cfg.split]
    # the shared prefix of a parent: the first depth steps of any response through one of its children
    prefix = (paths.filter(pl.col("depth") > 0).group_by("parent_id")
              .agg(pl.col("_steps").first(), pl.col("depth").first())
              .select("parent_id", prefix=pl.col("_steps").list.slice(0, pl.col("depth")).list.join(sep)))
    pairs = pairs.join(prefix, on="parent_id", how="left", maintain_order="left")
    pairs = pairs.with_columns(pl.col("prefix").fill_null(""))
    lead = pl.when(pl.col("prefix") == "").then(pl.lit("")).otherwise(pl.col("prefix") + sep)
    pairs = pairs.with_columns(_c=lead + pl.col("text"), _r=lead + pl.col("text_r"))
    keep = ["prompt_id", "prompt"] + (["source"] if "source" in table.column_names else [])
    prompts = pl.from_arrow(table.select(keep)).unique("prompt_id", keep="first", maintain_order=True)
    pairs = pairs.join(prompts, on="prompt_id", how="left", maintain_order="left")
    n = pairs.height
    col = lambda name: to_arrow(pairs.select(name)).column(0)  # noqa: E731
    out = {
        "pair_id": hex16(combine_unordered(hash64(pairs["node_id"]), hash64(pairs["node_id_r"]))),
        "prompt_id": col("prompt_id"),
        "prompt": col("prompt"),
        "chosen": assistant_messages(pairs["_c"]),
        "rejected": assistant_messages(pairs["_r"]),
        "chosen_id": col("node_id"),
        "rejected_id": col("node_id_r"),
        "score_chosen": col("value"),
        "score_rejected": col("value_r"),
        "margin": col("margin"),
        "pair_strategy": pa.repeat(pa.scalar("tree_siblings", pa.string()), n),
        "label_source": pa.repeat(pa.scalar("ai", pa.string()), n),
        "parent_id": col("parent_id"),
        "depth": col("depth"),
        "prefix": col("prefix"),
        "chosen_step": col("text"),
        "rejected_step": col("text_r"),
    }
    if "source" in pairs.columns:
        out["source"] = col("source")
    counts.update(pairs=n, parents_without_pair=sib["_pk"].n_unique() - pairs["_pk"].n_unique())
    return Output(conform(pa.table(out), PAIR), quarantine=quarantine, counts=counts)


