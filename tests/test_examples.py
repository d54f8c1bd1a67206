"""The examples run at tiny scale and produce what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_build_and_train(tmp_path):
    stdout = run("build_and_train.py", "--out", str(tmp_path / "ex"), "--limit", "3", "--n", "3",
                 "--max-new-tokens", "16", "--steps", "2", cwd=tmp_path)
    pairs = pq.read_table(tmp_path / "ex" / "pairs.parquet")
    assert pairs.num_rows >= 1
    assert (tmp_path / "ex" / "model" / "model.safetensors").is_file()
    assert "trained model reloads: LlamaForCausalLM" in stdout


def test_rescore_existing_pairs(tmp_path):
    stdout = run("rescore_existing_pairs.py", "--out", str(tmp_path / "rs"), "--limit", "4", cwd=tmp_path)
    pairs = pq.read_table(tmp_path / "rs" / "pairs.parquet")
    assert pairs.num_rows == 4
    assert set(pairs["label_source"].to_pylist()) == {"original"}
    assert "CDR agrees with the original label on" in stdout
