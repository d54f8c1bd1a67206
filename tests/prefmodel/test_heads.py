"""Losses against their formulas, the skew-symmetric operator, and the paper's claim that a
GPM head learns cyclic preferences a BT reward cannot (synthetic features)."""

import math

import numpy as np
import pytest
import torch

from prefdata.prefmodel.features import Features
from prefdata.prefmodel.heads import (BTHead, GPMHead, bt_loss, gpm_loss, gpm_matrix, gpm_score,
                                      skew_operator)
from prefdata.prefmodel.train import PrefModelConfig, accuracy, fit_head, make_head, pair_logits
from prefdata.train.data import split_eval


def test_bt_loss_matches_formula():
    rc, rr, m = torch.tensor([1.5, -0.2]), torch.tensor([0.5, 0.3]), torch.tensor([0.25, 0.0])
    got = bt_loss(rc, rr, m, tau=0.5)
    want = [-math.log(1 / (1 + math.exp(-(1.5 - 0.5 - 0.25) / 0.5))),
            -math.log(1 / (1 + math.exp(-(-0.2 - 0.3) / 0.5)))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_gpm_score_and_loss_match_formula():
    vc = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    vr = torch.tensor([[1.2, 0.4, -0.7, 0.9]])
    lam = torch.tensor([[0.25, 0.75]])
    s = 0.25 * (0.3 * 0.4 - (-1.0) * 1.2) + 0.75 * (2.0 * 0.9 - 0.5 * (-0.7))
    assert gpm_score(vc, vr, lam).item() == pytest.approx(s, rel=1e-6)
    # the same through the explicit operator: v_c^T R^T v_r
    R = skew_operator(lam[0])
    assert (vc[0] @ R.T @ vr[0]).item() == pytest.approx(s, rel=1e-6)
    assert gpm_loss(torch.tensor([s]), tau=0.1).item() == pytest.approx(-math.log(1 / (1 + math.exp(-s / 0.1))), rel=1e-6)


def test_operator_is_skew_symmetric_and_scores_antisymmetric():
    torch.manual_seed(0)
    head = GPMHead(16, dim=8, gate=True)
    h, hp = torch.randn(5, 16), torch.randn(1, 16)
    lam = head.scales(hp, 1)[0]
    assert (lam >= 0).all() and lam.sum().item() == pytest.approx(1.0, rel=1e-6)
    R = skew_operator(lam)
    assert torch.equal(R, -R.T) and R.abs().sum() > 0
    S = gpm_matrix(head.embed(h), lam)
    assert torch.allclose(S, -S.T, atol=1e-7)
    assert torch.allclose(torch.diagonal(S), torch.zeros(5), atol=1e-7)
    a, b = head.embed(h[:1]), head.embed(h[1:2])
    assert gpm_score(a, b, lam[None]).item() == pytest.approx(-gpm_score(b, a, lam[None]).item(), abs=1e-7)
    assert abs(gpm_score(a, b, lam[None]).item()) > 1e-4


def test_odd_dimension_is_refused():
    with pytest.raises(ValueError, match="even"):
        GPMHead(16, dim=7)
    with pytest.raises(ValueError, match="odd"):
        gpm_score(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 1))


def synthetic(order: str, prompts: int = 300, d: int = 32, seed: int = 0):
    """Three responses per prompt whose features carry a type t ∈ {0, 1, 2} plus a random
    per-prompt offset and noise; preferences by type: a cycle or a chain."""
    rng = np.random.default_rng(seed)
    types = np.eye(d)[:3] * 2.0
    resp, prm, chosen, rejected, groups = [], [], [], [], []
    beats = [(0, 1), (1, 2), (2, 0)] if order == "cyclic" else [(0, 1), (1, 2), (0, 2)]
    for p in range(prompts):
        offset = np.concatenate([np.zeros(3), rng.normal(size=d - 3)])
        base = len(resp)
        for t in range(3):
            resp.append(offset + types[t] + 0.1 * rng.normal(size=d))
            prm.append(offset)
        for w, l in beats:
            chosen.append(base + w)
            rejected.append(base + l)
            groups.append(f"p{p}")
    feats = Features(torch.tensor(np.array(resp), dtype=torch.float32), torch.tensor(np.array(prm), dtype=torch.float32))
    return feats, np.array(chosen), np.array(rejected), groups


def fit(objective, feats, chosen, rejected, groups, **kw):
    cfg = PrefModelConfig(data="x", output="y", objective=objective, epochs=60, batch_size=128, **kw)
    train, held = split_eval(groups, 0.3, 10**6, 0)
    head = make_head(cfg, feats.response.shape[1])
    fit_head(head, feats, chosen, rejected, train, cfg)
    return head, accuracy(head, feats, chosen, rejected, held), held


def test_cyclic_preferences_gpm_learns_them_bt_cannot():
    data = synthetic("cyclic")
    _, gpm_acc, held = fit("gpm", *data)
    _, bt_acc, _ = fit("bt", *data)
    assert len(held) >= 200
    assert gpm_acc >= 0.95, gpm_acc
    assert bt_acc <= 0.67 + 1e-9, bt_acc


def test_transitive_preferences_both_learn_and_rankings_agree():
    feats, chosen, rejected, groups = synthetic("transitive", seed=1)
    gpm, gpm_acc, held = fit("gpm", feats, chosen, rejected, groups)
    bt, bt_acc, _ = fit("bt", feats, chosen, rejected, groups)
    assert gpm_acc >= 0.95 and bt_acc >= 0.95, (gpm_acc, bt_acc)
    agree = 0
    prompts = sorted({int(c) // 3 for c in chosen[held]})
    with torch.no_grad():
        for p in prompts:
            idx = torch.arange(3 * p, 3 * p + 3)
            rewards = bt(feats.response[idx])
            S = gpm_matrix(gpm.embed(feats.response[idx]), gpm.scales(feats.prompt[idx[:1]], 1)[0])
            gp_score = torch.sigmoid(S / 0.1).sum(1)  # mean win prob up to a constant
            agree += torch.equal(torch.argsort(rewards), torch.argsort(gp_score))
    assert agree / len(prompts) >= 0.95
