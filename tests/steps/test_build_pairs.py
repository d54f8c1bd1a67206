"""build_pairs on small hand-made tables with known answers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from prefdata.schema import PAIR
from prefdata.steps.build import BuildPairs
from prefdata.steps.import_pairs import ImportPairs


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
    assert out.counts == {"pairs": 2, "prompts_without_pair": 3, "dropped_prompt_single_response": 1,
                          "dropped_prompt_identical_texts": 1, "dropped_prompt_tied": 1}


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


# -- all_pairs, several pairs per prompt, carried member scores ---------------------------
def _pairs(out):
    return sorted((r["prompt_id"], r["chosen_id"], r["rejected_id"]) for r in out.table.to_pylist())


def test_all_pairs_known_answer_with_margin():
    out = BuildPairs(strategy="all_pairs").process(TABLE)
    # a: 3, 1, 0.5, -2 -> all 6 pairs; c: same text; d: tie; e: e1/e2 tie, both beat y
    assert _pairs(out) == sorted([
        ("a", "a1", "a2"), ("a", "a1", "a3"), ("a", "a1", "a4"), ("a", "a2", "a3"), ("a", "a2", "a4"),
        ("a", "a4", "a3"), ("e", "e1", "e3"), ("e", "e2", "e3"),
    ])
    assert all(r["margin"] > 0 for r in out.table.to_pylist())
    assert out.counts == {"pairs": 8, "prompts_without_pair": 3, "dropped_prompt_single_response": 1,
                          "dropped_prompt_identical_texts": 1, "dropped_prompt_tied": 1}
    wide = BuildPairs(strategy="all_pairs", min_margin=2.5).process(TABLE)
    # gaps >= 2.5: a1-a3 = 5, a1-a4 = 2.5, a2-a3 = 3, a4-a3 = 2.5 (a1-a2 = 2 is too small)
    assert _pairs(wide) == [("a", "a1", "a3"), ("a", "a1", "a4"), ("a", "a2", "a3"), ("a", "a4", "a3")]
    assert {r["pair_strategy"] for r in wide.table.to_pylist()} == {"all_pairs"}


def test_all_pairs_per_prompt_keeps_the_widest_gaps():
    out = BuildPairs(strategy="all_pairs", pairs_per_prompt=2).process(TABLE)
    a = [(r["chosen_id"], r["rejected_id"]) for r in out.table.to_pylist() if r["prompt_id"] == "a"]
    assert a == [("a1", "a3"), ("a2", "a3")]  # margins 5 and 3, widest first


def test_best_vs_worst_several_pairs_and_best_vs_random_distinct_rejected():
    out = BuildPairs(strategy="best_vs_worst", pairs_per_prompt=3).process(TABLE)
    a = [r["rejected_id"] for r in out.table.to_pylist() if r["prompt_id"] == "a"]
    assert a == ["a3", "a4", "a2"]  # from the worst up
    rnd = BuildPairs(strategy="best_vs_random", pairs_per_prompt=2, seed=3).process(TABLE).table.to_pylist()
    a = [r["rejected_id"] for r in rnd if r["prompt_id"] == "a"]
    assert len(a) == 2 and len(set(a)) == 2 and set(a) <= {"a2", "a3", "a4"}
    # two rejected candidates with the same text: only one of them is used
    dup = responses([("p", "p1", "best", 3.0), ("p", "p2", "same", 1.0), ("p", "p3", "same", 0.0)])
    out = BuildPairs(strategy="best_vs_worst", pairs_per_prompt=5).process(dup)
    assert [r["rejected"][0]["content"] for r in out.table.to_pylist()] == ["same"]


def test_pair_ids_are_stable_order_free_and_input_order_does_not_matter():
    out = BuildPairs(strategy="all_pairs").process(TABLE).table
    from prefdata.pairs import pair_ids
    assert out["pair_id"].to_pylist() == pair_ids(out["rejected_id"], out["chosen_id"]).to_pylist()
    shuffled = TABLE.take([11, 3, 0, 7, 5, 1, 9, 2, 4, 10, 6, 8])
    again = BuildPairs(strategy="all_pairs").process(shuffled).table
    assert sorted(again["pair_id"].to_pylist()) == sorted(out["pair_id"].to_pylist())
    for seed in range(4):
        x = BuildPairs(seed=seed).process(TABLE).table
        y = BuildPairs(seed=seed).process(shuffled).table
        assert sorted(x["pair_id"].to_pylist()) == sorted(y["pair_id"].to_pylist())
    # output follows the input order of prompts
    assert [r for r in dict.fromkeys(again["prompt_id"].to_pylist())] == ["e", "a"]


def test_member_scores_are_carried_to_both_sides():
    table = responses([("a", "a1", "x", 2.0), ("a", "a2", "y", 1.0)])
    table = table.append_column("score_rm", pa.array([0.3, 0.9])).append_column("score_rm_std", pa.array([0.1, 0.2]))
    out = BuildPairs().process(table).table.to_pylist()[0]
    assert (out["score_rm_chosen"], out["score_rm_rejected"]) == (0.3, 0.9)
    assert (out["score_rm_std_chosen"], out["score_rm_std_rejected"]) == (0.1, 0.2)
    assert (out["score_cdr_chosen"], out["score_cdr_rejected"]) == (2.0, 1.0)
    step = BuildPairs(carry=["score_rm"])
    assert "score_rm_chosen" in step.output_columns(list(table.column_names))
    none = BuildPairs(carry=[]).process(table).table
    assert not [c for c in none.column_names if c.endswith("_chosen") and c != "score_chosen"]


def test_prompt_without_scores_and_empty_input():
    table = responses([("a", "a1", "x", None), ("a", "a2", "y", None), ("b", "b1", "u", 1.0), ("b", "b2", "v", 0.0)])
    out = BuildPairs(strategy="all_pairs").process(table)
    assert _pairs(out) == [("b", "b1", "b2")]
    assert out.counts == {"pairs": 1, "prompts_without_pair": 1, "dropped_prompt_no_score": 1}
    assert out.quarantine.num_rows == 2
    empty = BuildPairs(strategy="all_pairs").process(table.slice(0, 0))
    assert empty.table.num_rows == 0 and empty.table.schema.field("chosen").type == PAIR.field("chosen").type


def test_pairs_per_prompt_must_be_positive():
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        BuildPairs(pairs_per_prompt=0)


def test_a_hash_collision_between_prompts_falls_back_to_exact_groups(monkeypatch):
    import polars as pl
    from prefdata.steps import build

    expected = _pairs(BuildPairs(strategy="all_pairs").process(TABLE))
    monkeypatch.setattr(build, "_group_keys", lambda ids: pl.Series([0] * len(ids), dtype=pl.UInt64))
    assert _pairs(BuildPairs(strategy="all_pairs").process(TABLE)) == expected


@pytest.mark.parametrize("shuffle", [False, True])
def test_all_pairs_matches_brute_force_on_long_and_scattered_prompts(shuffle):
    import numpy as np

    rng = np.random.default_rng(1)
    rows = [(f"p{p}", f"p{p}r{j}", f"text {rng.integers(0, 30)}", float(np.round(rng.normal(), 1)))
            for p in range(30) for j in range(int(rng.integers(1, 40)))]  # runs up to 39 long
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    for delta in (0.0, 0.5):
        got = {(r["chosen_id"], r["rejected_id"])
               for r in BuildPairs(strategy="all_pairs", min_margin=delta).process(responses(rows)).table.to_pylist()}
        expected = {(a[1], b[1]) for a in rows for b in rows
                    if a[0] == b[0] and a[3] > b[3] and a[3] - b[3] >= delta and a[2] != b[2]}
        assert got == expected


# -- imported pairs come back exactly (strategy original) ------------------------------------
def _hh(turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


# HH-RLHF test-split shape: two prompts carry two original pairs each, a third one's pair
# compares a reply with itself, a fourth is a plain single pair.
HH_PAIRS = [
    ("What should I name my cat?", "How about Whiskers or Luna?", "Cats don't need names."),
    ("How do I boil an egg?", "Put it in boiling water for about 9 minutes.", "Microwave it whole."),
    ("What should I name my cat?", "Maybe Mochi, if she is small and round.", "Name it Cat."),
    ("Is it safe to look at the sun?", "No: it can damage your eyes.", "Yes, for a few minutes."),
    ("How do I boil an egg?", "Cover it with cold water, bring to a boil, wait 10 minutes.", "I don't know."),
    ("Tell me a joke.", "Why did the chicken cross the road?", "Why did the chicken cross the road?"),
]


def write_hh(tmp_path, kind="jsonl"):
    rows = [{"chosen": _hh([("Human", q), ("Assistant", c)]), "rejected": _hh([("Human", q), ("Assistant", r)])}
            for q, c, r in HH_PAIRS]
    path = tmp_path / f"hh_test.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _texts(pairs: pa.Table) -> list[tuple]:
    return [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
            for p in pairs.to_pylist()]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_imported_pairs_come_back_exactly_when_prompts_carry_several(tmp_path, kind):
    imported = ImportPairs(path=str(write_hh(tmp_path, kind)), on_error="quarantine").read()
    assert imported.counts["quarantined_identical_responses"] == 1  # the joke: counted, not lost
    assert imported.counts["prompts_with_several_pairs"] == 2
    out = BuildPairs(score="score_original").process(imported.table)  # strategy auto -> original
    expected = [p for p in HH_PAIRS if p[1] != p[2]]
    assert sorted(_texts(out.table)) == sorted(expected)  # text-exact, none recombined, none lost
    assert out.counts == {"pairs": 5}
    rows = out.table.to_pylist()
    assert {r["pair_strategy"] for r in rows} == {"original"} and {r["label_source"] for r in rows} == {"original"}
    assert all(r["margin"] == 1.0 for r in rows)
    explicit = BuildPairs(score="score_original", strategy="original").process(imported.table)
    assert explicit.table.equals(out.table)


def test_a_recombining_strategy_on_imported_pairs_is_refused(tmp_path):
    imported = ImportPairs(path=str(write_hh(tmp_path)), on_error="quarantine").read()
    step = BuildPairs(score="score_original", strategy="best_vs_worst")
    with pytest.raises(ValueError, match=r"build_pairs: strategy 'best_vs_worst' with score 'score_original'.*"
                                         r"set `strategy: original`"):
        step.process(imported.table)
    with pytest.raises(ValueError, match="set `strategy: original`"):  # at planning time, before any work
        step.output_columns(imported.table.column_names)


def test_imported_pairs_in_a_pipeline_with_one_prompt_per_shard(tmp_path):
    from prefdata.pipeline import Pipeline

    steps = [ImportPairs(path=str(write_hh(tmp_path)), on_error="quarantine"), BuildPairs(score="score_original")]
    pipeline = Pipeline(steps, workdir=tmp_path / "work", output=tmp_path / "pairs.parquet", shard_size=1)
    result = pipeline.run()
    assert sorted(_texts(result)) == sorted(p for p in HH_PAIRS if p[1] != p[2])
    build = pipeline.stats[-1]
    assert build.counts.get("pairs") == 5 and not any(k.startswith("dropped_") for k in build.counts)


def _imported_table(tmp_path):
    return ImportPairs(path=str(write_hh(tmp_path)), on_error="quarantine").read().table


def test_original_pairs_that_cannot_be_given_back_are_counted_by_reason(tmp_path):
    table = _imported_table(tmp_path)
    rows = table.to_pylist()
    roles = [(r["response"], r["original_role"]) for r in rows]
    drop = roles.index(("Microwave it whole.", "rejected"))  # a pair loses its rejected side
    no_score = roles.index(("No: it can damage your eyes.", "chosen"))
    kept = [r for i, r in enumerate(rows) if i != drop]
    kept[no_score - (no_score > drop)]["score_original"] = None
    same = [r for r in kept if r["response"] == "Name it Cat."][0]
    same["response"] = "Maybe Mochi, if she is small and round."  # both sides now one text
    extra = dict(kept[0], response="A new sampled reply.", response_id="new", original_pair=None,
                 original_role=None, score_original=0.5)
    kept.append(extra)
    out = BuildPairs(score="score_original").process(pa.Table.from_pylist(kept, schema=table.schema))
    assert _texts(out.table) == [HH_PAIRS[0], HH_PAIRS[4]]
    assert out.counts == {"pairs": 2, "dropped_pair_missing_side": 1, "dropped_pair_no_score": 1,
                          "dropped_pair_identical_texts": 1, "dropped_response_not_original": 1}
    assert out.quarantine.num_rows == 1  # the response without a score, with its reason
    assert "score_original" in out.quarantine["reason"][0].as_py()


def test_original_strategy_needs_the_import_columns_and_no_margin_options():
    with pytest.raises(ValueError, match=r"strategy 'original'.*no \['original_pair', 'original_role'\].*import_pairs"):
        BuildPairs(strategy="original").process(TABLE)
    with pytest.raises(ValueError, match="min_margin and pairs_per_prompt do not apply"):
        BuildPairs(strategy="original", min_margin=1.0)


def test_original_strategy_with_a_new_score_keeps_the_original_label(tmp_path):
    table = _imported_table(tmp_path)
    cdr = [-1.0 if role == "chosen" else 2.0 for role in table["original_role"].to_pylist()]  # disagrees
    table = table.append_column("score_cdr", pa.array(cdr))
    out = BuildPairs(score="score_cdr", strategy="original").process(table)
    assert out.table.num_rows == 5
    assert set(out.table["margin"].to_pylist()) == {-3.0} and set(out.table["label_source"].to_pylist()) == {"original"}
    auto = BuildPairs(score="score_cdr").process(table)  # a scorer's own pairs: best_vs_random, 'ai'
    assert set(auto.table["pair_strategy"].to_pylist()) == {"best_vs_random"}
    assert set(auto.table["label_source"].to_pylist()) == {"ai"}


# -- truncated responses (finish_reason from sample) -----------------------------------------
def test_drop_truncated_leaves_out_length_finished_responses_and_counts_them():
    table = TABLE.append_column("finish_reason", pa.array(
        ["length", "stop", "stop", "stop", "stop", "stop", "stop", "stop", "stop", "length", "length", "stop"]))
    out = BuildPairs(strategy="best_vs_worst", drop_truncated=True).process(table)
    pairs = {r["prompt_id"]: (r["chosen_id"], r["rejected_id"]) for r in out.table.to_pylist()}
    assert pairs == {"a": ("a2", "a3")}  # a1 was cut off; e lost both of its best
    assert out.counts["dropped_response_truncated"] == 3
    assert out.counts["dropped_prompt_single_response"] == 2  # b as before, e now
    kept = BuildPairs(strategy="best_vs_worst").process(table)
    assert {r["prompt_id"]: r["chosen_id"] for r in kept.table.to_pylist()}["a"] == "a1"  # default: all kept
    assert kept.table.num_rows == 2 and "dropped_response_truncated" not in kept.counts
    assert "finish_reason" in BuildPairs(drop_truncated=True).input_columns()


def test_drop_truncated_without_finish_reason_is_a_clear_error():
    with pytest.raises(ValueError, match=r"build_pairs: drop_truncated: true needs the 'finish_reason' column"):
        BuildPairs(drop_truncated=True).process(TABLE)


def test_all_truncated_prompt_is_counted():
    table = responses([("a", "a1", "x", 1.0), ("a", "a2", "y", 0.0), ("b", "b1", "u", 1.0), ("b", "b2", "v", 0.0)])
    table = table.append_column("finish_reason", pa.array(["length", "length", "stop", None]))
    out = BuildPairs(drop_truncated=True).process(table)
    assert out.table["prompt_id"].to_pylist() == ["b"]
    assert out.counts == {"pairs": 1, "prompts_without_pair": 1, "dropped_prompt_all_truncated": 1,
                          "dropped_response_truncated": 2}
