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
