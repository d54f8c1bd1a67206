"""GPO = SPPO's squared loss with GPM general preference scores as targets, on fixed tensors."""

import pytest
import torch

from prefdata.train.losses import gpo_loss


def test_gpo_loss_matches_formula():
    logps = torch.tensor([[-10.0, -12.0, -11.0]])
    ref = torch.tensor([[-10.5, -11.0, -11.0]])
    p = torch.tensor([[0.7, 0.2, 0.6]])
    valid = torch.tensor([[True, True, False]])
    eta = 4.0
    want = (((0.5 - 4.0 * 0.2) ** 2) + ((-1.0 - 4.0 * (-0.3)) ** 2)) / 2
    assert gpo_loss(logps, ref, p, valid, eta).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gpo_loss(logps, ref, torch.tensor([[1.5, 0.2, 0.6]]), valid, eta)


def test_trainer_dispatches_gpo_to_the_gpm_targets():
    """``loss: gpo`` in a TrainConfig reaches gpo_loss with the pairs' scores as targets."""
    from types import SimpleNamespace

    from prefdata.train.config import TrainConfig
    from prefdata.train.losses import LOSSES, compute_loss

    assert "gpo" in LOSSES
    TrainConfig(data="d.parquet", model="m", loss="gpo", output="o")  # accepted by the config
    cfg = SimpleNamespace(loss="gpo", sppo_eta=4.0)
    logps = torch.tensor([[-10.0, -12.0]])
    ref = torch.tensor([[-10.5, -11.0]])
    scores = torch.tensor([[0.7, 0.2]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    got = compute_loss(cfg, logps, torch.ones(1, 2), valid, ref, scores=scores)
    want = ((0.5 - 4.0 * 0.2) ** 2 + (-1.0 - 4.0 * (-0.3)) ** 2) / 2
    assert got.reshape(-1)[0].item() == pytest.approx(want, rel=1e-6)


def test_gpo_train_step_needs_score_gpm_pairs():
    """A recipe's train step with loss: gpo refuses, before any work, pairs not ranked by score_gpm."""
    from prefdata.steps.build import BuildPairs
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.train import Train, check_win_prob

    steps = [LoadPrompts(path="p.jsonl"), BuildPairs(score="score_cdr"),
             Train(model="m", loss="gpo")]
    with pytest.raises(ValueError, match=r"loss: gpo reads each response's score_gpm"):
        check_win_prob(steps)
