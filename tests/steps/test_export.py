"""export: TRL conversational / standard and ranked lists, checked on the way out."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from prefdata.schema import LIST, MESSAGES
from prefdata.steps.export import Export


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


PAIRS = [
    {"pair_id": "p1", "prompt": msgs(("user", "Capital of France?")), "chosen": msgs(("assistant", "Paris.")),
     "rejected": msgs(("assistant", "Lyon."))},
    {"pair_id": "p2", "prompt": msgs(("user", "2+2?"), ("assistant", "4"), ("user", "And times 3?")),
     "chosen": msgs(("assistant", "12.")), "rejected": msgs(("assistant", "7."))},
]


def frame(rows):
    schema = pa.schema([("pair_id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES)])
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema)).lazy()


def test_trl_conversational_keeps_messages_and_other_columns():
    out = Export(format="trl_conversational").process(frame(PAIRS))
    assert out.table.column_names == ["prompt", "chosen", "rejected", "pair_id"]
    assert out.table.to_pylist() == [{k: r[k] for k in ("prompt", "chosen", "rejected", "pair_id")} for r in PAIRS]
    assert out.table.schema.field("prompt").type == MESSAGES


def test_trl_standard_refuses_multi_turn_unless_flattened():
    with pytest.raises(ValueError, match=r"1 row\(s\) do not fit the format \(multi_turn_prompt: 1\).*pair p2.*"
                                         r"flatten: true"):
        Export(format="trl_standard").process(frame(PAIRS))
    out = Export(format="trl_standard", on_error="quarantine", keep=[]).process(frame(PAIRS))
    assert out.table.to_pylist() == [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}]
    assert out.quarantine.to_pylist()[0]["reason"] == "multi_turn_prompt"
    assert out.counts == {"exported": 1, "quarantined_multi_turn_prompt": 1}
    flat = Export(format="trl_standard", flatten=True, keep=[]).process(frame(PAIRS)).table.to_pylist()
    assert flat[1] == {"prompt": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And times 3?",
                       "chosen": "12.", "rejected": "7."}
    assert flat[0]["prompt"] == "\n\nHuman: Capital of France?"


def test_invalid_pairs_are_caught():
    bad = [
        {**PAIRS[0], "pair_id": "e1", "chosen": msgs(("assistant", "  "))},
        {**PAIRS[0], "pair_id": "e2", "rejected": msgs(("assistant", "a"), ("assistant", "b"))},
        {**PAIRS[0], "pair_id": "e3", "prompt": msgs(("user", "q"), ("assistant", "a"))},
        {**PAIRS[0], "pair_id": "e4", "prompt": []},
    ]
    out = Export(format="trl_conversational", on_error="quarantine").process(frame(PAIRS + bad))
    assert out.table.num_rows == 2
    assert [(r["pair_id"], r["reason"]) for r in out.quarantine.to_pylist()] == [
        ("e1", "bad_chosen"), ("e2", "bad_rejected"), ("e3", "bad_last_turn"), ("e4", "empty_prompt")]
    with pytest.raises(ValueError, match="4 row"):
        Export(format="trl_conversational").process(frame(PAIRS + bad))
    with pytest.raises(ValueError, match=r"no column\(s\) \['chosen'"):
        Export().process(pl.DataFrame({"prompt": ["x"]}).lazy())


def test_ranked_list_groups_by_prompt_best_first():
    p1, p2 = msgs(("user", "a?")), msgs(("user", "b?"))
    rows = [("x", p1, "r1", "low", 0.1), ("x", p1, "r2", "high", 0.9), ("y", p2, "r3", "only", 0.5),
            ("x", p1, "r4", "mid", 0.5), ("x", p1, "r5", "none", None), ("z", p2 + msgs(("user", "c?")), "r6", "c1", 1.0),
            ("z", p2 + msgs(("user", "c?")), "r7", "c2", 1.0)]
    table = pa.table({"prompt_id": [r[0] for r in rows], "prompt": pa.array([r[1] for r in rows], MESSAGES),
                      "response_id": [r[2] for r in rows], "response": [r[3] for r in rows],
                      "score_cdr": pa.array([r[4] for r in rows], pa.float64()), "source": ["s"] * len(rows)})
    out = Export(format="ranked_list", score="score_cdr").process(pl.from_arrow(table).lazy())
    lists = out.table.to_pylist()
    assert [r["prompt_id"] for r in lists] == ["x", "z"]
    assert [m["content"] for m in lists[0]["responses"]] == ["high", "mid", "low"]
    assert lists[0]["scores"] == [0.9, 0.5, 0.1] and lists[0]["response_ids"] == ["r2", "r4", "r1"]
    assert lists[1]["response_ids"] == ["r6", "r7"]  # tie: by response_id
    assert lists[0]["source"] == "s"
    for f in LIST:
        assert out.table.schema.field(f.name).type == f.type
    reasons = {r["response_id"]: r["reason"] for r in out.quarantine.to_pylist()}
    assert reasons == {"r5": "no score_cdr (null or NaN)", "r3": "too_few_responses (< 2)"}
    assert out.counts["unscored"] == 1 and out.counts["too_few_responses"] == 1
