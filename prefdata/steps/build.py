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

``rso`` accepts samples as draws from the optimal policy π* ∝ π_sft·exp(r/β) by statistical
rejection sampling (Liu et al. 2024, "Statistical Rejection Sampling Improves Preference
Optimization"; ``prefdata.rso``, β = ``rso_beta``) and pairs consecutive accepted samples,
the higher score chosen: ``pairs_per_prompt`` pairs from 2·k accepted samples, seeded by
``seed`` and the prompt. ``label_prob: true`` adds ``label_prob`` = σ(score_chosen −
score_rejected), the Bradley–Terry probability that chosen is preferred, a soft label
that ``cdpo``/``rdpo`` training can use per pair.

``original`` gives back the pairs ``import_pairs`` read, exactly: one pair per
``original_pair`` id, chosen = the row whose ``original_role`` is ``chosen``, however many
pairs share a prompt (a best-vs-rest strategy would recombine two pairs of one prompt into
pairs nobody compared, still labelled ``original``). ``score`` then only fills
``score_chosen``/``score_rejected``/``margin`` (a margin may be <= 0 when ``score`` is a
new scorer that disagrees with the original label). ``strategy: auto`` (the default) is
``original`` when ``score`` is an original label (``score_original…``) and the responses
carry ``original_pair``, else ``best_vs_random``; asking for another strategy on such a
table is refused, since its pairs would wear an original label they never had.

Rules shared by the score-based strategies: a pair's margin is > 0 and >= ``min_margin``
(ties never pair); two responses with the same text (compared by a 64-bit hash) never
pair; responses without a score are quarantined. Nothing is left out silently: a prompt
left with no pair is counted in ``prompts_without_pair`` and, by reason, in
``dropped_prompt_<reason>`` (``no_score``, ``all_truncated``, ``single_response``,
``tied``, ``identical_texts``, ``below_min_margin``); an original pair that cannot be
given back in ``dropped_pair_<reason>`` (``missing_side``, ``no_score``, ``truncated``,
``identical_texts``); responses set aside in ``dropped_response_<reason>``
(``truncated``, ``not_original``, ``duplicate``).

``drop_truncated: true`` leaves out responses whose ``finish_reason`` is ``length`` (cut
at ``max_new_tokens`` by ``sample``) before pairing; the step refuses to run without that
column rather than pretend it filtered.

The best among tied responses is the one with the smallest stable hash of
``response_id``; the random choice is a stable hash of ``response_id`` and ``seed``
(``prefdata.pairs``), so both are the same on every machine and polars version. Pairs
come out in the input order of their prompts.

Every ``score_*`` column of the response table (ensemble members, ``_std`` columns) is
carried to the pair as ``<col>_chosen`` / ``<col>_rejected`` (``carry`` picks others), so
the ``noise`` step can compute per-member score differences without a join.

The score-based strategies are vectorised and need no sort when each prompt's responses
are adjacent (as sampling writes them): per-prompt best/worst/random picks are segmented
minima (``np.minimum.reduceat``), all pairs are enumerated by offset inside each prompt's
run, and the output is gathered from the input Arrow columns with ``take`` — no Python
loop over rows, no join. ``original`` matches the two sides of each pair with one polars
join on ``original_pair``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from prefdata.pairs import assistant_messages, combine_unordered, fmix64, hash64, hex16, take
from prefdata.schema import PAIR, conform
from prefdata.step import MapStep, Output

STRATEGIES = ("auto", "best_vs_random", "best_vs_worst", "all_pairs", "original", "rso")
SLICE_OFFSETS = 16  # all_pairs: offsets compared as whole shifted slices
PROMPT_LEVEL = ("prompt", "source")
ORIGINAL_COLUMNS = ("original_pair", "original_role")


@dataclass
class BuildPairsConfig:
    score: str = "score_cdr"
    strategy: str = "auto"  # auto | best_vs_random | best_vs_worst | all_pairs | original
    seed: int = 0
    min_margin: float = 0.0
    pairs_per_prompt: int | None = None  # default: 1 for best_vs_*, every pair for all_pairs
    carry: list[str] | None = None  # response columns copied as <col>_chosen/_rejected; default score_*
    drop_truncated: bool = False  # leave out responses with finish_reason == "length"
    rso_beta: float = 1.0  # strategy rso: β of π* ∝ π_sft·exp(r/β) (prefdata.rso)
    label_prob: bool = False  # add label_prob = σ(score_chosen − score_rejected), a Bradley–Terry soft label


class BuildPairs(MapStep):
    """Pairs per prompt: chosen/rejected by ``score`` and ``strategy``."""

    name = "build_pairs"
    version = "2"  # 2: imported pairs given back exactly (strategy original/auto), dropped_* counts
    Config = BuildPairsConfig

    def check(self) -> None:
        c = self.config
        if c.strategy not in STRATEGIES:
            raise ValueError(f"build_pairs: strategy must be one of {STRATEGIES}, got '{c.strategy}'")
        if c.min_margin < 0:
            raise ValueError("build_pairs: min_margin must be >= 0")
        if c.pairs_per_prompt is not None and c.pairs_per_prompt < 1:
            raise ValueError(f"build_pairs: pairs_per_prompt must be >= 1, got {c.pairs_per_prompt}")
        if not c.rso_beta > 0:
            raise ValueError(f"build_pairs: option 'rso_beta' (β of strategy rso) must be > 0, got {c.rso_beta}")
        if c.strategy == "original" and (c.min_margin > 0 or c.pairs_per_prompt is not None):
            raise ValueError("build_pairs: strategy 'original' gives back every imported pair as it was; "
                             "min_margin and pairs_per_prompt do not apply to it. Remove them, or filter "
                             "the pairs in a later step (e.g. noise)")

    def input_columns(self) -> list[str]:
        c = self.config
        extra = ["finish_reason"] if c.drop_truncated else []
        return ["prompt_id", "prompt", "response_id", "response", c.score] + list(c.carry or []) + extra

    def output_columns(self, columns: list[str]) -> list[str]:
        resolve_strategy(columns, self.config)  # refuse a recombining strategy before any work
        extra = [c for c in PROMPT_LEVEL if c in columns and c not in PAIR.names]
        carried = _carried(columns, self.config)
        soft = ["label_prob"] if self.config.label_prob else []
        return list(PAIR.names) + extra + soft + [f"{c}_{side}" for c in carried for side in ("chosen", "rejected")]

    def process(self, table: pa.Table) -> Output:
        return build_pairs(table, self.config)


def resolve_strategy(columns: list[str], cfg: BuildPairsConfig) -> str:
    """``auto`` made concrete; an original label over imported pairs only pairs as imported."""
    imported = "original_pair" in columns and cfg.score.startswith("score_original")
    if cfg.strategy == "auto":
        if imported and (cfg.min_margin > 0 or cfg.pairs_per_prompt is not None):
            raise ValueError("build_pairs: with score_original on imported pairs, strategy auto gives back "
                             "the imported pairs as they were, so min_margin and pairs_per_prompt do not "
                             "apply; remove them, or filter the pairs in a later step")
        return "original" if imported else "best_vs_random"
    if imported and cfg.strategy != "original":
        raise ValueError(
            f"build_pairs: strategy '{cfg.strategy}' with score '{cfg.score}' would pair responses of "
            "different imported pairs (when a prompt carries several) and label them 'original' although "
            "nobody compared them; set `strategy: original` (or leave strategy unset) to keep the imported "
            "pairs, or score the responses and build pairs on that score")
    return cfg.strategy


def build_pairs(table: pa.Table, cfg: BuildPairsConfig) -> Output:
    strategy = resolve_strategy(table.column_names, cfg)
    score = cfg.score
    scores = pl.from_arrow(table.select([score])).to_series().cast(pl.Float64)
    valid = (scores.is_not_null() & scores.is_not_nan()).fill_null(False).to_numpy()
    truncated = _truncated(table) if cfg.drop_truncated else np.zeros(table.num_rows, bool)
    usable = valid & ~truncated
    counts: Counter = Counter()
    if truncated.any():
        counts["dropped_response_truncated"] = int(np.count_nonzero(truncated & valid))
    resp_hash = hash64(table.column("response_id"))
    text_hash = pl.from_arrow(table.select(["response"])).to_series().hash().to_numpy()  # equality only
    if strategy == "original":
        rows_c, rows_r = _original_pairs(table, valid, truncated, text_hash, counts)
    else:
        rows_c, rows_r = _scored_pairs(table, usable, scores, resp_hash, text_hash, strategy, cfg, counts)
        counts.update(_prompts_without_usable(table, valid, usable, counts["paired_prompts"]))
        del counts["paired_prompts"]
    out = _assemble(table, scores, resp_hash, rows_c, rows_r, cfg, strategy)
    counts["pairs"] = out.num_rows
    quarantine = None
    missing = np.flatnonzero(~valid)
    if len(missing):
        quarantine = table.take(pa.array(missing)).append_column(
            "reason", pa.repeat(pa.scalar(f"no {score} (score is null or NaN)"), len(missing)))
    return Output(out, quarantine=quarantine, counts=dict(counts))


def _truncated(table: pa.Table) -> np.ndarray:
    if "finish_reason" not in table.column_names:
        raise ValueError(
            "build_pairs: drop_truncated: true needs the 'finish_reason' column (stop | length) that "
            f"`sample` writes, but the response table has none (columns: {table.column_names}); sample the "
            "responses with a prefdata version that records finish_reason, or set drop_truncated: false")
    reasons = pl.from_arrow(table.select(["finish_reason"])).to_series().cast(pl.String)
    return (reasons == "length").fill_null(False).to_numpy()


def _scored_pairs(table, usable, scores, resp_hash, text_hash, strategy, cfg, counts):
    """Rows of chosen and rejected for the score-based strategies, counting prompts without a pair."""
    runs = Runs.of(table, usable)
    s = scores.to_numpy()[runs.rows]
    r = resp_hash[runs.rows]
    t = text_hash[runs.rows]
    if strategy == "all_pairs":
        pos_c, pos_r = _all_pairs(runs, s, r, t, cfg)
    elif strategy == "rso":  # Liu et al. 2024 rejection sampling, then pairs of accepted samples
        from prefdata.rso import rso_pairs

        keys = hash64(take(table.column("prompt_id"), runs.rows[runs.head]))
        pos_c, pos_r = rso_pairs(s, r, t, runs.head, runs.end, keys, cfg.rso_beta, cfg.pairs_per_prompt or 1,
                                 cfg.seed, cfg.min_margin)
    else:
        pos_c, pos_r = _best_vs_rest(runs, s, r, t, cfg, strategy)
    paired = np.zeros(runs.n, bool)
    paired[runs.seg[pos_c]] = True
    counts.update(_no_pair_reasons(runs, s, r, t, paired, strategy))
    counts["paired_prompts"] = int(paired.sum())
    if runs.reordered:  # back to the input order of prompts, keeping the order within each
        order = np.argsort(runs.rows[runs.head[runs.seg[pos_c]]], kind="stable")
        pos_c, pos_r = pos_c[order], pos_r[order]
    return runs.rows[pos_c], runs.rows[pos_r]


def _no_pair_reasons(runs: "Runs", s, r, t, paired: np.ndarray, strategy: str) -> Counter:
    """Why each prompt with usable responses got no pair: one reason per prompt, the first that holds."""
    if runs.n == 0:
        return Counter()
    size = runs.end - runs.head
    top = np.maximum.reduceat(s, runs.head)
    low = np.minimum.reduceat(s, runs.head)
    if strategy == "all_pairs":  # two texts and two scores always make a pair (unless min_margin)
        other_text = np.logical_or.reduceat(t != t[runs.head[runs.seg]], runs.head)
    else:
        best = _first_per_run(runs.seg, -s, r)[runs.seg]
        other_text = np.logical_or.reduceat((s < s[best]) & (t != t[best]), runs.head)
    reason = np.select([paired, size == 1, top == low, ~other_text],
                       ["", "single_response", "tied", "identical_texts"], "below_min_margin")
    return Counter({f"dropped_prompt_{k}": int(v) for k, v in zip(*np.unique(reason[~paired], return_counts=True))})


def _prompts_without_usable(table: pa.Table, valid: np.ndarray, usable: np.ndarray, paired: int) -> Counter:
    """``prompts_without_pair`` over all prompts, and why those with no usable response have none."""
    ids = pl.from_arrow(table.select(["prompt_id"])).to_series()
    if usable.all():
        return Counter(prompts_without_pair=ids.n_unique() - paired)
    per = pl.DataFrame({"id": ids, "valid": valid, "usable": usable}).group_by("id").agg(
        pl.col("valid").any(), pl.col("usable").any())
    out = Counter(prompts_without_pair=per.height - paired)
    none = per.filter(~pl.col("usable"))
    if none.height:
        n_truncated = int(none["valid"].sum())
        out.update({"dropped_prompt_all_truncated": n_truncated, "dropped_prompt_no_score": none.height - n_truncated})
    return +out


def _original_pairs(table: pa.Table, valid, truncated, text_hash, counts: Counter) -> tuple[np.ndarray, np.ndarray]:
    """Each ``original_pair``'s chosen and rejected row, in the order the pairs first appear."""
    missing = [c for c in ORIGINAL_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"build_pairs: strategy 'original' pairs the responses by the columns {list(ORIGINAL_COLUMNS)} "
            f"that import_pairs writes, but the response table has no {missing}; import the pairs with "
            "import_pairs, or choose a score-based strategy")
    df = pl.from_arrow(table.select(list(ORIGINAL_COLUMNS))).with_row_index("i")
    df = df.rename({"original_pair": "pair", "original_role": "role"})
    ok = pl.col("pair").is_not_null() & pl.col("role").is_in(["chosen", "rejected"])
    n_other = df.height - df.filter(ok).height
    df = df.filter(ok)
    first = df.unique(["pair", "role"], keep="first", maintain_order=True)
    sides = {role: first.filter(pl.col("role") == role).select("pair", pl.col("i").alias(role))
             for role in ("chosen", "rejected")}
    both = sides["chosen"].join(sides["rejected"], on="pair", how="full", coalesce=True)
    both = both.sort(pl.min_horizontal("chosen", "rejected"))
    whole = both.filter(pl.col("chosen").is_not_null() & pl.col("rejected").is_not_null())
    c = whole["chosen"].to_numpy().astype(np.int64)
    r = whole["rejected"].to_numpy().astype(np.int64)
    same = text_hash[c] == text_hash[r]
    if same.any():  # a 64-bit hash may collide: confirm on the texts themselves
        texts = table.column("response")
        hit = np.flatnonzero(same)
        same[hit] = np.asarray(pc.equal(take(texts, c[hit]), take(texts, r[hit])).fill_null(False))
    status = np.select([~(valid[c] & valid[r]), truncated[c] | truncated[r], same],
                       ["no_score", "truncated", "identical_texts"], "")
    dropped = Counter({f"dropped_pair_{k}": int(v) for k, v in zip(*np.unique(status[status != ""],
                                                                             return_counts=True))})
    dropped.update({"dropped_pair_missing_side": both.height - whole.height,
                    "dropped_response_not_original": n_other, "dropped_response_duplicate": df.height - first.height})
    counts.update(+dropped)
    keep = status == ""
    return c[keep], r[keep]


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


def _best_vs_rest(runs: Runs, s, r, t, cfg: BuildPairsConfig, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    best = _first_per_run(runs.seg, -s, r)  # per run: highest score, then smallest id hash
    b = best[runs.seg]  # each position's best
    pos = np.arange(len(s))
    cand = np.flatnonzero((pos != b) & (s < s[b]) & (s[b] - s >= cfg.min_margin) & (t != t[b]))
    worst = strategy == "best_vs_worst"
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


def _label_source(score: str, strategy: str) -> str:
    """Imported pairs and pairs rebuilt from imported ratings keep the original label; a scorer's is 'ai'."""
    return "original" if strategy == "original" or score.startswith("score_original") else "ai"


def _carried(columns: list[str], cfg: BuildPairsConfig) -> list[str]:
    if cfg.carry is not None:
        return list(cfg.carry)
    return [c for c in columns if c.startswith("score_")]


def _assemble(table: pa.Table, scores: pl.Series, h: np.ndarray, rows_c: np.ndarray, rows_r: np.ndarray,
              cfg: BuildPairsConfig, strategy: str) -> pa.Table:
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
        "pair_strategy": pa.repeat(pa.scalar(strategy, pa.string()), n),
        "label_source": pa.repeat(pa.scalar(_label_source(cfg.score, strategy), pa.string()), n),
    }
    for c in PROMPT_LEVEL:
        if c in table.column_names and c not in cols:
            cols[c] = take(table.column(c), rows_c)
    if cfg.label_prob:  # P(chosen ≻ rejected) under Bradley–Terry on the score: σ(margin)
        cols["label_prob"] = pa.array(0.5 * (1.0 + np.tanh(0.5 * (sc - sr))), pa.float64())
    for c in _carried(table.column_names, cfg):
        if c not in table.column_names:
            raise ValueError(f"build_pairs: carry column '{c}' is not in the response table")
        cols[f"{c}_chosen"] = take(table.column(c), rows_c)
        cols[f"{c}_rejected"] = take(table.column(c), rows_r)
    return conform(pa.table(cols), PAIR)
