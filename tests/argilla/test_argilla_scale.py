"""5,000 records: push, annotate as three annotator users through the SDK, pull and merge."""

from __future__ import annotations

import collections

import pytest

from prefdata.argilla import PullConfig, PushConfig, a_is_chosen, find_dataset, pull, push

N = 5000


@pytest.mark.slow
def test_push_annotate_pull_5000(argilla_server, pair_table, submit, make_annotator):
    pairs = pair_table(N, prefix="big")
    result = push(pairs, PushConfig(dataset="big", batch_size=500))
    assert (result.created, result.batches) == (N, 10)
    dataset = find_dataset(argilla_server.client(), PushConfig(dataset="big"))
    annotators = [make_annotator(f"big{k}") for k in range(3)]

    # pair i: annotator i % 3 answers; every 4th pair is a flip, every 10th is left unanswered
    answers, expected = [], {}
    for i, pair_id in enumerate(pairs.column("pair_id").to_pylist()):
        if i % 10 == 9:
            expected[pair_id] = (None, None)
            continue
        agree = i % 4 != 0
        label = "A" if a_is_chosen(pair_id, 0) == agree else "B"
        user = annotators[i % 3]
        answers.append((pair_id, user.user_id, label, None, "submitted"))
        expected[pair_id] = ("agree" if agree else "flip", user.username)
    submit(dataset, answers)

    out = pull(pairs, PullConfig(dataset="big"))
    rows = {r["pair_id"]: r for r in out.table.to_pylist()}
    assert len(rows) == N and out.quarantine is None
    got = {p: (r["human_verdict"], (r["annotators"] or [None])[0]) for p, r in rows.items()}
    assert got == expected
    counts = collections.Counter(v for v, _ in expected.values())
    assert out.counts == {"human_agreed": counts["agree"], "human_flipped": counts["flip"], "human_ties": 0,
                          "unanswered": counts[None]}
    flipped = next(r for r in rows.values() if r["human_verdict"] == "flip")
    assert flipped["label_source"] == "human" and flipped["chosen_id"].startswith("big-r")
