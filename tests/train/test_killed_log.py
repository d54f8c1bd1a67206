"""A run killed while it appends to ``log.jsonl`` leaves a line cut short; the resume (and
the train step's report, which reads the log) must go on, not fail on that line."""

import json

from prefdata.train.config import config_from
from prefdata.train.trainer import read_log, train


def test_resume_after_a_kill_mid_log_line(tiny_model, pairs_file, tmp_path):
    out = tmp_path / "run"
    values = dict(data=pairs_file(12), model=tiny_model, output=str(out), max_steps=3, save_every=1, batch_size=2,
                  micro_batch_size=2, eval_fraction=0.0, device="cpu", max_length=128, lr=1e-3)
    train(config_from(values), stop_after=2)
    with open(out / "log.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 0.69')  # the kill landed inside this write
    summary = train(config_from(values), resume=True)
    assert summary["step"] == 3
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # every line whole again
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3]
