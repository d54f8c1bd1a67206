"""End to end on the packaged SmolLM2: a real run, a SIGKILL and resume, a config change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "quickstart.yaml"
PROMPTS = ROOT / "pipelines" / "data" / "quickstart_prompts.jsonl"
FAST = ["--limit", "3", "--set", "shard_size=1", "--set", "sample.n=3", "--set", "sample.max_new_tokens=24",
        "--set", f"load_prompts.path={PROMPTS}"]

pytestmark = pytest.mark.slow


def prefdata(tmp: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prefdata.cli", "run", str(RECIPE), "--no-progress",
           "--workdir", str(tmp / "work"), "--output", str(tmp / "out" / "pairs.parquet"), *FAST, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600, **kw)


def rows(path: Path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["pair_id"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    proc = prefdata(tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp


def test_three_prompts_end_to_end(reference):
    out = reference / "out" / "pairs.parquet"
    table = pq.read_table(out)
    for column in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "pair_id"):
        assert column in table.column_names
    assert 1 <= table.num_rows <= 3
    ds = load_dataset("parquet", data_files=str(out), split="train")
    first = ds[0]
    assert first["prompt"][-1]["role"] == "user"
    assert first["chosen"][0]["role"] == "assistant" and first["chosen"][0]["content"].strip()
    assert first["chosen"] != first["rejected"]
    assert all(m > 0 for m in table["margin"].to_pylist())
    samples = list((reference / "work").glob("sample-*/shard-*.parquet"))
    assert len(samples) == 3 and all(pq.read_table(p).num_rows == 3 for p in samples)


def test_rerun_hits_cache_and_loads_no_model(reference):
    start = time.perf_counter()
    proc = prefdata(reference, "-v" if False else "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "converting" not in proc.stderr and "Loading weights" not in proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith(("sample ", "score_cdr ", "build_pairs ")):
            assert " 3/3 " in line, line
    assert time.perf_counter() - start < 60


def test_sigkill_mid_run_then_resume_gives_identical_rows(reference, tmp_path):
    cmd = [sys.executable, "-m", "prefdata.cli", "run", str(RECIPE), "--no-progress",
           "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "out" / "pairs.parquet"), *FAST]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "work").glob("sample-*/shard-00000.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((tmp_path / "work").glob("sample-*/shard-*.parquet"))
    assert 1 <= len(done) < 3, "the kill should land while sampling is in progress"
    assert not (tmp_path / "out" / "pairs.parquet").exists()
    resumed = prefdata(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    sample_line = next(l for l in resumed.stdout.splitlines() if l.startswith("sample "))
    assert f" {len(done)}/3 " in sample_line  # finished shards were reused, not redone
    assert rows(tmp_path / "out" / "pairs.parquet") == rows(reference / "out" / "pairs.parquet")
    assert not list((tmp_path / "work").rglob("*.tmp"))


def test_changing_one_step_recomputes_only_it_and_later(reference, tmp_path):
    import shutil

    shutil.copytree(reference / "work", tmp_path / "work")
    proc = prefdata(tmp_path, "--set", "build_pairs.strategy=best_vs_worst")
    assert proc.returncode == 0, proc.stderr
    lines = {l.split()[0]: l for l in proc.stdout.splitlines() if l[:1].isalpha() and len(l.split()) > 4}
    assert " 3/3 " in lines["sample"] and " 3/3 " in lines["score_cdr"]
    assert " 0/3 " in lines["build_pairs"]
    out = pq.read_table(tmp_path / "out" / "pairs.parquet")
    assert set(out["pair_strategy"].to_pylist()) == {"best_vs_worst"}
