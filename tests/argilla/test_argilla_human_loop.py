"""Push, annotate as annotator users through the SDK, pull and merge, against a real server."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq
import pytest

from prefdata.argilla import (TRUNCATED_NOTE, ArgillaError, MergeConfig, PullConfig, PushConfig, a_is_chosen,
                              connect, existing_ids, fetch_annotations, find_dataset, merge, pull, push)


def test_push_200_pairs_then_again_creates_nothing(argilla_server, pair_table):
    pairs = pair_table(200, prefix="p200")
    cfg = PushConfig(dataset="push-200", batch_size=64)
    first = push(pairs, cfg)
    assert (first.created, first.already_present, first.batches) == (200, 0, 4)
    second = push(pairs, cfg)
    assert (second.created, second.already_present, second.batches) == (0, 200, 0)
    client = argilla_server.client()
    dataset = find_dataset(client, cfg)
    assert existing_ids(client, dataset) == set(pairs.column("pair_id").to_pylist())
    assert dataset.progress()["total"] == 200


def test_record_layout_blind_by_default(argilla_server, pair_table):
    pairs = pair_table(8, prefix="layout")
    push(pairs, PushConfig(dataset="layout"))
    client = argilla_server.client()
    dataset = find_dataset(client, PushConfig(dataset="layout"))
    records = {r.id: r for r in dataset.records(with_suggestions=True)}
    a_first = [a_is_chosen(p, 0) for p in pairs.column("pair_id").to_pylist()]
    assert sorted(set(a_first)) == [False, True]  # both orders occur
    for row, a_chosen in zip(pairs.to_pylist(), a_first):
        record = records[row["pair_id"]]
        a, b = (row["chosen"], row["rejected"]) if a_chosen else (row["rejected"], row["chosen"])
        assert record.fields["response_a"] == a[0]["content"]
        assert record.fields["response_b"] == b[0]["content"]
        metadata = record.metadata.to_dict()
        assert metadata["a_is"] == ("chosen" if a_chosen else "rejected")
        assert metadata["ai_choice"] == ("A" if a_chosen else "B")  # the AI verdict, for agreement stats
        assert metadata["flip_prob"] == pytest.approx(row["flip_prob"])
        assert list(record.suggestions) == []  # blind: nothing pre-selected
    question = dataset.settings.questions["preference"]
    assert "more helpful, honest and harmless" in question.description
    first = next(iter(records.values()))
    assert first.fields["guidelines"].startswith("Read the conversation")  # on screen, not folded away
    assert [f.name for f in dataset.settings.fields][0] == "guidelines"
    assert "AI model's opinion" not in dataset.settings.guidelines  # no suggestion, no note about it


def test_ai_suggestion_when_asked_is_labelled_and_explained(argilla_server, pair_table):
    pairs = pair_table(6, prefix="shown")
    push(pairs, PushConfig(dataset="shown", show_ai_suggestion=True))
    dataset = find_dataset(argilla_server.client(), PushConfig(dataset="shown"))
    records = {r.id: r for r in dataset.records(with_suggestions=True)}
    for row in pairs.to_pylist():
        suggestion = records[row["pair_id"]].suggestions["preference"]
        assert suggestion.value == ("A" if a_is_chosen(row["pair_id"], 0) else "B")
        assert suggestion.score == pytest.approx(round(1 - row["flip_prob"], 2))
        assert suggestion.agent.startswith("AI model opinion: not a correct answer") and "1 - flip probability" in suggestion.agent
    assert "the model's confidence" in dataset.settings.guidelines
    assert "the model's confidence" in dataset.settings.questions["preference"].description
    assert "the model's confidence" in next(iter(records.values())).fields["guidelines"]


def test_truncated_responses_are_marked(argilla_server, pair_table):
    pairs = pl.from_arrow(pair_table(4, prefix="trunc")).with_columns(
        finish_reason_chosen=pl.Series(["length", "stop", "stop", None]),
        finish_reason_rejected=pl.Series(["stop", "length", "stop", "stop"])).to_arrow()
    push(pairs, PushConfig(dataset="trunc"))
    push(pair_table(2, prefix="plain"), PushConfig(dataset="plain"))
    client = argilla_server.client()
    records = {r.id: r for r in find_dataset(client, PushConfig(dataset="trunc")).records()}

    def marked(pair_id: str, side: str) -> bool:
        a_chosen = a_is_chosen(pair_id, 0)
        field = "response_a" if (side == "chosen") == a_chosen else "response_b"
        return records[pair_id].fields[field].endswith(TRUNCATED_NOTE)

    got = {(p, side): marked(p, side) for p in records for side in ("chosen", "rejected")}
    assert {k for k, v in got.items() if v} == {("trunc-00000", "chosen"), ("trunc-00001", "rejected")}
    plain = find_dataset(client, PushConfig(dataset="plain")).records()
    assert not any(TRUNCATED_NOTE in r.fields["response_a"] + r.fields["response_b"] for r in plain)


def test_annotate_as_annotators_then_pull_and_merge(argilla_server, pair_table, submit, make_annotator,
                                                   annotator_queue):
    pairs = pair_table(8, prefix="annot")
    routed = pl.from_arrow(pairs).with_columns(
        route=pl.when(pl.int_range(pl.len()) < 6).then(pl.lit("human")).otherwise(pl.lit("ai"))).to_arrow()
    cfg = PushConfig(dataset="annotate", min_submitted=2)
    assert push(routed, cfg).created == 6  # only the pairs routed to humans
    owner = argilla_server.client()
    dataset = find_dataset(owner, cfg)
    a1, a2 = make_annotator("ann1"), make_annotator("ann2")

    queue = annotator_queue(a1, dataset.id)
    assert len(queue) == 6
    assert all(not r.get("metadata") for r in queue)  # the A/B order, AI verdict and scores are hidden
    assert all(not r.get("suggestions") for r in queue)  # blind: no pre-selected answer

    def label(pair, agree: bool) -> str:
        return "A" if a_is_chosen(pair, 0) == agree else "B"

    submit(dataset, [
        ("annot-00000", a1.user_id, label("annot-00000", True), "clearly right", "submitted"),  # agree
        ("annot-00001", a1.user_id, label("annot-00001", False), "the other is right", "submitted"),  # flip
        ("annot-00002", a1.user_id, "tie", None, "submitted"),  # tie
        ("annot-00003", a1.user_id, "A", None, "discarded"),  # discard (with the answer it had)
        ("annot-00004", a1.user_id, label("annot-00004", True), None, "submitted"),  # a1 agrees first ...
    ])
    submit(dataset, [
        ("annot-00001", a2.user_id, label("annot-00001", False), None, "submitted"),  # flip again
        ("annot-00004", a2.user_id, label("annot-00004", False), None, "submitted"),  # ... a2 flips: split
    ])
    # annot-00005 stays unanswered; 00006 and 00007 were never pushed

    assert len(annotator_queue(a1, dataset.id)) == 1
    assert len(annotator_queue(a2, dataset.id)) == 4

    out = pull(pairs, PullConfig(dataset="annotate"))
    kept = {r["pair_id"]: r for r in out.table.to_pylist()}
    dropped = {r["pair_id"]: r["reason"] for r in out.quarantine.to_pylist()}
    assert dropped == {"annot-00002": "human_tie", "annot-00004": "human_tie"}
    assert sorted(kept) == ["annot-00000", "annot-00001", "annot-00003", "annot-00005", "annot-00006",
                            "annot-00007"]
    src = {r["pair_id"]: r for r in pairs.to_pylist()}

    agree = kept["annot-00000"]
    assert (agree["label_source"], agree["human_verdict"], agree["human_agrees_with_ai"]) == ("human", "agree", True)
    assert agree["chosen"] == src["annot-00000"]["chosen"] and agree["annotator_count"] == 1
    assert agree["human_rationale"] == "clearly right" and agree["annotators"] == [a1.username]

    flip = kept["annot-00001"]
    assert (flip["label_source"], flip["human_verdict"], flip["human_agrees_with_ai"]) == ("human", "flip", False)
    assert flip["chosen"] == src["annot-00001"]["rejected"] and flip["rejected"] == src["annot-00001"]["chosen"]
    assert flip["chosen_id"] == "annot-r1" and flip["ai_chosen_id"] == "annot-c1"
    assert flip["score_chosen"] == src["annot-00001"]["score_rejected"]
    assert flip["margin"] == pytest.approx(-src["annot-00001"]["margin"])
    assert flip["flip_prob"] == pytest.approx(1 - src["annot-00001"]["flip_prob"])
    assert flip["annotator_count"] == 2 and flip["annotators"] == [a1.username, a2.username]

    discarded = kept["annot-00003"]
    assert (discarded["label_source"], discarded["human_verdict"], discarded["annotator_count"],
            discarded["discarded_count"]) == ("ai", None, 0, 1)
    assert kept["annot-00005"]["label_source"] == "ai" and kept["annot-00005"]["human_agrees_with_ai"] is None
    assert out.counts == {"human_agreed": 1, "human_flipped": 1, "human_ties": 2, "unanswered": 2,
                          "dropped_human_tie": 2}

    annotations = fetch_annotations(PullConfig(dataset="annotate"))
    first = merge(pairs, annotations, MergeConfig(policy="first", unanswered="exclude"))
    firsts = {r["pair_id"]: r["human_verdict"] for r in first.table.to_pylist()}
    assert firsts == {"annot-00000": "agree", "annot-00001": "flip", "annot-00004": "agree",
                      "annot-00006": None, "annot-00007": None}
    assert {r["pair_id"]: r["reason"] for r in first.quarantine.to_pylist()} == {
        "annot-00002": "human_tie", "annot-00003": "unanswered", "annot-00005": "unanswered"}

    every = merge(pairs, annotations, MergeConfig(policy="keep_all", ties="keep_ai"))
    rows = pl.from_arrow(every.table).filter(pl.col("human_verdict").is_not_null())
    got = sorted(zip(rows["pair_id"], rows["human_verdict"], rows["label_source"]))
    assert got == [("annot-00000", "agree", "human"), ("annot-00001", "flip", "human"),
                   ("annot-00001", "flip", "human"), ("annot-00002", "tie", "ai"),
                   ("annot-00004", "agree", "human"), ("annot-00004", "flip", "human")]


def test_recipe_steps_push_and_pull(argilla_server, pair_table, submit):
    from prefdata.steps.human import ArgillaPull, ArgillaPush

    pairs = pair_table(5, prefix="steps")
    pushed = ArgillaPush(dataset="steps").process(pl.from_arrow(pairs).lazy())
    assert pushed.counts == {"pushed": 5, "already_in_argilla": 0} and pushed.table.num_rows == 5
    before = ArgillaPull(dataset="steps")
    fp_before = before.fingerprint("up")
    assert ArgillaPull(dataset="steps").fingerprint("up") == fp_before  # same labels, same cache

    owner = argilla_server.client()
    dataset = find_dataset(owner, PushConfig(dataset="steps"))
    submit(dataset, [("steps-00002", owner.me.id, "tie", None, "submitted")])
    after = ArgillaPull(dataset="steps", ties="keep_ai")
    assert after.fingerprint("up") != fp_before  # a new annotation recomputes the merge
    out = after.process(pl.from_arrow(pairs).lazy())
    verdicts = {r["pair_id"]: r["human_verdict"] for r in out.table.to_pylist()}
    assert verdicts["steps-00002"] == "tie" and out.table.num_rows == 5
    assert {r["pair_id"]: r["annotators"] for r in out.table.to_pylist()}["steps-00002"] == ["owner"]


def test_cli_push_pull_and_wrong_key(argilla_server, pair_table, tmp_path, capsys, monkeypatch):
    from prefdata.argilla import cli_main

    src = tmp_path / "pairs.parquet"
    pq.write_table(pair_table(12, prefix="cli"), src)
    assert cli_main(["push", str(src), "--dataset", "cli", "--batch-size", "5"]) == 0
    assert "pushed 12 new record(s)" in capsys.readouterr().out
    assert cli_main(["push", str(src), "--dataset", "cli"]) == 0
    assert "pushed 0 new record(s)" in capsys.readouterr().out
    out = tmp_path / "merged.parquet"
    assert cli_main(["pull", str(src), "-o", str(out), "--dataset", "cli", "--unanswered", "exclude"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 0 pairs" in printed and (tmp_path / "merged.quarantine.parquet").exists()

    monkeypatch.setenv("ARGILLA_API_KEY", "not-the-right-key")
    assert cli_main(["push", str(src), "--dataset", "cli"]) == 2
    err = capsys.readouterr().err
    assert f"Argilla at {argilla_server.url} refused the API key" in err and "ARGILLA_API_KEY" in err
    assert "not-the-right-key" not in err
    with pytest.raises(ArgillaError, match="refused the API key .*check ARGILLA_API_KEY"):
        connect(argilla_server.url, "another-wrong-key")


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ArgillaError, match="cannot reach Argilla at http://127.0.0.1:9"):
        connect("http://127.0.0.1:9", "some-key")


def test_cli_status(argilla_server, capsys):
    from prefdata.argilla import cli_main

    assert cli_main(["status", "--data-dir", str(argilla_server.data_dir)]) == 0
    printed = capsys.readouterr().out
    assert '"healthy": true' in printed and '"version": "2.8.0"' in printed


def test_api_key_never_in_logs_or_outputs(argilla_server, tmp_path, capsys):
    """Run last in this file: every log and output written so far must not contain the key."""
    key = argilla_server.api_key
    assert key not in capsys.readouterr().out
    leaks = []
    roots = [argilla_server.data_dir, tmp_path.parent.parent]  # the server's data dir, this session's tmp files
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.name.startswith("argilla.db") or path.suffix == ".sock":
                continue  # argilla's own database holds the owner's key, as any Argilla deployment does
            if key.encode() in path.read_bytes():
                leaks.append(str(path))
    assert leaks == []
    assert (argilla_server.data_dir / "logs" / "server.log").stat().st_size > 0
