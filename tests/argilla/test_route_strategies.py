"""The route step picks exactly the expected pairs on a hand-made table (no server needed)."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from prefdata.steps.route import Route, budget_count, hybrid_features

LONG = " ".join(f"word{i}" for i in range(40))
ROWS = [
    # pair, flip_prob, strength, judge_agreement, judge_rate, prompt, chosen, rejected
    ("p0", 0.05, 2.0, True, 1.0, "hi", "the cat sat on the mat", "the cat sat on the mat"),
    ("p1", 0.90, -0.1, False, 0.5, "hi", "alpha beta gamma", "delta epsilon zeta"),
    ("p2", 0.30, 0.5, True, 0.9, "hi", "one two three four five", "one two three four six"),
    ("p3", 0.60, 0.05, False, 0.25, "hi", "red green", "blue yellow"),
    ("p4", None, 1.0, True, 1.0, "hi", "yes", "no " * 20),
    ("p5", 0.55, -0.3, True, 0.75, "hi", "sun moon", "star sky"),
    ("p6", 0.10, None, False, 0.5, LONG, "left right", "up down"),
    ("p7", 0.45, 0.8, True, 1.0, "hi", "north south", "east west"),
]


def table(label_source: dict[str, str] | None = None) -> pa.Table:
    label_source = label_source or {}
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return pa.Table.from_pylist([
        {"pair_id": p, "prompt_id": f"q-{p}", "prompt": msg("user", prompt), "chosen": msg("assistant", c),
         "rejected": msg("assistant", r), "flip_prob": fp, "strength": st, "judge_agreement": ja,
         "judge_rate": jr, "label_source": label_source.get(p, "ai")}
        for p, fp, st, ja, jr, prompt, c, r in ROWS
    ])


def routed(_labels: dict[str, str] | None = None, **options) -> tuple[set[str], dict]:
    out = Route(**options).process(pl.from_arrow(table(_labels)).lazy())
    df = pl.from_arrow(out.table)
    assert df.height == len(ROWS) and df["pair_id"].to_list() == [r[0] for r in ROWS]  # all rows, same order
    return set(df.filter(pl.col("route") == "human")["pair_id"]), out.counts


def test_flip_prob_takes_the_highest():
    assert routed(strategy="flip_prob", budget=3)[0] == {"p1", "p3", "p5"}
    assert routed(strategy="flip_prob", budget=0.25)[0] == {"p1", "p3"}  # 2 of 8
    picked, counts = routed(strategy="flip_prob", budget=8)
    assert picked == {"p0", "p1", "p2", "p3", "p5", "p6", "p7"}  # a pair without flip_prob is never picked
    assert counts == {"routed_human": 7, "routed_ai": 1, "route_no_score": 1}


def test_strength_takes_the_smallest_magnitude():
    assert routed(strategy="strength", budget=2)[0] == {"p3", "p1"}
    assert routed(strategy="strength", budget=3)[0] == {"p3", "p1", "p5"}


def test_judge_disagreement_from_a_bool_or_a_rate():
    assert routed(strategy="judge_disagreement", budget=3)[0] == {"p1", "p3", "p6"}
    assert routed(strategy="judge_disagreement", budget=1, judge_column="judge_rate")[0] == {"p3"}


def test_hybrid_features_and_gain():
    feats = pl.from_arrow(table()).select(**hybrid_features())
    assert feats["similarity"][0] == 1.0 and feats["similarity"][1] == 0.0
    assert feats["similarity"][2] == pytest.approx(4 / 6)
    assert feats["length_diff"][4] == pytest.approx(19 / 20)
    assert feats["prompt_length"].arg_max() == 6
    similar = routed(strategy="hybrid", budget=2, weights={"similarity": 1.0})[0]
    assert similar == {"p0", "p2"}
    assert routed(strategy="hybrid", budget=1, weights={"length_diff": 1.0})[0] == {"p4"}
    assert routed(strategy="hybrid", budget=1, weights={"prompt_length": 1.0})[0] == {"p6"}
    assert routed(strategy="hybrid", budget=1, weights={"similarity": 1.0, "prompt_length": 0.1})[0] == {"p0"}


def test_human_labelled_pairs_use_no_budget():
    picked, counts = routed(strategy="flip_prob", budget=2, _labels={"p1": "human"})
    assert picked == {"p1", "p3", "p5"} and counts["routed_human"] == 3


def test_ties_are_broken_reproducibly_by_seed():
    tie = pa.Table.from_pylist([{"pair_id": f"t{i}", "prompt_id": f"t{i}", "flip_prob": 0.5} for i in range(20)])
    pick = lambda seed: Route(strategy="flip_prob", budget=5, seed=seed).process(pl.from_arrow(tie).lazy())  # noqa: E731
    humans = lambda out: set(pl.from_arrow(out.table).filter(pl.col("route") == "human")["pair_id"])  # noqa: E731
    assert humans(pick(0)) == humans(pick(0)) and len(humans(pick(0))) == 5
    assert any(humans(pick(s)) != humans(pick(0)) for s in range(1, 5))


def test_budget_and_config_errors():
    assert budget_count(0.1, 25) == 2 and budget_count(1.0, 25) == 25 and budget_count(100, 25) == 25
    assert isinstance(Route(budget=100).config.budget, int) and isinstance(Route(budget=0.5).config.budget, float)
    with pytest.raises(ValueError, match="fraction must be in"):
        Route(budget=1.5)
    with pytest.raises(ValueError, match="count must be >= 0"):
        Route(budget=-1)
    with pytest.raises(ValueError, match="is not one of"):
        Route(strategy="random")
    with pytest.raises(ValueError, match="unknown hybrid feature"):
        Route(strategy="hybrid", weights={"vibes": 1.0})
    assert Route(strategy="judge_disagreement", judge_column="agree").input_columns() == ["pair_id", "agree"]
