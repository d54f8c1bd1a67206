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

    rebuilds = (argilla_server.data_dir / "logs" / "server.log").read_text().count("rebuilt the search index")
    argilla_server.restart()  # the launcher re-indexes the search engine after the crash
    log = (argilla_server.data_dir / "logs" / "server.log").read_text()
    assert log.count("rebuilt the search index") == rebuilds + 1
    again = push(pairs, PushConfig(dataset="crash", batch_size=10))
    assert 50 <= again.already_present < 200 and again.already_present + again.created == 200

    client = argilla_server.client()
    dataset = find_dataset(client, PushConfig(dataset="crash"))
    listed = [r.id for r in dataset.records(batch_size=1000, with_responses=False, with_suggestions=False)]
    assert sorted(listed) == sorted(pairs.column("pair_id").to_pylist())  # each once
    assert existing_ids(client, dataset) == set(listed)
    # the search index agrees with the database after the crash
    hits = list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.flip_prob", ">=", 0.0)))))
    assert len(hits) == 200 and {r.id for r in hits} == set(listed)


def test_clean_stop_then_start_does_not_rebuild(argilla_server, pair_table):
    """stop is SIGTERM: the launcher must leave through its cleanup (no RUNNING marker left),
    so the next start trusts the search index instead of rebuilding it as after a crash."""
    import argilla as rg

    from prefdata.argilla_dev import server

    push(pair_table(30, prefix="clean"), PushConfig(dataset="clean"))
    log = argilla_server.data_dir / "logs" / "server.log"
    marker = argilla_server.data_dir / "search" / "RUNNING"

    def counts():
        dataset = find_dataset(argilla_server.client(), PushConfig(dataset="clean"))
        listed = len(list(dataset.records(with_responses=False, with_suggestions=False)))
        searched = len(list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.flip_prob", ">=", 0.0))))))
        return listed, searched

    before = counts()
    rebuilds = log.read_text().count("rebuilt the search index")
    assert marker.exists()
    assert server.stop(argilla_server.data_dir)
    assert not marker.exists()  # the launcher's cleanup ran
    assert "argilla-server stopped" in log.read_text().rsplit("=== prefdata argilla serve", 1)[1]
    server.serve(argilla_server.data_dir, port=argilla_server.port)
    assert log.read_text().count("rebuilt the search index") == rebuilds  # no crash recovery
    assert counts() == before == (30, 30)
