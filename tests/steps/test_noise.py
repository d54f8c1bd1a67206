"""noise: strength / flip_prob by hand, ε recovered from synthetic labels, weak-pair policies."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from prefdata.steps.build import BuildPairs
from prefdata.steps.noise import Noise, apply_noise, NoiseConfig


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def pairs(members: dict[str, list[tuple]], extra: dict | None = None) -> pl.DataFrame:
    """members: name -> [(chosen, rejected), ...]; minimal pair columns around them."""
    n = len(next(iter(members.values())))
    cols = {
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt_id": [f"q{i}" for i in range(n)],
        "chosen": [[{"role": "assistant", "content": f"c{i}"}] for i in range(n)],
        "rejected": [[{"role": "assistant", "content": f"r{i}"}] for i in range(n)],
        "chosen_id": [f"c{i}" for i in range(n)],
        "rejected_id": [f"r{i}" for i in range(n)],
        "score_chosen": [1.0] * n,
        "score_rejected": [0.0] * n,
        "margin": [1.0] * n,
    }
    for name, values in members.items():
        cols[f"{name}_chosen"] = [v[0] for v in values]
        cols[f"{name}_rejected"] = [v[1] for v in values]
    cols.update(extra or {})
    return pl.DataFrame(cols)


def run(df: pl.DataFrame, **kw):
    out, meta = apply_noise(df.lazy(), NoiseConfig(**kw))
    return pl.from_arrow(out.table), out, meta


def test_strength_std_and_flip_prob_by_hand():
    df = pairs({
        "score_a": [(2.0, 1.0), (3.0, 1.0), (0.0, 1.0), (2.0, 1.0)],
        "score_b": [(1.0, 2.0), (3.0, 1.0), (0.0, 1.0), (None, 0.0)],
        "score_c": [(3.0, 0.0), (3.0, 1.0), (0.0, 1.0), (3.0, 0.0)],
    })
    got, _, _ = run(df)
    # pair 0: d = (1, -1, 3): mean 1, population std sqrt(8/3), P(D < 0) = Phi(-1 / sqrt(8/3))
    assert got["strength"].to_list() == pytest.approx([1.0, 2.0, -1.0, 2.0])
    assert got["strength_std"].to_list() == pytest.approx([math.sqrt(8 / 3), 0.0, 0.0, 1.0])
    assert got["flip_prob"].to_list() == pytest.approx(
        [phi(-1 / math.sqrt(8 / 3)), 0.0, 1.0, phi(-2.0)], abs=2e-7)
    # with enough members the share of disagreeing members is used (a tie counts half)
    df = pairs({"score_a": [(2.0, 1.0), (1.0, 1.0)], "score_b": [(1.0, 2.0), (2.0, 1.0)],
                "score_c": [(3.0, 0.0), (2.0, 1.0)]})
    got, _, _ = run(df, empirical_min_members=3)
    assert got["flip_prob"].to_list() == pytest.approx([1 / 3, 1 / 6])


def test_a_scorer_with_its_own_uncertainty():
    one = pairs({"score_rm": [(1.0, 0.0)], "score_rm_std": [(0.3, 0.4)]})
    got, _, meta = run(one)
    assert meta["members"] == ["score_rm"]  # the _std columns are not a member
    assert got["strength_std"][0] == pytest.approx(0.5)
    assert got["flip_prob"][0] == pytest.approx(phi(-2.0), abs=2e-7)
    two = pairs({"score_rm": [(1.0, 0.0)], "score_rm_std": [(0.3, 0.4)], "score_j": [(0.0, 1.0)]})
    got, _, _ = run(two)
    assert got["strength"][0] == pytest.approx(0.0)
    assert got["strength_std"][0] == pytest.approx(math.sqrt(1.0 + 0.25 / 2))  # between + mean own variance


def synthetic(eps: float, n: int = 20000, k: int = 3, noise: float = 0.5, seed: int = 0) -> pl.DataFrame:
    """The rDPO noise model: true margins m > 0, each label flipped with prob eps
    independently of m, members measure the labelled difference with N(0, noise^2) error."""
    rng = np.random.default_rng(seed)
    m = rng.exponential(1.0, n)
    sign = np.where(rng.random(n) < eps, -1.0, 1.0)
    base = rng.normal(size=n)
    members = {}
    for j in range(k):
        d = sign * m + rng.normal(0.0, noise, n)
        members[f"score_m{j}"] = list(zip(base + d, base))
    return pairs(members)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.35])
def test_flip_rate_is_recovered_within_two_points(eps):
    _, _, meta = run(synthetic(eps))
    assert meta["epsilon"] == pytest.approx(eps, abs=0.02)
    assert meta["n_confident"] > 5000 and meta["epsilon_stderr"] < 0.01
    # the naive estimate (mean flip_prob) counts member noise on small true margins as flips
    assert meta["mean_flip_prob"] - eps > 0.03


def test_flip_rate_with_per_pair_standard_errors():
    _, _, meta = run(synthetic(0.15, k=10, seed=1), se="per_pair")
    assert meta["epsilon"] == pytest.approx(0.15, abs=0.02) and meta["se"] == "per_pair"


def test_keep_and_carry_annotate_every_pair_and_record_the_loss_epsilon():
    df = synthetic(0.2, n=500)
    kept, out, meta = run(df)
    assert kept.height == 500 and out.quarantine is None
    assert {"strength", "strength_std", "flip_prob", "flipped"} <= set(kept.columns)
    assert meta["loss_epsilon"] == meta["epsilon"] and meta["policy"] == "keep"
    _, _, meta = run(df, policy="carry")
    assert meta["loss_epsilon"] == "flip_prob"


def test_drop_quarantines_weak_pairs_with_reasons():
    df = pairs({"score_a": [(2.0, 1.0), (1.0, 2.0), (1.2, 1.0), (None, 1.0)],
                "score_b": [(2.0, 1.0), (1.0, 2.0), (1.2, 1.0), (None, 1.0)]})
    kept, out, meta = run(df, policy="drop", min_strength=0.5)
    assert kept["pair_id"].to_list() == ["p0"]
    q = {r["pair_id"]: r["reason"] for r in out.quarantine.to_pylist()}
    assert q == {"p1": "weak pair: strength < 0.5", "p2": "weak pair: strength < 0.5", "p3": "no member scores"}
    assert out.counts["dropped_weak"] == 3 and meta["dropped_weak"] == 3
    kept, out, _ = run(df, policy="drop", max_flip_prob=0.5)
    assert kept["pair_id"].to_list() == ["p0", "p2"]


def test_flip_swaps_every_side_and_keeps_the_pair_id():
    df = pairs({"score_a": [(2.0, 1.0), (0.0, 3.0)], "score_b": [(2.0, 1.0), (1.0, 2.0)]},
               extra={"ches": [0.1, 0.2], "rationale": ["why", "why not"]})
    got, out, meta = run(df, policy="flip")
    ok, flipped = got.row(0, named=True), got.row(1, named=True)
    assert ok["flipped"] is False and ok["chosen_id"] == "c0" and ok["ches"] == 0.1
    assert flipped["flipped"] is True and flipped["pair_id"] == "p1"
    assert (flipped["chosen_id"], flipped["rejected_id"]) == ("r1", "c1")
    assert flipped["chosen"][0]["content"] == "r1" and flipped["rejected"][0]["content"] == "c1"
    assert (flipped["score_chosen"], flipped["score_rejected"], flipped["margin"]) == (0.0, 1.0, -1.0)
    assert (flipped["score_a_chosen"], flipped["score_a_rejected"]) == (3.0, 0.0)
    assert flipped["strength"] == pytest.approx(2.0) and flipped["flip_prob"] == pytest.approx(phi(-2.0), abs=1e-6)
    assert flipped["ches"] is None and flipped["rationale"] is None
    assert out.counts == {"flipped": 1} and meta["flipped"] == 1


def test_noise_after_build_pairs_and_as_a_step():
    responses = pa.table({
        "prompt_id": ["a", "a", "a"], "prompt": [[{"role": "user", "content": "q"}]] * 3,
        "response_id": ["a1", "a2", "a3"], "response": ["x", "y", "z"],
        "score_cdr": [3.0, 2.0, 1.0], "score_rm": [0.0, 1.0, 2.0], "score_judge": [5.0, 4.0, 1.0],
    })
    built = BuildPairs(strategy="all_pairs").process(responses).table
    step = Noise(members=["score_rm", "score_judge"], policy="flip")
    out = step.process(pl.from_arrow(built).lazy())
    got = {(r["chosen_id"], r["rejected_id"]): r for r in out.table.to_pylist()}
    # a1 vs a3: rm says -2, judge +4 -> strength 1; a1 vs a2: rm -1, judge +1 -> 0, not flipped
    assert got[("a1", "a3")]["strength"] == pytest.approx(1.0)
    assert got[("a1", "a2")]["flipped"] is False
    assert step.metadata["members"] == ["score_rm", "score_judge"] and "epsilon" in step.metadata
    with pytest.raises(ValueError, match="not in the pair table"):
        Noise(members=["score_missing"]).process(pl.from_arrow(built).lazy())


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="needs min_strength"):
        Noise(policy="drop")
    with pytest.raises(ValueError, match="policy must be one of"):
        Noise(policy="ignore")
    with pytest.raises(ValueError, match="only apply with policy 'drop'"):
        Noise(policy="keep", min_strength=0.1)
    with pytest.raises(ValueError, match="no ensemble members"):
        run(pairs({"margin_x": [(1.0, 0.0)]}))
