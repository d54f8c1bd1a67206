"""Two processes under `accelerate launch` (gloo on CPU) take the steps one process takes."""

import json
import os
import shutil
import subprocess

import pytest

from prefdata.train.config import config_from
import torch

from prefdata.train.distributed import Ranks, grad_buckets
from prefdata.train.trainer import train

from test_trainer import cfg_for, log_rows

SETTINGS = dict(max_steps=3, batch_size=4, micro_batch_size=1, eval_fraction=0.0, lr=2e-3)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tiny_model, pairs_file, tmp_path):
    data = pairs_file(16)
    train(cfg_for(data, tiny_model, tmp_path / "one", **SETTINGS))
    sets = [f"{k}={v}" for k, v in {**SETTINGS, "device": "cpu", "max_length": 128, "progress": "false"}.items()]
    cmd = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefdata.train.trainer",
           "--data", data, "--model", tiny_model, "--output", str(tmp_path / "two")]
    for s in sets:
        cmd += ["--set", s]
    # 50 KiB buckets: the tiny model's gradients go through many all-reduce calls, as a 7B model's would
    env = {**os.environ, "PREFDATA_ALLREDUCE_BUCKET_MB": "0.05"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [r["loss"] for r in log_rows(tmp_path / "one")]
    two = [r["loss"] for r in log_rows(tmp_path / "two")]
    assert len(one) == len(two) == 3 and one[0] != one[-1]
    assert two == pytest.approx(one, abs=1e-5)          # the updates match too: steps 2 and 3 agree
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


def test_a_launch_that_contradicts_the_recipe_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="batch_size 3 is not a multiple of the 2 launched processes"):
        Ranks(config_from({"data": "d", "model": "m", "batch_size": 3}))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="--mixed_precision bf16 conflicts with the recipe's precision: fp32"):
        Ranks(config_from({"data": "d", "model": "m", "batch_size": 4}))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP or DeepSpeed: the bundled trainer shards data, not weights"):
        Ranks(config_from({"data": "d", "model": "m", "batch_size": 4}))


def test_gradient_buckets_bound_the_extra_memory_and_keep_every_gradient_once():
    grads = [torch.zeros(n) for n in (10, 300, 20, 20, 5)] + [torch.zeros(4, dtype=torch.float64)]
    buckets = grad_buckets(grads, bucket_bytes=200)       # 50 fp32 values per bucket
    assert [[g.numel() for g in b] for b in buckets] == [[10], [300], [20, 20, 5], [4]]
    assert [id(g) for b in buckets for g in b] == [id(g) for g in grads]   # same tensors, in order
    assert all(sum(g.numel() * g.element_size() for g in b) <= 200 or len(b) == 1 for b in buckets)
    assert len({g.dtype for g in buckets[-1]}) == 1                       # dtypes never mixed
