"""The Ray executor against the local one: same shard files, rows and fingerprints, one model
load per actor, and runs that move between executors (resume, and a SIGKILL under Ray).

Without ``prefdata[ray]`` only the checks of names and options run. One local Ray cluster
(2 CPUs) serves the module: starting it takes ~5-10 s and every actor pool a few seconds
more (each actor imports what the step needs), so the pipelines here are tiny.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata import shards
from prefdata.executors import LocalExecutor, make_executor
from prefdata.executors.ray import RayExecutor
from prefdata.pipeline import Pipeline
from prefdata.step import GlobalStep, MapStep, Source

try:
    import ray.data  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="the Ray executor needs Ray Data: pip install 'prefdata[ray]'")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# -- toy steps (importable by the actors: the executor hands them the driver's sys.path) --
@dataclass
class ReadConfig:
    path: str = ""


class ReadPrompts(Source):
    name = "read"
    Config = ReadConfig

    def output_columns(self, columns):
        return ["prompt_id", "text"]

    def read(self):
        return pq.read_table(self.config.path)


@dataclass
class ExpandConfig:
    n: int = 2


class Expand(MapStep):
    """Stands in for a model step: ``setup`` "loads a model" and logs which process did."""

    name = "expand"
    Config = ExpandConfig
    log_dir: Path | None = None  # not config: outside the fingerprint
    delay: float = 0.0
    fail_on: str | None = None

    def input_columns(self):
        return ["prompt_id", "text"]

    def output_columns(self, columns):
        return columns + ["response"]

    def setup(self):
        self.model = {"pid": os.getpid()}
        _log(self.log_dir, "setup")

    def teardown(self):
        self.model = None

    def process(self, table):
        assert self.model["pid"] == os.getpid(), "process() ran where setup() did not"
        _log(self.log_dir, "process")
        if self.fail_on in table["prompt_id"].to_pylist():
            raise ValueError(f"cannot expand {self.fail_on}")
        time.sleep(self.delay)
        df = pl.from_arrow(table).join(pl.DataFrame({"k": list(range(self.config.n))}), how="cross")
        return df.with_columns(response=pl.col("text") + "#" + pl.col("k").cast(pl.String)).drop("k")


class Score(MapStep):
    name = "score"

    def input_columns(self):
        return ["response"]

    def output_columns(self, columns):
        return columns + ["score_len"]

    def process(self, table):
        df = pl.from_arrow(table)
        return df.with_columns(score_len=pl.col("response").str.len_chars().cast(pl.Float64) * 0.5)


class Top(GlobalStep):
    name = "top"

    def input_columns(self):
        return ["score_len"]

    def process(self, frame):
        return frame.filter(pl.col("score_len") >= pl.col("score_len").median())


def _log(log_dir, what: str) -> None:
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / f"{what}-{os.getpid()}-{uuid.uuid4().hex}").touch()


def logged(log_dir: Path, what: str) -> list[int]:
    """The pid of every logged ``setup`` or ``process`` call."""
    return [int(p.name.split("-")[1]) for p in Path(log_dir).glob(f"{what}-*")]


def write_prompts(path: Path, n: int = 8) -> Path:
    texts = [f"prompt {i} " * (1 + i % 3) for i in range(n)]
    pq.write_table(pa.table({"prompt_id": [f"p{i:02d}" for i in range(n)], "text": texts}), path)
    return path


def toy_pipeline(prompts, workdir, log_dir=None, executor=None, delay=0.0, fail_on=None, shard_size=2):
    expand = Expand(n=2)
    expand.log_dir, expand.delay, expand.fail_on = log_dir, delay, fail_on
    steps = [ReadPrompts(path=str(prompts)), expand, Score(), Top()]
    return Pipeline(steps, workdir=workdir, shard_size=shard_size, executor=executor, progress=False)


def same_shards(dir_a: Path, dir_b: Path) -> None:
    """Same shard and quarantine files, same rows, same counts (bar the timings)."""
    names = sorted(p.name for p in dir_a.glob("*.parquet"))
    assert names and names == sorted(p.name for p in dir_b.glob("*.parquet"))
    for name in names:
        a, b = pq.read_table(dir_a / name), pq.read_table(dir_b / name)
        assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None)), name
        counts_a, counts_b = shards.shard_counts(dir_a / name), shards.shard_counts(dir_b / name)
        counts_a.pop("seconds", None), counts_b.pop("seconds", None)
        assert counts_a == counts_b, name


@pytest.fixture(scope="module")
def ray_executor():
    import ray

    executor = RayExecutor(num_actors=2, num_cpus=2)
    executor.connect()
    yield executor
    ray.shutdown()


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.parquet")


# -- tests -----------------------------------------------------------------------------
def test_make_executor_by_name():
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(ValueError, match="unknown executor 'spark'"):
        make_executor("spark")
    with pytest.raises(ValueError, match=r"local executor: unknown option\(s\) \[.num_actors.\]; known options: \[.in_process.\]"):
        make_executor("local", num_actors=2)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'prefdata\[ray\]'"):
        make_executor("ray")


@needs_ray
def test_ray_options_are_checked():
    ex = make_executor("ray", num_actors=3, num_cpus_per_actor=1)
    assert isinstance(ex, RayExecutor) and ex.num_actors == 3 and ex.num_cpus_per_actor == 1.0
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['actors'\]"):
        make_executor("ray", actors=2)
    with pytest.raises(ValueError, match="num_actors must be"):
        make_executor("ray", num_actors=0)


@needs_ray
def test_ray_matches_local_rows_files_fingerprints_one_setup_per_actor(ray_executor, prompts, tmp_path):
    local = toy_pipeline(prompts, tmp_path / "local")
    expected = local.run()
    logs = tmp_path / "logs"
    on_ray = toy_pipeline(prompts, tmp_path / "ray", log_dir=logs, executor=ray_executor)
    result = on_ray.run()
    assert result.equals(expected)
    assert on_ray.fingerprints() == local.fingerprints()
    for dir_local, dir_ray in zip(local.step_dirs(), on_ray.step_dirs()):
        same_shards(dir_local, dir_ray)
    setups, processed = logged(logs, "setup"), logged(logs, "process")
    assert len(processed) == 4  # 8 prompts in shards of 2
    assert 1 <= len(setups) <= 2 and len(set(setups)) == len(setups)  # one model load per actor
    assert set(processed) <= set(setups) and os.getpid() not in setups
    # All cached: no actor, no model load.
    again = toy_pipeline(prompts, tmp_path / "ray", log_dir=tmp_path / "logs2", executor=ray_executor)
    assert again.run().equals(expected)
    assert not (tmp_path / "logs2").exists()


@needs_ray
def test_run_started_locally_resumes_on_ray(ray_executor, prompts, tmp_path):
    expected = toy_pipeline(prompts, tmp_path / "ref").run()
    pipe = toy_pipeline(prompts, tmp_path / "work")
    pipe.run()
    expand_dir = pipe.step_dirs()[1]
    for i in (1, 3):
        shards.shard_path(expand_dir, i).unlink()
    (expand_dir / shards.MARKER).unlink()
    shutil.rmtree(pipe.prompt_store(1).dir)  # killed before those prompts were stored too
    logs = tmp_path / "logs"
    resumed = toy_pipeline(prompts, tmp_path / "work", log_dir=logs, executor=ray_executor).run()
    assert resumed.equals(expected)
    assert len(logged(logs, "process")) == 2


@needs_ray
def test_failing_shard_names_step_and_shard(ray_executor, prompts, tmp_path):
    pipe = toy_pipeline(prompts, tmp_path / "work", executor=ray_executor, fail_on="p05")
    with pytest.raises(RuntimeError, match=r"step 'expand' failed on shard 2 .*cannot expand p05"):
        pipe.run()


@needs_ray
def test_pool_larger_than_the_cluster_is_refused(ray_executor, prompts, tmp_path):
    greedy = RayExecutor(num_actors=3, num_cpus_per_actor=1)
    with pytest.raises(ValueError, match="would wait forever"):
        toy_pipeline(prompts, tmp_path / "work", executor=greedy).run()


KILL_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from test_ray_executor import toy_pipeline
from prefdata.executors.ray import RayExecutor

executor = RayExecutor(num_actors=1, num_cpus=2)
toy_pipeline({prompts!r}, {workdir!r}, log_dir={logs!r}, executor=executor, delay=1.5).run()
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@needs_ray
def test_run_killed_under_ray_resumes_locally(prompts, tmp_path):
    """SIGKILL the whole process group (driver, its Ray cluster) mid-step, resume locally."""
    workdir, logs = tmp_path / "work", tmp_path / "logs"
    expand_dir = toy_pipeline(prompts, workdir).step_dirs()[1]
    script = tmp_path / "run_on_ray.py"
    script.write_text(KILL_SCRIPT.format(here=str(HERE), prompts=str(prompts), workdir=str(workdir),
                                         logs=str(logs)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list(expand_dir.glob("shard-*.parquet")):
            assert proc.poll() is None, f"the Ray run ended early:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no shard written under Ray within 90 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    actors = logged(logs, "setup")
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in actors) and time.monotonic() < deadline:
        time.sleep(0.2)  # the actors notice their raylet is gone and exit
    assert not any(_alive(pid) for pid in actors), "Ray actors outlived their killed cluster"
    done = list(expand_dir.glob("shard-*.parquet"))
    assert 1 <= len(done) < 4 and not (expand_dir / shards.MARKER).exists()

    # a shard's prompts reach the prompt store just before its file: a kill in between leaves
    # prompts that the resumed run takes from the store without computing them again
    store = toy_pipeline(prompts, workdir).prompt_store(1)
    stored = [p for p in store.dir.glob("part-*.parquet") if not p.name.endswith(".quarantine.parquet")]
    assert len(stored) >= len(done)
    local_logs = tmp_path / "local-logs"
    resumed = toy_pipeline(prompts, workdir, log_dir=local_logs).run()
    assert len(logged(local_logs, "process")) == 4 - len(stored)
    expected = toy_pipeline(prompts, tmp_path / "ref").run()
    assert resumed.equals(expected)


# -- the real steps on a tiny random Llama -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved like a user's checkpoint."""
    from prefdata.models import clear_cache

    yield tiny_llama_factory(0, max_positions=256)  # tests/conftest.py
    clear_cache()


@needs_ray
def test_sample_and_score_cdr_on_ray_equal_local(ray_executor, tiny_dir, tmp_path):
    from prefdata.steps.cdr import ScoreCDR
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.sample import Sample

    questions = ["What is 2 + 2?", "Name a river.", "Say hi in French.", "Why is the sky blue?"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "{q}"}}\n' for q in questions))
    model = dict(backend="transformers", device="cpu", dtype="float32")

    def pipeline(workdir, executor):
        steps = [LoadPrompts(path=str(path)),
                 Sample(model=tiny_dir, n=2, max_new_tokens=8, seed=1, **model),
                 ScoreCDR(strong=tiny_dir, **model)]
        return Pipeline(steps, workdir=workdir, shard_size=2, executor=executor, progress=False)

    local = pipeline(tmp_path / "local", None)
    expected = local.run()
    on_ray = pipeline(tmp_path / "ray", RayExecutor(num_actors=1))  # each actor imports torch: seconds
    result = on_ray.run()
    assert expected.num_rows == 8 and len(set(expected["response"].to_pylist())) > 1
    assert result.to_pylist() == expected.to_pylist()
    for dir_local, dir_ray in zip(local.step_dirs(), on_ray.step_dirs()):
        assert dir_local.name == dir_ray.name
        same_shards(dir_local, dir_ray)
