"""curriculum (Curry-DPO): each prompt's pairs from easy (wide gap) to hard, in iterations."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from prefdata.steps.build import BuildPairs
from prefdata.steps.curriculum import Curriculum, CurriculumConfig, curriculum


def pair_frame() -> pl.DataFrame:
    rows = [("a", "a1", 3.0), ("a", "a2", 1.0), ("a", "a3", -2.0), ("a", "a4", 0.5),
            ("f", "f1", 4.0), ("f", "f2", 3.0), ("f", "f3", 0.0), ("s", "s1", 1.0)]
    table = pa.table({
        "prompt_id": [r[0] for r in rows], "prompt": [[{"role": "user", "content": r[0]}] for r in rows],
        "response_id": [r[1] for r in rows], "response": [r[1] for r in rows], "score_cdr": [r[2] for r in rows],
    })
    # Curry-DPO's pairs: the best against each of the others
    return pl.from_arrow(BuildPairs(strategy="best_vs_worst", pairs_per_prompt=3).process(table).table)


def test_ranks_follow_the_gap_and_iterations_follow_the_ranks():
    step = Curriculum()
    out = pl.from_arrow(step.process(pair_frame().lazy()).table)
    got = {r["rejected_id"]: (r["curriculum_rank"], r["iteration"]) for r in out.to_dicts()}
    assert got == {"a3": (0, 0), "a4": (1, 1), "a2": (2, 2), "f3": (0, 0), "f2": (1, 1)}
    ordered = out.sort("curriculum_order")
    assert ordered["iteration"].to_list() == [0, 0, 1, 1, 2]
    assert out["curriculum_order"].sort().to_list() == list(range(5))
    assert step.metadata == {"by": "margin", "iterations": 3, "pairs_per_iteration": [2, 2, 1]}


def test_fixed_number_of_iterations_and_gap_order_within():
    out = curriculum(pair_frame(), CurriculumConfig(iterations=2, within="gap"))
    got = {r["rejected_id"]: r["iteration"] for r in out.to_dicts()}
    assert got == {"a3": 0, "a4": 0, "a2": 1, "f3": 0, "f2": 1}  # floor(rank * 2 / n_pairs)
    ordered = out.sort("curriculum_order")["rejected_id"].to_list()
    assert ordered == ["a3", "f3", "a4", "a2", "f2"]  # within an iteration: widest gap first (5, 4, 2.5 | 2, 1)


def test_shuffle_within_an_iteration_is_seeded():
    a = curriculum(pair_frame(), CurriculumConfig(seed=0)).sort("curriculum_order")["pair_id"].to_list()
    b = curriculum(pair_frame(), CurriculumConfig(seed=0)).sort("curriculum_order")["pair_id"].to_list()
    orders = {tuple(curriculum(pair_frame(), CurriculumConfig(seed=s)).sort("curriculum_order")["pair_id"].to_list())
              for s in range(8)}
    assert a == b and len(orders) > 1


def test_order_by_strength_and_bad_options():
    df = pair_frame().with_columns(strength=-pl.col("margin"))  # reversed: the narrow gap is now easy
    out = curriculum(df, CurriculumConfig(by="strength"))
    got = {r["rejected_id"]: r["curriculum_rank"] for r in out.to_dicts()}
    assert got["a2"] == 0 and got["a3"] == 2
    with pytest.raises(ValueError, match="by must be"):
        Curriculum(by="length")
    with pytest.raises(ValueError, match="iterations"):
        Curriculum(iterations=0)
