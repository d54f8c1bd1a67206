"""Resolving several annotators and merging human labels, on literal tables (no server needed)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from prefdata.argilla import ANNOTATIONS, MergeConfig, annotations_fingerprint, merge


def pairs() -> pa.Table:
    msg = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return pa.Table.from_pylist([
        {"pair_id": p, "prompt_id": f"q{p}", "prompt": [{"role": "user", "content": "q"}],
         "chosen": msg(f"{p}-good"), "rejected": msg(f"{p}-bad"), "chosen_id": f"{p}c", "rejected_id": f"{p}r",
         "score_chosen": 2.0, "score_rejected": 1.0, "margin": 1.0, "strength": 0.4, "flip_prob": 0.2,
         "ches": 3.0, "label_source": "ai"}
        for p in ("x1", "x2", "x3", "x4")
    ])


def annotations(rows: list[tuple]) -> pa.Table:
    """rows: (pair_id, a_is, user, status, label, rationale, rank)."""
    return pa.Table.from_pylist([dict(zip(ANNOTATIONS.names, r)) for r in rows], schema=ANNOTATIONS)


VOTES = annotations([
    ("x1", "chosen", "u1", "submitted", "A", "A is right", 0),
    ("x1", "chosen", "u2", "submitted", "B", None, 1),
    ("x1", "chosen", "u3", "submitted", "A", "", 2),
    ("x2", "rejected", "u1", "submitted", "A", "B rambles", 3),  # A is the AI's rejected: a flip
    ("x2", "rejected", "u2", "draft", "B", None, 4),  # drafts do not count
    ("x3", "chosen", "u1", "submitted", "B", None, 5),
    ("x3", "chosen", "u2", "submitted", "A", None, 6),
    ("x4", "rejected", None, None, None, None, None),  # pushed, no response yet
])


def by_pair(table: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["pair_id"], []).append(row)
    return out


def test_majority_policy():
    out = merge(pairs(), VOTES, MergeConfig(policy="majority"))
    rows = by_pair(out.table)
    x1 = rows["x1"][0]
    assert (x1["human_verdict"], x1["label_source"], x1["annotator_count"]) == ("agree", "human", 3)
    assert x1["human_rationale"] == "A is right" and x1["annotators"] == ["u1", "u2", "u3"]
    x2 = rows["x2"][0]
    assert (x2["human_verdict"], x2["human_agrees_with_ai"], x2["annotator_count"]) == ("flip", False, 1)
    assert x2["chosen"][0]["content"] == "x2-bad" and x2["chosen_id"] == "x2r" and x2["ai_chosen_id"] == "x2c"
    assert (x2["score_chosen"], x2["margin"], x2["strength"]) == (1.0, -1.0, -0.4)
    assert x2["flip_prob"] == pytest.approx(0.8) and x2["ches"] is None
    assert x2["human_rationale"] == "B rambles"
    assert "x3" not in rows  # a 1-1 split is a tie, excluded by default
    assert out.quarantine.to_pylist()[0]["reason"] == "human_tie"
    x4 = rows["x4"][0]
    assert (x4["label_source"], x4["human_verdict"], x4["annotator_count"]) == ("ai", None, 0)
    assert out.counts == {"human_agreed": 1, "human_flipped": 1, "human_ties": 1, "unanswered": 1,
                          "dropped_human_tie": 1}


def test_first_and_keep_all_policies():
    first = by_pair(merge(pairs(), VOTES, MergeConfig(policy="first")).table)
    assert first["x1"][0]["human_verdict"] == "agree" and first["x3"][0]["human_verdict"] == "flip"
    every = by_pair(merge(pairs(), VOTES, MergeConfig(policy="keep_all")).table)
    assert [r["human_verdict"] for r in every["x1"]] == ["agree", "flip", "agree"]
    assert [r["chosen"][0]["content"] for r in every["x1"]] == ["x1-good", "x1-bad", "x1-good"]
    assert [r["annotators"] for r in every["x3"]] == [["u1"], ["u2"]]
    assert all(r["annotator_count"] == 3 for r in every["x1"])


def test_unanswered_and_ties_options():
    out = merge(pairs(), VOTES, MergeConfig(unanswered="exclude", ties="keep_ai"))
    assert {r["pair_id"]: r["reason"] for r in out.quarantine.to_pylist()} == {"x4": "unanswered"}
    x3 = by_pair(out.table)["x3"][0]
    assert (x3["label_source"], x3["human_verdict"], x3["human_agrees_with_ai"]) == ("ai", "tie", False)


def test_pulling_into_a_merged_table_is_idempotent():
    once = merge(pairs(), VOTES, MergeConfig(policy="keep_all", ties="keep_ai"))
    twice = merge(once.table, VOTES, MergeConfig(policy="keep_all", ties="keep_ai"))
    exact = ["ches", "flip_prob"]  # CHES of a flipped pair is gone for good; 1 - (1 - p) is p up to rounding
    assert once.table.drop_columns(exact).to_pylist() == twice.table.drop_columns(exact).to_pylist()
    assert twice.table.column("flip_prob").to_pylist() == pytest.approx(once.table.column("flip_prob").to_pylist())
    majority = merge(once.table, VOTES, MergeConfig())
    assert majority.table.num_rows == 3 and by_pair(majority.table)["x2"][0]["chosen_id"] == "x2r"


def test_pairs_never_pushed_are_left_alone():
    out = merge(pairs(), annotations([("x1", "chosen", "u1", "discarded", None, None, 0)]))
    rows = by_pair(out.table)
    assert rows["x1"][0]["discarded_count"] == 1 and rows["x1"][0]["human_verdict"] is None
    assert rows["x2"][0]["label_source"] == "ai" and out.counts["unanswered"] == 1


def test_fingerprint_follows_the_labels():
    changed = annotations([("x1", "chosen", "u1", "submitted", "B", None, 0)])
    assert annotations_fingerprint(VOTES) == annotations_fingerprint(VOTES)
    assert annotations_fingerprint(VOTES) != annotations_fingerprint(changed)
