"""build_pairs on small hand-made tables with known answers."""

from __future__ import annotations

import pyarrow as pa
import pytest
from datasets import Dataset

from prefdata.schema import PAIR
from prefdata.steps.build import BuildPairs


def responses(rows):
    """rows: (prompt_id, response_id, text, score)"""
    return pa.table({
        "prompt_id": [r[0] for r in rows],
        "prompt": [[{"role": "user", "content": f"question {r[0]}"}] for r in rows],
        "source": ["test"] * len(rows),
        "response_id": [r[1] for r in rows],
        "response": [r[2] for r in rows],
        "score_cdr": [r[3] for r in rows],
    })


TABLE = responses([
    ("a", "a1", "good", 3.0), ("a", "a2", "ok", 1.0), ("a", "a3", "bad", -2.0), ("a", "a4", "meh", 0.5),
    ("b", "b1", "only", 1.0),                                        # single response: no pair
    ("c", "c1", "same", 2.0), ("c", "c2", "same", 1.0),              # identical text: no pair
    ("d", "d1", "tie", 2.0), ("d", "d2", "tie too", 2.0),            # tie: no pair
    ("e", "e1", "x", 5.0), ("e", "e2", "x dup", 5.0), ("e", "e3", "y", 4.0),  # best tie; y is rejected
])


def test_best_vs_worst_known_answer():
    out = BuildPairs(strategy="best_vs_worst").process(TABLE)
    pairs = {r["prompt_id"]: r for r in out.table.to_pylist()}
    assert set(pairs) == {"a", "e"}
    assert pairs["a"]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert pairs["a"]["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert pairs["a"]["margin"] == pytest.approx(5.0)
    assert pairs["a"]["score_chosen"] == 3.0 and pairs["a"]["score_rejected"] == -2.0
    assert pairs["e"]["rejected"][0]["content"] == "y"
    assert pairs["a"]["prompt"] == [{"role": "user", "content": "question a"}]
    assert pairs["a"]["label_source"] == "ai" and pairs["a"]["pair_strategy"] == "best_vs_worst"
    assert out.counts == {"pairs": 2, "prompts_without_pair": 3}


def test_best_vs_random_picks_a_lower_response_and_is_seeded():
    seen = set()
    for seed in range(12):
        out = BuildPairs(strategy="best_vs_random", seed=seed).process(TABLE).table
        a = [r for r in out.to_pylist() if r["prompt_id"] == "a"][0]
        assert a["chosen_id"] == "a1" and a["rejected_id"] in {"a2", "a3", "a4"}
        seen.add(a["rejected_id"])
        again = BuildPairs(strategy="best_vs_random", seed=seed).process(TABLE).table
        assert again.equals(out)
    assert len(seen) >= 2  # the seed really changes the choice


def test_output_schema_is_trl_conversational_and_loads_with_datasets():
    out = BuildPairs().process(TABLE).table
    for field in PAIR:
        assert out.schema.field(field.name).type == field.type, field.name
    ds = Dataset(out)
    assert ds[0]["chosen"][0]["role"] == "assistant"
    assert len(set(out["pair_id"].to_pylist())) == out.num_rows


def test_min_margin_and_missing_scores_are_accounted_for():
    table = responses([("a", "a1", "x", 1.0), ("a", "a2", "y", 0.8), ("a", "a3", "z", None)])
    out = BuildPairs(min_margin=0.5).process(table)
    assert out.table.num_rows == 0 and out.counts["prompts_without_pair"] == 1
    assert out.quarantine["response_id"].to_pylist() == ["a3"]
    assert "null" in out.quarantine["reason"][0].as_py()


def test_bad_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy must be one of"):
        BuildPairs(strategy="best_vs_median")
