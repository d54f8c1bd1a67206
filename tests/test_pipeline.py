"""The engine: cache layout, resume, recomputation after a config change, column checks."""

from __future__ import annotations

from dataclasses import dataclass
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata import shards
from prefdata.pipeline import Pipeline, PipelineError
from prefdata.step import GlobalStep, MapStep, Output, Source

CALLS: dict[str, int] = {}


def bump(key: str) -> None:
    CALLS[key] = CALLS.get(key, 0) + 1


@dataclass
class ReadConfig:
    path: str = ""


class ReadPrompts(Source):
    name = "read"
    Config = ReadConfig

    def output_columns(self, columns):
        return ["prompt_id", "text"]

    def read(self):
        bump("read")
        table = pq.read_table(self.config.path)
        bad = table.filter(pa.compute.equal(table["text"], ""))
        good = table.filter(pa.compute.not_equal(table["text"], ""))
        return Output(good, quarantine=bad.append_column("reason", pa.array(["empty text"] * bad.num_rows)))


@dataclass
class ExpandConfig:
    n: int = 2


class Expand(MapStep):
    """Stands in for sampling: n rows per prompt; counts setups like a model load."""

    name = "expand"
    Config = ExpandConfig

    def input_columns(self):
        return ["prompt_id", "text"]

    def output_columns(self, columns):
        return columns + ["response"]

    def setup(self):
        bump("expand.setup")

    def process(self, table):
        bump("expand.process")
        df = pl.from_arrow(table)
        df = df.join(pl.DataFrame({"k": list(range(self.config.n))}), how="cross")
        return df.with_columns(response=pl.col("text") + "#" + pl.col("k").cast(pl.String)).drop("k")


@dataclass
class ScoreConfig:
    scale: float = 1.0


class Score(MapStep):
    name = "score"
    Config = ScoreConfig

    def input_columns(self):
        return ["response"]

    def output_columns(self, columns):
        return columns + ["score_len"]

    def process(self, table):
        bump("score.process")
        df = pl.from_arrow(table)
        return df.with_columns(score_len=pl.col("response").str.len_chars().cast(pl.Float64) * self.config.scale)


class Top(GlobalStep):
    name = "top"

    def input_columns(self):
        return ["score_len"]

    def process(self, frame):
        bump("top.process")
        return frame.filter(pl.col("score_len") >= pl.col("score_len").median())


@pytest.fixture(autouse=True)
def reset_calls():
    CALLS.clear()


@pytest.fixture
def prompts(tmp_path) -> Path:
    texts = [f"prompt {i}" * (1 + i % 3) for i in range(10)] + [""]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(11)], "text": texts}), path)
    return path


def make(prompts, tmp_path, n=2, scale=1.0, shard_size=3):
    steps = [ReadPrompts(path=str(prompts)), Expand(n=n), Score(scale=scale), Top()]
    return Pipeline(steps, workdir=tmp_path / "work", output=tmp_path / "out" / "result.parquet",
                    shard_size=shard_size, progress=False)


def test_run_writes_shards_marker_and_output(prompts, tmp_path):
    pipe = make(prompts, tmp_path)
    result = pipe.run()
    dirs = pipe.step_dirs()
    assert [d.name.split("-")[0] for d in dirs] == ["read", "expand", "score", "top"]
    # 10 good prompts in shards of 3 prompts -> 4 shards for every map step.
    assert sorted(p.name for p in dirs[1].glob("shard-*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert all((d / shards.MARKER).is_file() for d in dirs)
    assert not list(tmp_path.rglob("*.tmp"))
    out = pq.read_table(tmp_path / "out" / "result.parquet")
    assert out.num_rows == result.num_rows > 0
    # every prompt's rows stay in one shard
    for path in dirs[1].glob("shard-*.parquet"):
        ids = set(pq.read_table(path)["prompt_id"].to_pylist())
        for other in dirs[1].glob("shard-*.parquet"):
            if other != path:
                assert ids.isdisjoint(pq.read_table(other)["prompt_id"].to_pylist())
    stats = {s.step: s for s in pipe.stats}
    assert stats["expand"].rows_in == 10 and stats["expand"].rows_out == 20
    assert stats["read"].counts["quarantined"] == 1


def test_quarantine_is_written_with_reason(prompts, tmp_path):
    make(prompts, tmp_path).run()
    q = pq.read_table(tmp_path / "out" / "result.quarantine.parquet")
    assert q.num_rows == 1
    assert q["reason"].to_pylist() == ["empty text"]
    assert q["step"].to_pylist() == ["read"]
    assert q["prompt_id"].to_pylist() == ["p10"]


def test_rerun_is_all_cache_hits_and_loads_nothing(prompts, tmp_path):
    first = make(prompts, tmp_path).run()
    CALLS.clear()
    pipe = make(prompts, tmp_path)
    second = pipe.run()
    assert CALLS == {}  # no read, no setup (model load), no process
    assert second.equals(first)
    assert all(s.shards_cached == s.shards for s in pipe.stats)


def test_config_change_recomputes_that_step_and_later_only(prompts, tmp_path):
    make(prompts, tmp_path).run()
    CALLS.clear()
    pipe = make(prompts, tmp_path, scale=2.0)
    out = pipe.run()
    assert "read" not in CALLS and "expand.process" not in CALLS and "expand.setup" not in CALLS
    assert CALLS["score.process"] == 4 and CALLS["top.process"] == 1
    assert max(out["score_len"].to_pylist()) > 0
    old, new = make(prompts, tmp_path).fingerprints(), pipe.fingerprints()
    assert old[:2] == new[:2] and old[2] != new[2] and old[3] != new[3]


def test_resume_skips_finished_shards(prompts, tmp_path):
    full = make(prompts, tmp_path / "a").run()
    pipe = make(prompts, tmp_path / "b")
    pipe.run()
    score_dir = pipe.step_dirs()[2]
    # Simulate a run killed mid-step: two shards and the markers after them gone,
    # plus a half-written temp file left behind.
    for i in (1, 3):
        shards.shard_path(score_dir, i).unlink()
    (score_dir / shards.MARKER).unlink()
    (score_dir / ".shard-00001.parquet.abc.tmp").write_bytes(b"half")
    for d in pipe.step_dirs()[3:]:
        for f in d.iterdir():
            f.unlink()
    # ... before those shards' prompts reached the prompt store.
    shutil.rmtree(pipe.prompt_store(2).dir)
    CALLS.clear()
    resumed = make(prompts, tmp_path / "b").run()
    assert CALLS["score.process"] == 2 and "expand.process" not in CALLS
    assert resumed.sort_by("response").equals(full.sort_by("response"))


def test_model_setup_only_when_a_shard_is_missing(prompts, tmp_path):
    pipe = make(prompts, tmp_path)
    pipe.run()
    expand_dir = pipe.step_dirs()[1]
    shards.shard_path(expand_dir, 2).unlink()
    CALLS.clear()
    make(prompts, tmp_path).run()
    # the shard's prompts are in the prompt store: rebuilt from it, no setup, no process
    assert "expand.setup" not in CALLS and "expand.process" not in CALLS
    assert shards.shard_path(expand_dir, 2).exists()
    shards.shard_path(expand_dir, 2).unlink()
    shutil.rmtree(pipe.prompt_store(1).dir)
    CALLS.clear()
    make(prompts, tmp_path).run()
    assert CALLS["expand.setup"] == 1 and CALLS["expand.process"] == 1


def test_missing_column_fails_before_any_work(prompts, tmp_path):
    steps = [ReadPrompts(path=str(prompts)), Score(), Expand()]
    pipe = Pipeline(steps, workdir=tmp_path / "work", progress=False)
    with pytest.raises(PipelineError, match=r"step 1 'score' needs column\(s\) \['response'\]"):
        pipe.run()
    assert CALLS == {}
    assert not (tmp_path / "work").exists()


def test_first_step_must_be_a_source(prompts, tmp_path):
    with pytest.raises(PipelineError, match="source"):
        Pipeline([Expand()], workdir=tmp_path)


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown option.*'m'"):
        Expand(m=3)
    with pytest.raises(TypeError, match="expected an integer"):
        Expand(n="three")


def test_global_step_output_is_resharded_by_prompt(prompts, tmp_path):
    pipe = make(prompts, tmp_path, shard_size=2)
    out = pipe.run()
    top_dir = pipe.step_dirs()[3]
    n_prompts = len(set(out["prompt_id"].to_pylist()))
    assert len(list(top_dir.glob("shard-*.parquet"))) == -(-n_prompts // 2)
