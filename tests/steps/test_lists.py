"""build_lists (PRO): responses ranked best first with their scores, on hand-made tables."""

from __future__ import annotations

import pyarrow as pa
import pytest
from datasets import Dataset

from prefdata.schema import LIST
from prefdata.steps.lists import BuildLists


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
    ("b", "b1", "only", 1.0),                                                 # one response: no list
    ("a", "a2", "ok", 1.0), ("a", "a1", "good", 3.0), ("a", "a3", "bad", -2.0), ("a", "a4", "meh", 1.0),
    ("c", "c1", "same", 2.0), ("c", "c2", "same", 1.0), ("c", "c3", "other", 0.0),  # repeated text
    ("d", "d1", "x", None), ("d", "d2", "y", 0.5), ("d", "d3", "z", 0.7),
])


def test_lists_are_sorted_best_first_with_scores_and_ties():
    out = BuildLists().process(TABLE)
    lists = {r["prompt_id"]: r for r in out.table.to_pylist()}
    assert list(lists) == ["a", "c", "d"]  # input order; b has a single response
    a = lists["a"]
    assert [m["content"] for m in a["responses"]] == ["good", "ok", "meh", "bad"]  # tie 1.0: a2 before a4
    assert a["scores"] == [3.0, 1.0, 1.0, -2.0] and a["response_ids"] == ["a1", "a2", "a4", "a3"]
    assert a["has_ties"] is True and lists["d"]["has_ties"] is False
    assert all(m["role"] == "assistant" for m in a["responses"])
    assert lists["c"]["response_ids"] == ["c1", "c3"]  # the lower copy of "same" is left out
    assert lists["d"]["scores"] == [0.7, 0.5]
    assert out.quarantine["response_id"].to_pylist() == ["d1"]
    assert out.counts == {"lists": 3, "prompts_without_list": 1}
    for field in LIST:
        assert out.table.schema.field(field.name).type == field.type
    assert Dataset(out.table)[0]["scores"] == [3.0, 1.0, 1.0, -2.0]


def test_max_and_min_responses():
    out = BuildLists(max_responses=2).process(TABLE)
    a = [r for r in out.table.to_pylist() if r["prompt_id"] == "a"][0]
    assert a["response_ids"] == ["a1", "a2"]
    out = BuildLists(min_responses=3).process(TABLE)
    assert out.table["prompt_id"].to_pylist() == ["a"]
    with pytest.raises(ValueError, match="min_responses"):
        BuildLists(min_responses=1)
