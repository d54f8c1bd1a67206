"""Each loss equals its formula, written out here on fixed numbers."""

import math

import pytest
import torch

from prefdata.train import losses
from prefdata.train.config import TrainConfig

C = torch.tensor([-10.0, -20.0, -5.0])     # log π(chosen), summed over tokens
R = torch.tensor([-12.0, -18.0, -9.0])     # log π(rejected)
RC = torch.tensor([-11.0, -19.0, -6.0])    # reference
RR = torch.tensor([-11.5, -19.0, -8.0])
NC = torch.tensor([5.0, 10.0, 2.0])        # token counts
NR = torch.tensor([6.0, 9.0, 3.0])
BETA = 0.1


def logsig(x):
    return -math.log1p(math.exp(-x))


def h(i):
    return (C[i].item() - RC[i].item()) - (R[i].item() - RR[i].item())


def check(got, expected):
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dpo():
    check(losses.dpo_loss(C, R, RC, RR, BETA), [-logsig(BETA * h(i)) for i in range(3)])


def test_rpo_adds_chosen_nll_token_mean():
    alpha = 0.5
    expected = [-logsig(BETA * h(i)) + alpha * (-C[i].item() / NC[i].item()) for i in range(3)]
    check(losses.rpo_loss(C, R, RC, RR, NC, BETA, alpha), expected)


def test_rdpo_global_eps():
    e = 0.2
    expected = [((1 - e) * -logsig(BETA * h(i)) - e * -logsig(-BETA * h(i))) / (1 - 2 * e) for i in range(3)]
    check(losses.rdpo_loss(C, R, RC, RR, BETA, e), expected)


def test_rdpo_per_pair_eps_is_clipped_below_half():
    eps = torch.tensor([0.0, 0.3, 0.9])    # 0.9 is clipped to eps_max
    clipped = [0.0, 0.3, 0.45]
    expected = [((1 - e) * -logsig(BETA * h(i)) - e * -logsig(-BETA * h(i))) / (1 - 2 * e)
                for i, e in enumerate(clipped)]
    check(losses.rdpo_loss(C, R, RC, RR, BETA, eps, eps_max=0.45), expected)
    check(losses.rdpo_loss(C, R, RC, RR, BETA, 0.0), losses.dpo_loss(C, R, RC, RR, BETA).tolist())


def test_cdpo():
    e = 0.1
    expected = [(1 - e) * -logsig(BETA * h(i)) + e * -logsig(-BETA * h(i)) for i in range(3)]
    check(losses.cdpo_loss(C, R, RC, RR, BETA, e), expected)


def test_ipo():
    tau = 0.5
    check(losses.ipo_loss(C, R, RC, RR, tau), [(h(i) - 1 / (2 * tau)) ** 2 for i in range(3)])


def test_simpo():
    b, g = 2.0, 0.5
    expected = [-logsig(b * C[i].item() / NC[i].item() - b * R[i].item() / NR[i].item() - g) for i in range(3)]
    check(losses.simpo_loss(C, R, NC, NR, b, g), expected)


def test_pro_with_scores_and_padding():
    logps = torch.tensor([[-4.0, -9.0, -8.0], [-3.0, -6.0, 0.0]])
    n = torch.tensor([[2.0, 3.0, 4.0], [3.0, 2.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([[3.0, 2.0, 0.5], [1.0, 0.0, 0.0]])
    w = 0.05
    # list 0: r = [-2, -3, -2]
    r = [-2.0, -3.0, -2.0]
    s = scores[0].tolist()
    k0 = [s[0] - s[1], s[0] - s[2]]                  # 1/T for i > 0: 1.0, 2.5
    z0 = [r[0] * max(k0), r[1] * k0[0], r[2] * k0[1]]
    t0 = -(z0[0] - math.log(sum(math.exp(z) for z in z0)))
    k1 = [s[1] - s[2]]                               # 1.5
    z1 = [r[1] * k1[0], r[2] * k1[0]]
    t1 = -(z1[0] - math.log(sum(math.exp(z) for z in z1)))
    loss0 = t0 + t1 + w * (4.0 / 2.0)
    # list 1: two responses, r = [-1, -3], 1/T = 1
    loss1 = -(-1.0 - math.log(math.exp(-1.0) + math.exp(-3.0))) + w * (3.0 / 3.0)
    check(losses.pro_loss(logps, n, valid, scores, w), [loss0, loss1])


def test_pro_without_scores_is_plackett_luce_on_mean_logps():
    logps = torch.tensor([[-2.0, -4.0]])
    n = torch.tensor([[1.0, 2.0]])
    expected = -(-2.0 - math.log(math.exp(-2.0) + math.exp(-2.0))) + 0.0
    check(losses.pro_loss(logps, n, torch.ones(1, 2, dtype=torch.bool), None, 0.0), [expected])


def test_compute_loss_dispatch_uses_config():
    cfg = TrainConfig(data="x", model="y", loss="rdpo", beta=0.2, rdpo_eps="per_pair")
    logps, ref = torch.stack([C, R], 1), torch.stack([RC, RR], 1)
    n = torch.stack([NC, NR], 1)
    flip = torch.tensor([0.1, 0.2, 0.3])
    got = losses.compute_loss(cfg, logps, n, n > 0, ref, None, flip)
    check(got, losses.rdpo_loss(C, R, RC, RR, 0.2, flip).tolist())
    # one ε resolved at start (the dataset's) wins over the column
    got = losses.compute_loss(cfg, logps, n, n > 0, ref, None, flip, rdpo_eps=0.25)
    e = 0.25
    check(got, [((1 - e) * -logsig(0.2 * h(i)) - e * -logsig(-0.2 * h(i))) / (1 - 2 * e) for i in range(3)])
    with pytest.raises(ValueError, match="no ε"):
        losses.compute_loss(cfg, logps, n, n > 0, ref, None, None)
    cfg.loss = "simpo"
    check(losses.compute_loss(cfg, logps, n, n > 0), losses.simpo_loss(C, R, NC, NR, 2.0, 0.5).tolist())
