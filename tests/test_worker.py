"""Model-holding steps in a worker process: same shards as in-process, no model left in the
parent, errors and kills reported with the step's name, finished shards kept for a rerun.

The worker is a real ``spawn`` process (a few seconds each: it imports torch); the kill is
a real SIGKILL the step sends itself, as the kernel's OOM killer would.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefdata.models as prefmodels
from prefdata import shards
from prefdata.executors import LocalExecutor, make_executor
from prefdata.executors.worker import WorkerError
from prefdata.pipeline import Pipeline
from prefdata.step import GlobalStep, MapStep
from prefdata.steps.load_prompts import LoadPrompts
from prefdata.steps.sample import Sample

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit."]


@dataclass
class ModelPidConfig:
    model: str = ""


class ModelPid(MapStep):
    """Loads a real (tiny) model and writes which process scored each response."""

    name = "model_pid"
    Config = ModelPidConfig
    model = None

    def models(self):
        from prefdata.models.identity import ModelRef

        return [ModelRef(self.config.model, device="cpu", dtype="float32")]

    def input_columns(self):
        return ["prompt", "response"]

    def output_columns(self, columns):
        return columns + ["pid", "logprob"]

    def setup(self):
        self.model = prefmodels.load_model(self.config.model, backend="transformers", device="cpu",
                                           dtype="float32")

    def teardown(self):
        self.model = None

    def process(self, table):
        scores = self.model.logprobs(table["prompt"].to_pylist(), table["response"].to_pylist())
        return (table.append_column("pid", pa.array([os.getpid()] * table.num_rows, pa.int64()))
                .append_column("logprob", pa.array([s.sum for s in scores], pa.float64())))


@dataclass
class NoConfig:
    pass


class Explode(MapStep):
    """Holds a "model" (no weights needed to fail) and fails on its second shard."""

    name = "explode"
    Config = NoConfig
    holds_model = True

    def input_columns(self):
        return ["prompt_id"]

    def process(self, table):
        if "Count to three." in str(table["prompt"].to_pylist()):
            raise ValueError("the prompt 'Count to three.' is not allowed here")
        return table


class KillSelf(MapStep):
    """SIGKILLs its own process at the third shard while ``flag`` exists (not config: the
    fingerprint stays the same for the rerun)."""

    name = "kill_self"
    Config = NoConfig
    holds_model = True
    flag: str | None = None

    def input_columns(self):
        return ["prompt_id"]

    def output_columns(self, columns):
        return columns + ["pid"]

    def process(self, table):
        if self.flag and Path(self.flag).exists() and "Count to three." in str(table["prompt"].to_pylist()):
            os.kill(os.getpid(), signal.SIGKILL)
        return table.append_column("pid", pa.array([os.getpid()] * table.num_rows, pa.int64()))


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    return path


def run(steps, workdir, in_process, shard_size=2):
    pipe = Pipeline(steps, workdir=workdir, shard_size=shard_size, progress=False, card=False,
                    executor=LocalExecutor(in_process=in_process))
    return pipe, pipe.run()


def test_worker_mode_matches_in_process_and_leaves_no_model(prompt_file, tmp_path, tiny_llama):
    def steps():
        return [LoadPrompts(path=str(prompt_file)),
                Sample(model=tiny_llama, n=2, max_new_tokens=4, backend="transformers", device="cpu",
                       dtype="float32"),
                ModelPid(model=tiny_llama)]

    prefmodels.clear_cache()
    inproc, a = run(steps(), tmp_path / "a", in_process=True)
    assert prefmodels._CACHE == {}  # emptied after each step in-process too
    assert set(a["pid"].to_pylist()) == {os.getpid()}
    worker, b = run(steps(), tmp_path / "b", in_process=False)
    assert prefmodels._CACHE == {}
    pids = set(b["pid"].to_pylist())
    assert len(pids) == 1 and os.getpid() not in pids  # scored in another process
    # identical sample shards and scores, whichever process computed them
    for da, db in zip(inproc.step_dirs()[1:], worker.step_dirs()[1:]):
        for i in range(2):
            ta, tb = pq.read_table(shards.shard_path(da, i)), pq.read_table(shards.shard_path(db, i))
            assert ta.drop_columns([c for c in ["pid"] if c in ta.column_names]).replace_schema_metadata(None).equals(
                tb.drop_columns([c for c in ["pid"] if c in tb.column_names]).replace_schema_metadata(None))
    assert a["response"].to_pylist() == b["response"].to_pylist() and a.num_rows == 8


def test_error_in_worker_names_step_and_carries_traceback(prompt_file, tmp_path):
    with pytest.raises(WorkerError) as info:
        run([LoadPrompts(path=str(prompt_file)), Explode()], tmp_path / "w", in_process=False)
    text = str(info.value)
    assert "step 'explode' failed in its worker process" in text
    assert "ValueError: the prompt 'Count to three.' is not allowed here" in text
    assert "traceback in the worker" in text and "in process" in text  # the worker's frames
    # the first shard (without that prompt) was finished and kept
    step_dir = next((tmp_path / "w").glob("explode-*"))
    assert shards.shard_path(step_dir, 0).exists() and not shards.shard_path(step_dir, 1).exists()


def test_sigkill_of_worker_is_reported_and_rerun_resumes(prompt_file, tmp_path):
    flag = tmp_path / "kill"
    flag.write_text("x")
    step = KillSelf()
    step.flag = str(flag)
    with pytest.raises(WorkerError, match=r"step 'kill_self': its worker process \(pid \d+\) was killed by SIGKILL"):
        run([LoadPrompts(path=str(prompt_file)), step], tmp_path / "w", in_process=False, shard_size=1)
    step_dir = next((tmp_path / "w").glob("kill_self-*"))
    done = sorted(p.name for p in step_dir.glob("shard-*.parquet"))
    assert done == ["shard-00000.parquet", "shard-00001.parquet"]
    before = {p: (p.stat().st_mtime_ns, pq.read_table(p)["pid"].to_pylist()) for p in step_dir.glob("shard-*.parquet")}
    flag.unlink()
    pipe, out = run([LoadPrompts(path=str(prompt_file)), step], tmp_path / "w", in_process=False, shard_size=1)
    assert out.num_rows == 4
    for p, (mtime, pids) in before.items():  # finished shards reused as they were
        assert p.stat().st_mtime_ns == mtime
    new_pids = set(out["pid"].to_pylist()[2:])
    old_pids = {pid for _, pids in before.values() for pid in pids}
    assert len(new_pids) == 1 and new_pids.isdisjoint(old_pids)  # a second worker did the rest
    assert pipe.stats[1].shards_cached == 2


def test_steps_without_models_and_cached_steps_start_no_worker(prompt_file, tmp_path, monkeypatch):
    import prefdata.executors.local as local

    started = []
    real = local.run_in_worker
    monkeypatch.setattr(local, "run_in_worker", lambda name, *a, **k: started.append(name) or real(name, *a, **k))
    path = tmp_path / "ok.jsonl"
    path.write_text('{"prompt": "Name a colour."}\n')
    run([LoadPrompts(path=str(path)), Explode()], tmp_path / "w", in_process=False)
    assert started == ["explode"]  # the model step got a worker; load_prompts did not
    pipe, _ = run([LoadPrompts(path=str(path)), Explode()], tmp_path / "w", in_process=False)
    assert pipe.stats[1].shards_cached == pipe.stats[1].shards == 1
    assert started == ["explode"]  # all cached: no second worker


def test_in_process_spellings(monkeypatch):
    assert make_executor("local", in_process=True).in_process is True
    monkeypatch.setenv("PREFDATA_IN_PROCESS", "1")
    assert LocalExecutor().in_process is True
    monkeypatch.delenv("PREFDATA_IN_PROCESS")
    assert LocalExecutor().in_process is False
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['isolate'\]"):
        make_executor("local", isolate=False)
    step = Explode()
    assert LocalExecutor(in_process=False).isolates(step) and not LocalExecutor(in_process=True).isolates(step)


class GlobalWithModel(GlobalStep):
    """A global step that holds a model: runs in a worker too; records where and how."""

    name = "global_model"
    Config = NoConfig
    holds_model = True

    def process(self, frame):
        import torch

        self.metadata = {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}
        return frame


def test_global_step_with_model_runs_in_worker_with_parent_thread_count(prompt_file, tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        pipe, out = run([LoadPrompts(path=str(prompt_file)), GlobalWithModel()], tmp_path / "w", in_process=False)
        meta = pipe.stats[1].metadata
        assert meta["pid"] != os.getpid()
        assert meta["torch_threads"] == torch.get_num_threads()
        assert out.num_rows == 4
    finally:
        torch.set_num_threads(before)


PARENT_SCRIPT = """
import sys
sys.path[:0] = {paths!r}
from test_worker import Sleeper, LoadPrompts, run
from pathlib import Path
if __name__ == "__main__":
    step = Sleeper()
    step.pid_file = {pid_file!r}
    run([LoadPrompts(path={prompts!r}), step], Path({workdir!r}), in_process=False)
"""


class Sleeper(MapStep):
    """Writes its pid, then sleeps: a worker whose parent will be killed."""

    name = "sleeper"
    Config = NoConfig
    holds_model = True
    pid_file: str | None = None

    def input_columns(self):
        return ["prompt_id"]

    def process(self, table):
        import time

        Path(self.pid_file).write_text(str(os.getpid()))
        time.sleep(120)
        return table


def test_worker_dies_with_its_parent(prompt_file, tmp_path):
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(paths=[str(Path(__file__).parent)] + sys.path, pid_file=str(pid_file),
                                           prompts=str(prompt_file), workdir=str(tmp_path / "w")))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert parent.poll() is None, parent.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert worker != parent.pid
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class Chatty(MapStep):
    """Logs from the worker, and shows a progress bar there."""

    name = "chatty"
    Config = NoConfig
    holds_model = True

    def input_columns(self):
        return ["prompt_id"]

    def process(self, table):
        import logging

        logging.getLogger("prefdata.test").info("hello from pid %d", os.getpid())
        logging.getLogger("httpx").info("an HTTP line that stays hidden")
        return table


def test_worker_logs_and_bars_reach_the_terminal(prompt_file, tmp_path, capfd, monkeypatch):
    import logging

    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("W %(levelname)s %(name)s: %(message)s"))
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    pipe = Pipeline([LoadPrompts(path=str(prompt_file)), Chatty()], workdir=tmp_path / "w", shard_size=2,
                    progress=True, card=False, executor=LocalExecutor(in_process=False))
    pipe.run()
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if "hello from pid" in l]
    assert len(lines) == 2 and "W INFO prefdata.test: hello from pid" in lines[0]  # after the bar's \r
    assert int(lines[0].rsplit(" ", 1)[1]) != os.getpid()
    assert "an HTTP line" not in err
    assert "chatty: 100%" in err  # the worker's progress bar
