"""win_rates (SPPO's P̂(y ≻ π_t | x)) on literal tables, and the SPPO loss on fixed tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from prefdata.steps.win_rates import WinRates
from prefdata.train.losses import compute_loss, sppo_loss


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def table(scores: list, prompts: list[str]) -> pa.Table:
    return pa.table({"prompt_id": prompts, "response_id": [f"r{i}" for i in range(len(scores))],
                     "score_cdr": pa.array(scores, pa.float64())})


def test_win_prob_is_mean_sigmoid_over_the_prompts_other_samples():
    out = WinRates(score="score_cdr").process(table([2.0, 0.0, -1.0, 5.0, 1.0], ["a", "a", "a", "b", "b"]))
    got = out.table.column("win_prob").to_pylist()
    want = [(sig(2) + sig(3)) / 2, (sig(-2) + sig(1)) / 2, (sig(-3) + sig(-1)) / 2, sig(4), sig(-4)]
    assert got == pytest.approx(want, abs=1e-12)
    # the prompt's probabilities are those of a symmetric game: they average to 1/2
    assert sum(got[:3]) / 3 == pytest.approx(0.5)
    assert out.table.column("response_id").to_pylist() == ["r0", "r1", "r2", "r3", "r4"]


def test_scale_divides_the_score_difference():
    out = WinRates(score="score_cdr", scale=2.0).process(table([2.0, 0.0], ["a", "a"]))
    assert out.table.column("win_prob").to_pylist() == pytest.approx([sig(1), sig(-1)])


def test_unscored_rows_and_lonely_prompts_get_null_and_are_counted():
    out = WinRates(score="score_cdr").process(table([1.0, None, 0.0, 3.0], ["a", "a", "a", "b"]))
    assert out.table.column("win_prob").to_pylist() == pytest.approx([sig(1), None, sig(-1), None])
    assert out.counts == {"unscored": 1, "no_opponent": 1}


def test_bad_options_are_refused_naming_them():
    with pytest.raises(ValueError, match="scale"):
        WinRates(scale=0)
    with pytest.raises(ValueError, match="score_<name>"):
        WinRates(score="win_prob")


def test_sppo_loss_regresses_the_log_ratio_on_eta_times_the_advantage():
    logps = torch.tensor([[-10.0, -12.0, -9.0]])
    ref = torch.tensor([[-11.0, -11.0, -11.0]])
    p = torch.tensor([[0.8, 0.3, 0.5]])
    valid = torch.tensor([[True, True, False]])
    got = sppo_loss(logps, ref, p, valid, eta=5.0)
    want = ((1.0 - 5.0 * 0.3) ** 2 + (-1.0 - 5.0 * -0.2) ** 2) / 2  # the padded third response is left out
    assert got.item() == pytest.approx(want)
    # zero exactly when each log-ratio equals eta (P - 1/2)
    exact = ref + 5.0 * (p - 0.5)
    assert sppo_loss(exact, ref, p, valid, eta=5.0).item() == pytest.approx(0.0, abs=1e-12)


def test_sppo_loss_refuses_scores_that_are_not_probabilities():
    cfg = SimpleNamespace(loss="sppo", sppo_eta=1.0)
    logps = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="win_prob"):
        compute_loss(cfg, logps, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), logps,
                     scores=torch.tensor([[2.5, -1.0]]))
    with pytest.raises(ValueError, match="win_rates"):
        compute_loss(cfg, logps, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), logps, scores=None)
