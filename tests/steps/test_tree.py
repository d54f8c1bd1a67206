"""build_tree / tree_pairs: a forest of shared prefixes, values, and step-level sibling pairs."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from prefdata.schema import PAIR
from prefdata.steps.tree import BuildTree, TreePairs


def responses(rows):
    """rows: (prompt_id, response_id, text, score)"""
    return pa.table({
        "prompt_id": [r[0] for r in rows],
        "prompt": [[{"role": "user", "content": f"solve {r[0]}"}] for r in rows],
        "source": ["test"] * len(rows),
        "response_id": [r[1] for r in rows],
        "response": [r[2] for r in rows],
        "score_cdr": [r[3] for r in rows],
    })


TABLE = responses([
    ("p", "r1", "Let x = 2.\nThen 2x = 4.\nSo the answer is 4.", 1.0),
    ("p", "r2", "Let x = 2.\nThen 2x = 4.\nSo the answer is 5.", 0.0),
    ("p", "r3", "Let x = 2.\n\n  Then 2x = 5.  \nSo the answer is 5.", 0.2),  # blank line and spaces ignored
    ("p", "r4", "Guess: 7.", 0.1),
    ("p", "r5", "Guess: 7.", 0.3),  # identical text: one path, value = mean
    ("q", "q1", "Only one way.", 1.0),
    ("q", "q2", "", 2.0),  # no steps
    ("z", "z1", "Unscored.", None),
])


def nodes_of(out) -> dict:
    return {(r["prompt_id"], r["depth"], r["text"]): r for r in out.table.to_pylist()}


def test_nodes_merge_shared_prefixes_and_average_the_leaves_below():
    out = BuildTree().process(TABLE)
    n = nodes_of(out)
    assert out.table.num_rows == 8  # p: 7 nodes ("So the answer is 5." twice, under different parents); q: 1
    root = n[("p", 0, "Let x = 2.")]
    assert root["parent_id"] is None and root["n_responses"] == 3 and root["value"] == pytest.approx(0.4)
    assert n[("p", 1, "Then 2x = 4.")]["value"] == pytest.approx(0.5)
    assert n[("p", 1, "Then 2x = 4.")]["parent_id"] == root["node_id"]
    assert n[("p", 2, "So the answer is 5.")]["value"] in (0.0, 0.2)  # two nodes, different parents
    guess = n[("p", 0, "Guess: 7.")]
    assert guess["value"] == pytest.approx(0.2) and guess["n_responses"] == 2 and guess["is_leaf"]
    assert not root["is_leaf"]
    assert out.quarantine["response_id"].to_pylist() == ["z1"]
    assert out.counts["nodes"] == out.table.num_rows and out.counts["responses_without_steps"] == 1


def test_parent_links_form_a_forest():
    table = BuildTree().process(TABLE).table
    nodes = {r["node_id"]: r for r in table.to_pylist()}
    assert len(nodes) == table.num_rows  # ids are unique
    for node in nodes.values():
        seen, cur = set(), node
        while cur["parent_id"] is not None:  # walking up ends at a root, without cycles
            assert cur["node_id"] not in seen
            seen.add(cur["node_id"])
            parent = nodes[cur["parent_id"]]
            assert parent["depth"] == cur["depth"] - 1 and parent["prompt_id"] == cur["prompt_id"]
            cur = parent
        assert cur["depth"] == 0
    # a node's value is the mean over the responses through it, so it lies within its children's range
    by_parent = pl.from_arrow(table).group_by("parent_id").agg(pl.col("value").min().alias("lo"),
                                                                pl.col("value").max().alias("hi"))
    for row in by_parent.drop_nulls().to_dicts():
        assert row["lo"] - 1e-12 <= nodes[row["parent_id"]]["value"] <= row["hi"] + 1e-12


def test_sibling_pairs_share_the_parent_prefix():
    out = TreePairs().process(TABLE)
    pairs = out.table.to_pylist()
    nodes = {r["node_id"]: r for r in BuildTree().process(TABLE).table.to_pylist()}
    assert pairs, "expected sibling pairs"
    for p in pairs:
        c, r = nodes[p["chosen_id"]], nodes[p["rejected_id"]]
        assert c["parent_id"] == r["parent_id"] == p["parent_id"]
        assert c["value"] > r["value"] and p["margin"] == pytest.approx(c["value"] - r["value"])
        lead = p["prefix"] + "\n" if p["prefix"] else ""
        assert p["chosen"][0]["content"] == lead + p["chosen_step"]
        assert p["rejected"][0]["content"] == lead + p["rejected_step"]
        assert p["prompt"] == [{"role": "user", "content": f"solve {p['prompt_id']}"}]
    got = {(p["depth"], p["chosen_step"], p["rejected_step"]): p for p in pairs}
    assert set(got) == {
        (0, "Let x = 2.", "Guess: 7."),                          # 0.4 vs 0.2
        (1, "Then 2x = 4.", "Then 2x = 5."),                     # 0.5 vs 0.2
        (2, "So the answer is 4.", "So the answer is 5."),       # 1.0 vs 0.0, after "Then 2x = 4."
    }
    assert got[(2, "So the answer is 4.", "So the answer is 5.")]["prefix"] == "Let x = 2.\nThen 2x = 4."
    for field in PAIR:
        assert out.table.schema.field(field.name).type == field.type
    assert out.counts["pairs"] == 3


def test_sentences_margin_and_pairs_per_parent():
    table = responses([("s", "a", "One. Two! Three?", 1.0), ("s", "b", "One. Two! Four.", 0.0),
                       ("s", "c", "One. Five.", 0.6)])
    n = nodes_of(BuildTree(split="sentences").process(table))
    assert ("s", 2, "Three?") in n and ("s", 1, "Two!") in n
    out = TreePairs(split="sentences").process(table).table.to_pylist()
    deep = [p for p in out if p["depth"] == 2][0]
    assert deep["prefix"] == "One. Two!" and deep["chosen"][0]["content"] == "One. Two! Three?"
    assert len(TreePairs(split="sentences", min_margin=0.5).process(table).table) == 1  # only 1.0 vs 0.0
    wide = responses([("w", str(i), f"Step {i}", float(i)) for i in range(4)])
    assert len(TreePairs().process(wide).table) == 6
    top = TreePairs(pairs_per_parent=2).process(wide).table.to_pylist()
    assert [(p["chosen_step"], p["rejected_step"]) for p in top] == [("Step 3", "Step 0"), ("Step 2", "Step 0")]
    with pytest.raises(ValueError, match="split must be one of"):
        BuildTree(split="tokens")
