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


# -- prompt-level reuse ------------------------------------------------------------------
@dataclass
class LimitedReadConfig:
    path: str = ""
    limit: int | None = None


class LimitedRead(Source):
    name = "read_limited"
    Config = LimitedReadConfig

    def output_columns(self, columns):
        return ["prompt_id", "text"]

    def fingerprint_extra(self):
        import hashlib

        return hashlib.sha256(Path(self.config.path).read_bytes()).hexdigest()

    def read(self):
        table = pq.read_table(self.config.path)
        table = table.filter(pa.compute.not_equal(table["text"], ""))
        return table if self.config.limit is None else table.slice(0, self.config.limit)


class CountingExpand(Expand):
    """Expand that counts the prompts it is handed (what a model would be asked)."""

    name = "expand"

    def process(self, table):
        CALLS["expand.prompts"] = CALLS.get("expand.prompts", 0) + len(set(table["prompt_id"].to_pylist()))
        return super().process(table)


def make_limited(prompts, tmp_path, limit=None, shard_size=2):
    steps = [LimitedRead(path=str(prompts), limit=limit), CountingExpand(), Score(), Top()]
    return Pipeline(steps, workdir=tmp_path / "work", shard_size=shard_size, progress=False, card=False)


def test_larger_limit_computes_only_the_new_prompts(prompts, tmp_path):
    small = make_limited(prompts, tmp_path, limit=3).run()
    assert CALLS["expand.prompts"] == 3
    CALLS.clear()
    pipe = make_limited(prompts, tmp_path, limit=6)
    large = pipe.run()
    assert CALLS["expand.prompts"] == 3  # p3, p4, p5 only
    stats = {s.step: s for s in pipe.stats}
    assert stats["expand"].counts["prompts_reused"] == 3 and stats["expand"].counts["prompts_computed"] == 3
    # the first three prompts' rows (through the map steps) are the stored ones, unchanged
    expand_small = shards.read_shards(sorted(make_limited(prompts, tmp_path, limit=3).step_dirs()[2].glob("shard-*")))
    expand_large = shards.read_shards(sorted(pipe.step_dirs()[2].glob("shard-*")))
    first = pl.from_arrow(expand_large).filter(pl.col("prompt_id").is_in(["p0", "p1", "p2"]))
    assert first.equals(pl.from_arrow(expand_small))
    assert set(large["prompt_id"].to_pylist()) - set(small["prompt_id"].to_pylist())  # new prompts arrived


def test_shard_size_changes_layout_not_content_and_computes_nothing(prompts, tmp_path):
    two = make_limited(prompts, tmp_path, shard_size=2)
    out2 = two.run()
    CALLS.clear()
    four = make_limited(prompts, tmp_path, shard_size=4)
    out4 = four.run()
    assert "expand.prompts" not in CALLS and "score.process" not in CALLS  # nothing computed
    assert CALLS == {"top.process": 1}  # the global step recomputes (cheap)
    assert len(list(four.step_dirs()[1].glob("shard-*"))) == 3 and len(list(two.step_dirs()[1].glob("shard-*"))) == 5
    for a, b in zip(two.step_dirs()[1:3], four.step_dirs()[1:3]):
        ta = shards.read_shards(sorted(a.glob("shard-*")))
        tb = shards.read_shards(sorted(b.glob("shard-*")))
        assert ta.equals(tb)
    assert out2.sort_by([("prompt_id", "ascending"), ("response", "ascending")]).equals(
        out4.sort_by([("prompt_id", "ascending"), ("response", "ascending")]))


def test_changed_upstream_content_never_hits_the_store(prompts, tmp_path):
    make_limited(prompts, tmp_path).run()
    # same prompt ids, one text changed: only that prompt is recomputed downstream
    table = pq.read_table(prompts)
    texts = table["text"].to_pylist()
    texts[4] = "a different text"
    pq.write_table(table.set_column(1, "text", pa.array(texts)), prompts)
    CALLS.clear()
    out = make_limited(prompts, tmp_path).run()
    assert CALLS["expand.prompts"] == 1 and CALLS["score.process"] == 1
    expanded = shards.read_shards(sorted(make_limited(prompts, tmp_path).step_dirs()[1].glob("shard-*")))
    assert sorted(r for r in expanded["response"].to_pylist() if r.startswith("a different")) == [
        "a different text#0", "a different text#1"]
    assert out.num_rows > 0


def test_store_survives_a_lost_index_and_force_recomputes(prompts, tmp_path):
    pipe = make_limited(prompts, tmp_path, limit=4)
    pipe.run()
    store = pipe.prompt_store(1)
    (store.dir / "index.parquet").unlink()
    CALLS.clear()
    make_limited(prompts, tmp_path, limit=6).run()
    assert CALLS["expand.prompts"] == 2  # index rebuilt from the parts
    CALLS.clear()
    forced = Pipeline(make_limited(prompts, tmp_path, limit=6).steps, workdir=tmp_path / "work", shard_size=2,
                      progress=False, card=False, force_from=1)
    forced.run()
    assert CALLS["expand.prompts"] == 6 and CALLS["score.process"] == 3


class ShardMean(MapStep):
    """Not prompt-local: a shard-level statistic. Opts out of the prompt store."""

    name = "shard_mean"
    prompt_local = False

    def input_columns(self):
        return ["score_len"]

    def output_columns(self, columns):
        return columns + ["shard_mean"]

    def process(self, table):
        bump("shard_mean.process")
        df = pl.from_arrow(table)
        return df.with_columns(shard_mean=pl.col("score_len").mean())


def test_step_that_is_not_prompt_local_is_recomputed_per_shard(prompts, tmp_path):
    def steps(limit):
        return [LimitedRead(path=str(prompts), limit=limit), CountingExpand(), Score(), ShardMean()]

    Pipeline(steps(3), workdir=tmp_path / "w", shard_size=2, progress=False, card=False).run()
    CALLS.clear()
    pipe = Pipeline(steps(6), workdir=tmp_path / "w", shard_size=2, progress=False, card=False)
    pipe.run()
    assert CALLS["expand.prompts"] == 3 and CALLS["shard_mean.process"] == 3
    assert pipe.prompt_store(3) is None and not (tmp_path / "w" / "_prompts" / "shard_mean").exists()


# -- the run summary ---------------------------------------------------------------------
class Epsilon(GlobalStep):
    """A global step with metadata, as noise records ε."""

    name = "eps"

    def process(self, frame):
        self.metadata = {"epsilon": 0.123456, "epsilon_stderr": 0.01, "epsilon_estimator": "confident_sign",
                         "per_member": {"a": 1}}
        return frame


def test_summary_names_repeated_steps_shows_metadata_and_rows_read(prompts, tmp_path):
    steps = [LimitedRead(path=str(prompts), limit=4), Expand(), Score(scale=1.0), Score(scale=2.0), Epsilon()]
    # two steps of one name must not share a column: the second writes into the same column name,
    # which is fine for the summary test (it checks names and notes)
    pipe = Pipeline(steps, workdir=tmp_path / "w", shard_size=2, progress=False, card=False)
    pipe.run()
    text = pipe.summary_text()
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert list(lines) == ["read_limited", "expand", "score[1]", "score[2]", "eps"]
    assert lines["score[1]"].split()[1] != lines["score[2]"].split()[1]  # their own fingerprints
    assert "epsilon=0.1235, epsilon_stderr=0.01, epsilon_estimator=confident_sign" in lines["eps"]
    assert "per_member" not in lines["eps"]
    assert [s.label for s in pipe.stats] == ["read_limited", "expand", "score[1]", "score[2]", "eps"]
    summary = pipe.summary()
    assert [s["label"] for s in summary["steps"]][2:4] == ["score[1]", "score[2]"]
    assert lines["read_limited"].split()[2] == "4" and "limit=4" in lines["read_limited"]


def test_no_progress_silences_library_bars(prompts, tmp_path, monkeypatch):
    from prefdata.executors.worker import PROGRESS_ENV

    for key in PROGRESS_ENV:
        monkeypatch.delenv(key, raising=False)
    import transformers.utils.logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        make(prompts, tmp_path).run()
        assert hf_logging.is_progress_bar_enabled() is False
        import os

        assert all(os.environ.get(k) == v for k, v in PROGRESS_ENV.items())
    finally:
        hf_logging.enable_progress_bar()


# -- prompt-level reuse with the real sample step on a real (tiny) model --------------------
def test_real_sample_reuse_matches_a_fresh_run(tmp_path, tiny_llama):
    import json

    from prefdata.executors import LocalExecutor
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.sample import Sample

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}."}) + "\n" for i in range(6)))

    def run(workdir, limit, shard_size=2):
        steps = [LoadPrompts(path=str(data), limit=limit),
                 Sample(model=tiny_llama, n=2, max_new_tokens=4, backend="transformers", device="cpu",
                        dtype="float32", batch_size=3),
                 Score()]
        pipe = Pipeline(steps, workdir=workdir, shard_size=shard_size, progress=False, card=False,
                        executor=LocalExecutor(in_process=True))
        out = pipe.run()
        sample = shards.read_shards(sorted(pipe.step_dirs()[1].glob("shard-*.parquet")))
        return pipe.stats[1].counts, sample, out

    counts, small, _ = run(tmp_path / "a", limit=3)
    assert counts["prompts_computed"] == 3
    counts, grown, out = run(tmp_path / "a", limit=6)
    assert counts["prompts_computed"] == 3 and counts["prompts_reused"] == 3  # only the new prompts sampled
    assert pl.from_arrow(grown).head(small.num_rows).equals(pl.from_arrow(small))  # the first 3 prompts unchanged
    _, fresh, fresh_out = run(tmp_path / "b", limit=6)  # nothing reused
    assert pl.from_arrow(grown).equals(pl.from_arrow(fresh))  # reuse gives what a fresh run gives
    assert out.equals(fresh_out)
    counts, relaid, _ = run(tmp_path / "a", limit=6, shard_size=4)
    assert counts.get("prompts_computed", 0) == 0  # another layout computes nothing
    assert pl.from_arrow(relaid).equals(pl.from_arrow(grown))


def test_run_without_collect_writes_the_same_output_without_loading_it(prompts, tmp_path):
    whole = make(prompts, tmp_path / "a").run()
    pipe = make(prompts, tmp_path / "b")
    assert pipe.run(collect=False) is None
    streamed = pq.read_table(tmp_path / "b" / "out" / "result.parquet")
    assert streamed.replace_schema_metadata(None).equals(whole)
    assert streamed.schema.metadata == pq.read_schema(tmp_path / "a" / "out" / "result.parquet").metadata


class ReadTexts(Source):
    """A user's source without prompt_id: map steps still run (computed per shard)."""

    name = "texts"
    Config = ReadConfig

    def output_columns(self, columns):
        return ["response"]

    def read(self):
        return pa.table({"response": ["a", "bbb", "cc"]})


def test_a_table_without_prompt_id_is_computed_per_shard_not_refused(tmp_path):
    pipe = Pipeline([ReadTexts(), Score()], workdir=tmp_path / "work", shard_size=2, progress=False)
    assert pipe.run()["score_len"].to_pylist() == [1.0, 3.0, 2.0]
