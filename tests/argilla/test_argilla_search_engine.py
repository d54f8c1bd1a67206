"""The in-process search engine, through the Argilla SDK and REST API: text, filters, sort, metrics."""

from __future__ import annotations


import pytest

from prefdata.argilla import PushConfig, find_dataset, push

SPECIAL = {2: "zebra", 5: "zebra crossing", 11: "zebras"}


def _ids(records) -> set[str]:
    return {r.id for r in records}


def _found(dataset, query) -> set[str]:
    # with_responses=False: the SDK 2.8 cannot build a record whose discarded response has no values
    return _ids(dataset.records(query=query, with_responses=False))


@pytest.fixture(scope="module")
def search_dataset(argilla_server, pair_table, submit):
    import argilla as rg

    from prefdata.argilla import connect

    pairs = pair_table(20, prefix="search", special=SPECIAL)
    push(pairs, PushConfig(dataset="search", batch_size=7, show_ai_suggestion=True))
    client = connect(argilla_server.url, argilla_server.api_key)
    dataset = find_dataset(client, PushConfig(dataset="search"))
    by_pair = {r.id: {"metadata": r.metadata.to_dict()} for r in dataset.records(with_responses=False)}
    me = client.me.id
    answers = {"search-00001": "A", "search-00003": "B", "search-00004": "A"}
    submit(dataset, [(pair, me, label, None, "submitted") for pair, label in answers.items()]
           + [("search-00006", me, None, None, "discarded")])
    return rg, client, dataset, pairs, by_pair, answers


def test_text_search(search_dataset):
    rg, _, dataset, *_ = search_dataset
    assert _found(dataset, rg.Query(query="zebra")) == {"search-00002", "search-00005"}
    assert _found(dataset, rg.Query(query="zebra*")) == {"search-00002", "search-00005", "search-00011"}
    assert _found(dataset, rg.Query(query='"zebra crossing"')) == {"search-00005"}
    assert _found(dataset, rg.Query(query="zebra -crossing")) == {"search-00002"}
    assert _found(dataset, rg.Query(query="question 7")) == {"search-00007", "search-00003"}  # AND
    assert _found(dataset, rg.Query(query='"Question 7:"')) == {"search-00007"}  # the chat field


def test_filters_on_metadata_suggestions_and_responses(search_dataset):
    rg, _, dataset, pairs, by_pair, answers = search_dataset
    high = {p for p, f in zip(pairs.column("pair_id").to_pylist(), pairs.column("flip_prob").to_pylist()) if f >= 0.8}
    q = rg.Query(filter=rg.Filter(("metadata.flip_prob", ">=", 0.8)))
    assert _found(dataset, q) == high
    a_first = {p for p, r in by_pair.items() if r["metadata"]["a_is"] == "chosen"}
    assert _found(dataset, rg.Query(filter=rg.Filter(("preference.suggestion", "==", "A")))) == a_first
    assert _found(dataset, rg.Query(filter=rg.Filter(("response.status", "==", "submitted")))) == set(answers)
    assert _found(dataset, rg.Query(filter=rg.Filter(("response.status", "==", "discarded")))) == {
        "search-00006"}
    pending = _found(dataset, rg.Query(filter=rg.Filter(("response.status", "==", "pending"))))
    assert pending == set(by_pair) - set(answers) - {"search-00006"}
    said_a = rg.Query(filter=rg.Filter(("preference.response", "==", "A")))
    assert _found(dataset, said_a) == {"search-00001", "search-00004"}
    assert _found(dataset, rg.Query(filter=rg.Filter(("status", "==", "completed")))) == set(answers)
    both = rg.Query(query="zebra*", filter=rg.Filter([("metadata.flip_prob", ">=", 0.2)]))  # 11 has 0.1
    assert _found(dataset, both) == {"search-00002", "search-00005"}


def test_sort_metrics_and_progress(search_dataset):
    _, client, dataset, pairs, *_ = search_dataset
    body = {"sort": [{"scope": {"entity": "metadata", "metadata_property": "margin"}, "order": "desc"}]}
    resp = client.http_client.post(f"/api/v1/datasets/{dataset.id}/records/search", json=body,
                                   params={"limit": 5, "offset": 2})
    resp.raise_for_status()
    got = [item["record"]["external_id"] for item in resp.json()["items"]]
    assert got == ["search-00017", "search-00016", "search-00015", "search-00014", "search-00013"]
    assert resp.json()["total"] == 20

    flip = next(p for p in dataset.settings.metadata if p.name == "flip_prob")
    metrics = client.http_client.get(f"/api/v1/metadata-properties/{flip.id}/metrics").json()
    assert (metrics["min"], metrics["max"]) == (0.0, pytest.approx(0.9))

    progress = dataset.progress()
    assert (progress["total"], progress["completed"], progress["pending"]) == (20, 3, 17)


def test_similarity_search(argilla_server):
    import argilla as rg

    from prefdata.argilla import connect

    client = connect(argilla_server.url, argilla_server.api_key)
    settings = rg.Settings(fields=[rg.TextField("text")], questions=[rg.LabelQuestion("label", ["x", "y"])],
                           vectors=[rg.VectorField("emb", dimensions=3)],
                           metadata=[rg.TermsMetadataProperty("side", options=["left", "right"])])
    dataset = rg.Dataset(name="vectors", workspace="prefdata", settings=settings, client=client).create()
    dataset.records.log([
        rg.Record(id="east", fields={"text": "east"}, vectors={"emb": [1.0, 0.0, 0.0]}, metadata={"side": "right"}),
        rg.Record(id="north", fields={"text": "north"}, vectors={"emb": [0.0, 1.0, 0.0]}, metadata={"side": "left"}),
        rg.Record(id="north-east", fields={"text": "north-east"}, vectors={"emb": [0.7, 0.7, 0.0]},
                  metadata={"side": "right"}),
    ])
    hits = list(dataset.records(query=rg.Query(similar=rg.Similar("emb", [1.0, 0.1, 0.0])), limit=2))
    assert [record.id for record, _ in hits] == ["east", "north-east"]  # (record, score), most similar first
    assert hits[0][1] > hits[1][1]
    left = rg.Query(similar=rg.Similar("emb", [1.0, 0.1, 0.0]), filter=rg.Filter(("metadata.side", "==", "left")))
    assert [record.id for record, _ in dataset.records(query=left)] == ["north"]

    side = next(p for p in dataset.settings.metadata if p.name == "side")
    terms = client.http_client.get(f"/api/v1/metadata-properties/{side.id}/metrics").json()
    assert terms["total"] == 3 and {v["term"]: v["count"] for v in terms["values"]} == {"right": 2, "left": 1}


def test_worker_job_updates_the_shared_index(argilla_server, pair_table, submit):
    """A distribution change runs argilla's rq job in the worker process; its index writes must
    reach the server process (the index is a shared SQLite file, not per-process memory)."""
    import time

    import argilla as rg

    from prefdata.argilla import connect

    push(pair_table(3, prefix="worker"), PushConfig(dataset="worker", min_submitted=2))
    client = connect(argilla_server.url, argilla_server.api_key)
    dataset = find_dataset(client, PushConfig(dataset="worker"))
    submit(dataset, [("worker-00000", client.me.id, "A", None, "submitted")])
    completed = rg.Query(filter=rg.Filter(("status", "==", "completed")))
    assert _found(dataset, completed) == set()  # 1 of 2 responses

    dataset.settings.distribution = rg.TaskDistribution(min_submitted=1)
    dataset.update()
    deadline = time.monotonic() + 60
    while _found(dataset, completed) != {"worker-00000"}:
        assert time.monotonic() < deadline, "the rq worker did not update the record status"
        time.sleep(0.5)
