"""rDPO takes ε from where the config says — the dataset's noise estimate by default, the
flip_prob column with per_pair — and handles pairs above rdpo_eps_max out loud."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata.train.trainer import train

from train_data import direct_logps, pair_table
from test_trainer import cfg_for, log_rows

BETA = 0.1


def rdpo(h, eps):
    a, b = np.logaddexp(0.0, -BETA * h), np.logaddexp(0.0, BETA * h)   # −log σ(βh), −log σ(−βh)
    return ((1 - eps) * a - eps * b) / (1 - 2 * eps)


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_llama_factory, tmp_path_factory):
    """8 pairs with flip_prob, the noise step's ε in the file metadata, a reference ≠ policy."""
    reference = tiny_llama_factory(1)
    flip = [0.05, 0.8, 0.1, 0.5, 0.2, 0.0, 0.3, 0.15]     # two above rdpo_eps_max = 0.45
    table = pair_table(8)
    table = table.set_column(table.column_names.index("flip_prob"), "flip_prob", pa.array(flip))
    noise = {"epsilon": 0.3, "epsilon_stderr": 0.04, "n_confident": 120, "n_pairs": 200}
    tmp_path = tmp_path_factory.mktemp("rdpo")
    path = tmp_path / "pairs.parquet"
    pq.write_table(table.replace_schema_metadata({b"prefdata_step:noise": json.dumps(noise).encode()}), path)
    policy_lp, _ = direct_logps(tiny_model, str(path))
    ref_lp, _ = direct_logps(reference, str(path))
    h = (policy_lp[:, 0] - ref_lp[:, 0]) - (policy_lp[:, 1] - ref_lp[:, 1])
    assert np.abs(BETA * h).max() > 0.05                   # the loss depends on ε

    def first_loss(name, **over):
        out = tmp_path / name
        summary = train(cfg_for(str(path), tiny_model, out, loss="rdpo", reference=reference, max_steps=1,
                                eval_fraction=0.0, batch_size=8, beta=BETA, **over))
        return log_rows(out)[-1]["loss"], summary

    return first_loss, h, np.array(flip)


def test_rdpo_reads_the_dataset_epsilon_by_default(setup, caplog):
    first_loss, h, _ = setup
    with caplog.at_level(logging.INFO):
        loss, summary = first_loss("dataset")
    assert loss == pytest.approx(rdpo(h, 0.3).mean(), rel=1e-4)
    assert summary["rdpo_eps"] == 0.3 and summary["rdpo_eps_source"] == "dataset"
    assert "rdpo: ε = 0.3000 ± 0.0400 from the dataset's noise step (120 confident pairs)" in caplog.text
    assert "before its policy" not in caplog.text            # noise ran with policy keep (the default)
    given, _ = first_loss("given", rdpo_eps=0.1)
    assert given == pytest.approx(rdpo(h, 0.1).mean(), rel=1e-4) and given != pytest.approx(loss, rel=1e-3)


def test_per_pair_flips_pairs_above_the_bound_by_default_and_says_so(setup, caplog):
    first_loss, h, p = setup
    with caplog.at_level(logging.INFO):
        loss, summary = first_loss("flip", rdpo_eps="per_pair")
    over = p > 0.45
    # flipped: h -> -h, p -> 1 - p; p = 0.5 stays above the bound and is clipped to it
    hf, pf = np.where(over, -h, h), np.minimum(np.where(over, 1 - p, p), 0.45)
    assert loss == pytest.approx(rdpo(hf, pf).mean(), rel=1e-4)
    assert summary["rdpo_pairs_over_max"] == 2 and summary["rdpo_pairs_clipped"] == 1
    assert "2 of 8 pairs have flip_prob > rdpo_eps_max = 0.45 (max 0.800)" in caplog.text
    assert "rdpo_over_max: flip (the default)" in caplog.text and "1 near 0.5" in caplog.text


def test_per_pair_drop_and_clip(setup, caplog):
    first_loss, h, p = setup
    over = p > 0.45
    with caplog.at_level(logging.INFO):
        dropped, summary = first_loss("drop", rdpo_eps="per_pair", rdpo_over_max="drop")
    assert dropped == pytest.approx(rdpo(h[~over], p[~over]).mean(), rel=1e-4)
    assert "rdpo_over_max: drop -> they are left out of training" in caplog.text
    clipped, summary = first_loss("clip", rdpo_eps="per_pair", rdpo_over_max="clip")
    assert clipped == pytest.approx(rdpo(h, np.minimum(p, 0.45)).mean(), rel=1e-4)
    assert summary["rdpo_pairs_clipped"] == 2
    assert "rdpo_over_max: clip -> their ε is set to 0.45 (their loss is scaled by 1/(1-2ε) = 10.0)" in caplog.text


def test_an_epsilon_estimated_before_a_flip_policy_is_flagged(tmp_path, caplog):
    from prefdata.train.config import config_from
    from prefdata.train.robust import from_dataset

    path = tmp_path / "flipped.parquet"
    meta = {"epsilon": 0.2, "epsilon_stderr": 0.03, "n_confident": 90, "policy": "flip"}
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"prefdata_step:noise": json.dumps(meta).encode()}),
                   path)
    with caplog.at_level(logging.WARNING):
        eps, info = from_dataset(config_from({"data": str(path), "model": "m", "loss": "rdpo"}))
    assert eps == 0.2 and info["rdpo_eps_stderr"] == 0.03
    assert "before its policy 'flip' changed the pairs" in caplog.text
