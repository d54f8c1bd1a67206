"""prefdata train-rm and eval-rm through the real command line."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from prefdata.cli import main


def test_train_rm_then_eval_rm_per_source(tmp_path, make_pairs, tiny_llama, capsys):
    data = make_pairs(tmp_path / "pairs.parquet")
    for objective in ("bt", "gpm"):
        rc = main(["train-rm", "--data", data, "--model", tiny_llama, "--objective", objective,
                   "--output", str(tmp_path / objective), "--set", "epochs=30", "--set", "batch_size=8",
                   "--set", "progress=false", "--set", "dim=4"] if objective == "gpm" else
                  ["train-rm", "--data", data, "--model", tiny_llama, "--objective", objective,
                   "--output", str(tmp_path / objective), "--set", "epochs=30", "--set", "batch_size=8",
                   "--set", "progress=false"])
        assert rc == 0
    capsys.readouterr()
    for objective in ("bt", "gpm"):
        report = tmp_path / f"{objective}.json"
        assert main(["eval-rm", str(tmp_path / objective), data, "--json", str(report)]) == 0
        out = capsys.readouterr().out
        r = json.loads(report.read_text())
        assert r["kind"] == ("reward" if objective == "bt" else "gpm") and r["pairs"] == 16
        assert set(r["by_group"]) == {"a", "b"} and r["by_group"]["a"]["pairs"] == 8
        # overall accuracy is the pair-weighted mean of the groups
        assert r["accuracy"] == pytest.approx(np.mean([g["accuracy"] for g in r["by_group"].values()]))
        assert r["accuracy"] >= 0.75  # the long answer always wins; mostly training prompts
        assert f"accuracy {r['accuracy']:.4f}" in out and "  a: 8 pairs" in out


def test_train_rm_errors_name_the_file_and_column(tmp_path, make_pairs, capsys):
    path = tmp_path / "pairs.parquet"
    make_pairs(path)
    pq.write_table(pq.read_table(path).drop_columns(["chosen"]), path)
    rc = main(["train-rm", "--data", str(path), "--model", "x", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.parquet: missing column(s) ['chosen']" in err and "Traceback" not in err
    rc = main(["train-rm", "--data", str(path), "--output", str(tmp_path / "o"), "--set", "dim=3"])
    assert rc == 2 and "dim (the GPM embedding dimension 2k) must be even" in capsys.readouterr().err
    rc = main(["eval-rm", str(tmp_path / "nothing"), str(path)])
    assert rc == 2 and "missing column(s) ['chosen']" in capsys.readouterr().err
