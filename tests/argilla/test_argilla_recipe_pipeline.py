"""route -> argilla_push -> argilla_pull in a real Pipeline: the pull re-runs when labels change."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from prefdata.pipeline import Pipeline
from prefdata.step import Source


@dataclass
class PairFileConfig:
    path: str = ""


class PairFile(Source):
    name = "pair_file"
    Config = PairFileConfig

    def output_columns(self, columns):
        return pq.read_schema(self.config.path).names

    def read(self):
        return pq.read_table(self.config.path)


def steps(path):
    from prefdata.steps.human import ArgillaPull, ArgillaPush
    from prefdata.steps.route import Route

    return [PairFile(path=str(path)), Route(strategy="flip_prob", budget=4),
            ArgillaPush(dataset="recipe", batch_size=3), ArgillaPull(dataset="recipe")]


def test_pipeline_pushes_once_and_pulls_when_labels_change(argilla_server, pair_table, tmp_path, submit):
    from prefdata.argilla import PushConfig, a_is_chosen, find_dataset

    src = tmp_path / "pairs.parquet"
    pq.write_table(pair_table(10, prefix="recipe"), src)
    first = Pipeline(steps(src), workdir=tmp_path / "work", output=tmp_path / "out.parquet", shard_size=4,
                     progress=False)
    out = first.run()
    stats = {s.step: s for s in first.stats}
    assert stats["argilla_push"].counts == {"pushed": 4, "already_in_argilla": 0}
    assert out.num_rows == 10 and set(out.column("label_source").to_pylist()) == {"ai"}
    routed = {r["pair_id"] for r in out.to_pylist() if r["route"] == "human"}
    assert routed == {"recipe-00008", "recipe-00009", "recipe-00007", "recipe-00006"}  # highest flip_prob

    owner = argilla_server.client()
    dataset = find_dataset(owner, PushConfig(dataset="recipe"))
    flip = "B" if a_is_chosen("recipe-00009", 0) else "A"
    submit(dataset, [("recipe-00009", owner.me.id, flip, None, "submitted")])

    second = Pipeline(steps(src), workdir=tmp_path / "work", output=tmp_path / "out.parquet", shard_size=4,
                      progress=False)
    out = second.run()
    stats = {s.step: s for s in second.stats}
    assert stats["argilla_push"].shards_cached > 0  # the push is not repeated
    assert stats["argilla_pull"].shards_cached == 0  # new labels: the merge runs again
    rows = {r["pair_id"]: r for r in out.to_pylist()}
    assert rows["recipe-00009"]["label_source"] == "human" and rows["recipe-00009"]["chosen_id"] == "recipe-r9"
    assert sum(r["label_source"] == "human" for r in rows.values()) == 1
