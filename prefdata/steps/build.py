"""Build preference pairs from scored responses, in TRL's conversational format.

``best_vs_random`` follows UltraFeedback-binarized (Cui et al. 2023, "UltraFeedback:
Boosting Language Models with Scaled AI Feedback"; the binarized recipe of Tunstall et
al. 2023, "Zephyr: Direct Distillation of LM Alignment"): chosen = the highest-scored
response, rejected = a random one of the rest. It is also the pairing of the CDR
reference code. ``best_vs_worst`` takes the lowest instead. With ``pairs_per_prompt: k``
both give up to k pairs with the same chosen (k random / the k lowest rejected; with
k = n − 1 these are the pairs Curry-DPO orders into a curriculum). ``all_pairs`` gives
every pair of a prompt's responses whose score gap is at least ``min_margin``, the k
widest gaps first with ``pairs_per_prompt``.

Rules shared by every strategy: a pair's margin is > 0 and >= ``min_margin`` (ties never
pair); two responses with the same text (compared by a 64-bit hash) never pair;
responses without a score are quarantined; a prompt left with no pair is counted. The
best among tied responses is the one with the smallest stable hash of ``response_id``;
the random choice is a stable hash of ``response_id`` and ``seed`` (``prefdata.pairs``),
so both are the same on every machine and polars version. Pairs come out in the input
order of their prompts.

Every ``score_*`` column of the response table (ensemble members, ``_std`` columns) is
carried to the pair as ``<col>_chosen`` / ``<col>_rejected`` (``carry`` picks others), so
the ``noise`` step can compute per-member score differences without a join.

All work is vectorised and needs no sort when each prompt's responses are adjacent (as
sampling writes them): per-prompt best/worst/random picks are segmented minima
(``np.minimum.reduceat``), all pairs are enumerated by offset inside each prompt's run,
and the output is gathered from the input Arrow columns with ``take`` — no Python loop
over rows, no join.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.pairs import assistant_messages, combine_unordered, fmix64, hash64, hex16, take
from prefdata.schema import PAIR, conform
from prefdata.step import MapStep, Output

STRATEGIES = ("best_vs_random", "best_vs_worst", "all_pairs")
SLICE_OFFSETS = 16  # all_pairs: offsets compared as whole shifted slices
PROMPT_LEVEL = ("prompt", "source")


@dataclass
class BuildPairsConfig:
    score: str = "score_cdr"
    strategy: str = "best_vs_random"
    seed: int = 0
    min_margin: float = 0.0
    pairs_per_prompt: int | None = None  # default: 1 for best_vs_*, every pair for all_pairs
    carry: list[str] | None = None  # response columns copied as <col>_chosen/_rejected; default score_*


class BuildPairs(MapStep):
    """Pairs per prompt: chosen/rejected by ``score`` and ``strategy``."""

    name = "build_pairs"
    Config = BuildPairsConfig

    def check(self) -> None:
        c = self.config
        if c.strategy not in STRATEGIES:
            raise ValueError(f"build_pairs: strategy must be one of {STRATEGIES}, got '{c.strategy}'")
        if c.min_margin < 0:
            raise ValueError("build_pairs: min_margin must be >= 0")
        if c.pairs_per_prompt is not None and c.pairs_per_prompt < 1:
            raise ValueError(f"build_pairs: pairs_per_prompt must be >= 1, got {c.pairs_per_prompt}")

    def input_columns(self) -> list[str]:
        return ["prompt_id", "prompt", "response_id", "response", self.config.score] + list(self.config.carry or [])

    def output_columns(self, columns: list[str]) -> list[str]:
        extra = [c for c in PROMPT_LEVEL if c in columns and c not in PAIR.names]
        carried = _carried(columns, self.config)
        return list(PAIR.names) + extra + [f"{c}_{side}" for c in carried for side in ("chosen", "rejected")]

    def process(self, table: pa.Table) -> Output:
        return build_pairs(table, self.config)


def build_pairs(table: pa.Table, cfg: BuildPairsConfig) -> Output:
    score = cfg.score
    scores = pl.from_arrow(table.select([score])).to_series().cast(pl.Float64)
    valid = (scores.is_not_null() & scores.is_not_nan()).fill_null(False).to_numpy()
    resp_hash = hash64(table.column("response_id"))
    runs = Runs.of(table, valid)
    s = scores.to_numpy()[runs.rows]
    r = resp_hash[runs.rows]
    t = pl.from_arrow(table.select(["response"])).to_series().hash().to_numpy()[runs.rows]  # equality only
    if cfg.strategy == "all_pairs":
        pos_c, pos_r = _all_pairs(runs, s, r, t, cfg)
    else:
        pos_c, pos_r = _best_vs_rest(runs, s, r, t, cfg)
    if runs.reordered:  # back to the input order of prompts, keeping the order within each
        order = np.argsort(runs.rows[runs.head[runs.seg[pos_c]]], kind="stable")
        pos_c, pos_r = pos_c[order], pos_r[order]
    out = _assemble(table, scores, resp_hash, runs.rows[pos_c], runs.rows[pos_r], cfg)
    seg = runs.seg[pos_c]
    n_with = int(np.count_nonzero(seg[1:] != seg[:-1])) + 1 if len(seg) else 0
    n_prompts = runs.n if valid.all() else pl.from_arrow(table.select(["prompt_id"])).to_series().n_unique()
    counts = {"pairs": out.num_rows, "prompts_without_pair": n_prompts - n_with}
    quarantine = None
    missing = np.flatnonzero(~valid)
    if len(missing):
        quarantine = table.take(pa.array(missing)).append_column(
            "reason", pa.repeat(pa.scalar(f"no {score} (score is null or NaN)"), len(missing)))
    return Output(out, quarantine=quarantine, counts=counts)


@dataclass
class Runs:
    """The scored rows laid out so each prompt's rows are one contiguous run.

    ``rows[p]`` is the input row at position p; ``seg[p]`` its run; ``head[k]`` and
    ``end[k]`` bound run k. Responses of a prompt usually arrive together (sampling writes
    them so), and then the layout is the input order, found without sorting; otherwise a
    stable sort by a hash of prompt_id makes the runs (by an exact rank on a collision).
    """

    rows: np.ndarray
    seg: np.ndarray
    head: np.ndarray
    end: np.ndarray
    reordered: bool

    @property
    def n(self) -> int:
        return len(self.head)

    @classmethod
    def of(cls, table: pa.Table, valid: np.ndarray) -> "Runs":
        rows = np.flatnonzero(valid)
        ids = pl.from_arrow(table.select(["prompt_id"])).to_series()
        keys = _group_keys(ids).to_numpy()[rows]
        ids = ids.gather(rows)
        reordered = False
        for attempt in ("input", "hash", "exact"):
            if attempt != "input":
                by = keys if attempt == "hash" else ids.rank("dense").to_numpy()
                order = np.argsort(by, kind="stable")
                rows, keys, ids, reordered = rows[order], keys[order], ids.gather(order), True
            heads = ids.ne_missing(ids.shift(1)).fill_null(True).to_numpy() if len(ids) else np.zeros(0, bool)
            # runs are exactly the prompts when no two runs share a key (equal ids share one)
            if attempt == "exact" or pl.Series(keys[heads]).is_unique().all():
                break
        seg = np.cumsum(heads, dtype=np.int32) - 1
        head = np.flatnonzero(heads)
        return cls(rows, seg, head, np.append(head[1:], len(rows)), reordered)


def _group_keys(prompt_ids: pl.Series) -> pl.Series:
    """Grouping keys only, never stored: polars' (fast, not version-stable) hash is fine."""
    return prompt_ids.hash()


def _first_per_run(runs_of_items: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Index of the item with the lexicographically smallest keys in each run of equal
    ``runs_of_items`` values (items in run order), in O(n) with reduceat per key."""
    if len(runs_of_items) == 0:
        return np.zeros(0, np.int64)
    head = np.empty(len(runs_of_items), bool)
    head[0] = True
    np.not_equal(runs_of_items[1:], runs_of_items[:-1], out=head[1:])
    seg = np.cumsum(head, dtype=np.int32) - 1
    starts = np.flatnonzero(head)
    alive = None
    for key in keys:
        masked = key if alive is None else np.where(alive, key, _top(key.dtype))
        lowest = np.minimum.reduceat(masked, starts)
        hit = masked == lowest[seg]
        alive = hit if alive is None else alive & hit
    hit = np.flatnonzero(alive)
    return hit[np.r_[True, seg[hit][1:] != seg[hit][:-1]]]


def _top(dtype) -> np.generic:
    return np.array(np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max, dtype=dtype)


def _best_vs_rest(runs: Runs, s, r, t, cfg: BuildPairsConfig) -> tuple[np.ndarray, np.ndarray]:
    best = _first_per_run(runs.seg, -s, r)  # per run: highest score, then smallest id hash
    b = best[runs.seg]  # each position's best
    pos = np.arange(len(s))
    cand = np.flatnonzero((pos != b) & (s < s[b]) & (s[b] - s >= cfg.min_margin) & (t != t[b]))
    worst = cfg.strategy == "best_vs_worst"
    key = s[cand] if worst else fmix64(r[cand] ^ fmix64(np.uint64(cfg.seed)))
    k = cfg.pairs_per_prompt or 1
    if k == 1:
        pick = cand[_first_per_run(runs.seg[cand], key, r[cand])]
        return b[pick], pick
    cand = cand[np.lexsort((r[cand], key, runs.seg[cand]))]
    first_text = pl.DataFrame({"g": runs.seg[cand], "t": t[cand]}).select(pl.struct("g", "t").is_first_distinct())
    cand = cand[first_text.to_series().to_numpy()]  # never two rejected with one text
    cand = cand[_rank_in_run(runs.seg[cand]) < k]
    return b[cand], cand


def _all_pairs(runs: Runs, s, r, t, cfg: BuildPairsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions (a, a + d) inside one run, for d = 1, 2, …; the higher chosen.

    Small offsets compare shifted slices of the whole layout (no gathers); once d is past
    SLICE_OFFSETS only positions in longer runs are followed.
    """
    n = len(s)
    longest = int((runs.end - runs.head).max(initial=0))
    a_parts, b_parts = [], []

    def keep_pairs(a: np.ndarray, b: np.ndarray) -> None:
        gap = np.abs(s[a] - s[b])
        ok = (gap > 0) & (gap >= cfg.min_margin) & (t[a] != t[b])
        a_parts.append(a[ok])
        b_parts.append(b[ok])

    d = 1
    while d < longest and d <= SLICE_OFFSETS:
        gap = np.abs(s[:-d] - s[d:])
        ok = (runs.seg[:-d] == runs.seg[d:]) & (gap > 0) & (gap >= cfg.min_margin) & (t[:-d] != t[d:])
        a = np.flatnonzero(ok)
        a_parts.append(a)
        b_parts.append(a + d)
        d += 1
    if d < longest:
        end = runs.end[runs.seg]
        a = np.flatnonzero(np.arange(n) + d < end)
        while len(a):
            keep_pairs(a, a + d)
            d += 1
            a = a[a + d < end[a]]
    a = np.concatenate(a_parts) if a_parts else np.zeros(0, np.int64)
    b = np.concatenate(b_parts) if b_parts else np.zeros(0, np.int64)
    higher = s[a] > s[b]
    c, rj = np.where(higher, a, b), np.where(higher, b, a)
    if cfg.pairs_per_prompt is None:
        order = np.argsort(a * (longest + 1) + (b - a), kind="stable")  # position order within each prompt
        return c[order], rj[order]
    tie = combine_unordered(r[c], r[rj])
    order = np.lexsort((tie, -(s[c] - s[rj]), runs.seg[c]))  # widest gap first within the prompt
    c, rj = c[order], rj[order]
    keep = _rank_in_run(runs.seg[c]) < cfg.pairs_per_prompt
    return c[keep], rj[keep]


def _rank_in_run(values: np.ndarray) -> np.ndarray:
    """0, 1, 2 … within each run of equal values."""
    if len(values) == 0:
        return np.zeros(0, np.int64)
    head = np.r_[True, values[1:] != values[:-1]]
    idx = np.arange(len(values))
    return idx - np.maximum.accumulate(np.where(head, idx, 0))


def _label_source(score: str) -> str:
    """Pairs rebuilt from imported ratings keep the original label; any scorer's is 'ai'."""
    return "original" if score.startswith("score_original") else "ai"


def _carried(columns: list[str], cfg: BuildPairsConfig) -> list[str]:
    if cfg.carry is not None:
        return list(cfg.carry)
    return [c for c in columns if c.startswith("score_")]


def _assemble(table: pa.Table, scores: pl.Series, h: np.ndarray, rows_c: np.ndarray, rows_r: np.ndarray,
              cfg: BuildPairsConfig) -> pa.Table:
    ids = table.column("response_id")
    s = scores.to_numpy()
    n = len(rows_c)
    sc, sr = s[rows_c], s[rows_r]
    cols = {
        "pair_id": hex16(combine_unordered(h[rows_c], h[rows_r])),
        "prompt_id": take(table.column("prompt_id"), rows_c),
        "prompt": take(table.column("prompt"), rows_c),
        "chosen": assistant_messages(take(table.column("response"), rows_c)),
        "rejected": assistant_messages(take(table.column("response"), rows_r)),
        "chosen_id": take(ids, rows_c),
        "rejected_id": take(ids, rows_r),
        "score_chosen": pa.array(sc, pa.float64()),
        "score_rejected": pa.array(sr, pa.float64()),
        "margin": pa.array(sc - sr, pa.float64()),
        "pair_strategy": pa.repeat(pa.scalar(cfg.strategy, pa.string()), n),
        "label_source": pa.repeat(pa.scalar(_label_source(cfg.score), pa.string()), n),
    }
    for c in PROMPT_LEVEL:
        if c in table.column_names and c not in cols:
            cols[c] = take(table.column(c), rows_c)
    for c in _carried(table.column_names, cfg):
        if c not in table.column_names:
            raise ValueError(f"build_pairs: carry column '{c}' is not in the response table")
        cols[f"{c}_chosen"] = take(table.column(c), rows_c)
        cols[f"{c}_rejected"] = take(table.column(c), rows_r)
    return conform(pa.table(cols), PAIR)
