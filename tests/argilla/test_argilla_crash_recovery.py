"""Kill the server in the middle of a push, restart it, push again: every pair present once."""

from __future__ import annotations

import threading

import pytest

from prefdata.argilla import ArgillaError, PushConfig, existing_ids, find_dataset, push


def test_kill_server_during_push_then_push_again(argilla_server, pair_table):
    import argilla as rg

    pairs = pair_table(200, prefix="crash")
    killed = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 50 and not killed.is_set():
            killed.set()  # kill while the next batches are in flight
            threading.Timer(0.05, argilla_server.kill).start()

    with pytest.raises(ArgillaError, match="failed after 1 attempts .*run the same command again"):
        push(pairs, PushConfig(dataset="crash", batch_size=10, retries=0), progress=progress)
    assert killed.is_set()

    argilla_server.restart()  # the launcher re-indexes the search engine after the crash
    again = push(pairs, PushConfig(dataset="crash", batch_size=10))
    assert 50 <= again.already_present < 200 and again.already_present + again.created == 200

    client = argilla_server.client()
    dataset = find_dataset(client, PushConfig(dataset="crash"))
    listed = []
    offset = 0
    while True:
        page = client.http_client.get(f"/api/v1/datasets/{dataset.id}/records",
                                      params={"limit": 1000, "offset": offset}).json()
        listed += [r["external_id"] for r in page["items"]]
        if len(page["items"]) < 1000:
            break
        offset += 1000
    assert sorted(listed) == sorted(pairs.column("pair_id").to_pylist())  # each once
    assert existing_ids(client, dataset) == set(listed)
    # the search index agrees with the database after the crash
    hits = list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.flip_prob", ">=", 0.0)))))
    assert len(hits) == 200 and {r.id for r in hits} == set(listed)
