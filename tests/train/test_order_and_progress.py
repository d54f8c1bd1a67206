"""Curriculum order is trained as written; the long loops show progress; logging like `run`."""

import subprocess
import sys

import numpy as np
import pyarrow as pa

from prefdata.train.data import curriculum_batches
from prefdata.train.trainer import train

from train_data import pair_table
from test_trainer import cfg_for, log_rows


def test_curriculum_batches_follow_iterations_then_order():
    iteration = np.array([1, 0, 2, 0, 1, 2, 0, 1])
    order = np.array([4, 1, 7, 0, 3, 6, 2, 5])
    batches = curriculum_batches(np.arange(8), iteration, order, 2, seed=0, epoch=0)
    flat = np.concatenate(batches)
    assert flat.tolist() == [3, 1, 6, 4, 0, 7, 5, 2]          # by curriculum_order, iteration by iteration
    assert all(len(set(iteration[b])) == 1 for b in batches)  # a batch never mixes iterations
    shuffled = curriculum_batches(np.arange(8), iteration, order, 2, seed=0, epoch=0, shuffle_within=True)
    assert [iteration[b[0]] for b in shuffled] == [0, 0, 1, 1, 2] and sorted(np.concatenate(shuffled)) == list(range(8))


def test_the_trainer_trains_a_curriculum_in_its_order(tiny_model, pairs_file, tmp_path):
    t = pair_table(12)
    rng = np.random.default_rng(0)
    iteration = np.repeat([2, 0, 1], 4)[rng.permutation(12)]
    t = t.append_column("iteration", pa.array(iteration)).append_column("curriculum_order", pa.array(np.argsort(np.argsort(iteration, kind="stable"))))
    out = tmp_path / "run"
    train(cfg_for(pairs_file(table=t), tiny_model, out, max_steps=6, batch_size=2, micro_batch_size=2,
                  eval_fraction=0.0))
    assert [r["iteration"] for r in log_rows(out)] == [0, 0, 1, 1, 2, 2]


def test_progress_bars_and_logging_like_run(tiny_model, pairs_file, tmp_path):
    data = pairs_file(6)
    cmd = [sys.executable, "-m", "prefdata.cli", "train", "--data", data, "--model", tiny_model, "--output",
           str(tmp_path / "run"), "--set", "max_steps=2", "--set", "device=cpu", "--set", "eval_fraction=0.0",
           "--set", "max_length=128"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "reference log-probs: 100%" in err and "6/6" in err          # the reference pass, with a bar
    assert "train: 100%" in err and "2/2" in err                         # the steps, with a bar
    assert " INFO prefdata.train: data: 6 pairs" in err                  # run's format: time level name: msg
