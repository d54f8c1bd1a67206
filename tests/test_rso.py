"""RSO (Liu et al. 2024): accepted samples follow π_sft·exp(r/β), by the paper's Algorithm 1."""

import numpy as np
import pytest

from prefdata.rso import rso_accept, rso_accepted, rso_pairs

P_SFT = np.array([0.35, 0.25, 0.2, 0.15, 0.05])
REWARD = np.array([-1.0, 0.0, 0.5, 1.5, 2.0])
CHI2_999 = {4: 18.467}  # upper 0.1% point of χ² with 4 degrees of freedom


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def accepted_counts(beta: float, trials: int, n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(P_SFT))
    for _ in range(trials):
        y = rng.choice(len(P_SFT), size=n, p=P_SFT)  # N samples from π_sft
        counts[y[rso_accept(REWARD[y], 1, beta, rng)]] += 1
    return counts


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_accepted_samples_follow_the_optimal_policy(beta):
    counts = accepted_counts(beta, trials=8_000)
    target = P_SFT * np.exp(REWARD / beta)
    target /= target.sum()
    # within sampling error: χ² of 8k draws against π* below its 0.1% point (4 dof) …
    assert chi2(counts, target) < CHI2_999[4]
    # … and each share within 4 binomial standard errors
    share = counts / counts.sum()
    assert np.all(np.abs(share - target) < 4 * np.sqrt(target * (1 - target) / counts.sum()))
    # the test can fail: the same draws are far from π_sft itself
    assert chi2(counts, P_SFT) > 10 * CHI2_999[4]


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_all_prompts_at_once_follow_the_optimal_policy(beta):
    """The vectorised form (hash-derived draws, every prompt of a shard in one pass) too."""
    from prefdata.pairs import hash64

    runs, n = 8_000, 64
    rng = np.random.default_rng(5)
    y = rng.choice(len(P_SFT), size=runs * n, p=P_SFT)
    head = np.arange(runs) * n
    ids = hash64(np.char.add("r", np.arange(runs * n).astype(str)))
    picked = rso_accepted(REWARD[y], ids, head, head + n, hash64(np.arange(runs).astype(str)), beta, 1, seed=0)
    assert len(picked) == runs and np.array_equal(picked // n, np.arange(runs))  # one per prompt, in order
    counts = np.bincount(y[picked], minlength=len(P_SFT)).astype(float)
    target = P_SFT * np.exp(REWARD / beta)
    target /= target.sum()
    assert chi2(counts, target) < CHI2_999[4]
    assert chi2(counts, P_SFT) > 10 * CHI2_999[4]
    four = rso_accepted(REWARD[y], ids, head, head + n, hash64(np.arange(runs).astype(str)), beta, 4, seed=0)
    assert len(four) == 4 * runs and len(np.unique(four)) == 4 * runs  # without replacement


def test_without_replacement_until_enough_are_accepted():
    rng = np.random.default_rng(1)
    rewards = np.array([0.0, -50.0, -60.0, -70.0])  # three candidates almost never pass a round
    got = rso_accept(rewards, 4, beta=1.0, rng=rng)
    assert sorted(got.tolist()) == [0, 1, 2, 3] and got[0] == 0  # each round's envelope is accepted
    assert len(rso_accept(rewards, 10, beta=1.0, rng=rng)) == 4  # never more than the candidates
    assert len(set(rso_accept(np.zeros(8), 5, 1.0, rng).tolist())) == 5
    # a large β accepts nearly everything in the first round, in visit order
    assert rso_accept(np.array([0.0, 0.1, 0.2]), 2, beta=1e9, rng=rng).tolist() == [0, 1]


def test_pairs_consecutive_accepted_higher_chosen_and_seeded_per_prompt():
    s = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.7])
    r = np.arange(7, dtype=np.uint64)[::-1].copy()
    t = np.arange(7)
    head, end = np.array([0, 4]), np.array([4, 7])
    c, j = rso_pairs(s, r, t, head, end, np.array([11, 12], np.uint64), beta=100.0, pairs_per_prompt=2, seed=0)
    assert np.all(s[c] > s[j]) and len(c) >= 2
    assert set(c[:2].tolist()) | set(j[:2].tolist()) == {0, 1, 2, 3}  # prompt 1: all four, in two pairs
    again = rso_pairs(s, r, t, head, end, np.array([11, 12], np.uint64), beta=100.0, pairs_per_prompt=2, seed=0)
    assert [a.tolist() for a in again] == [c.tolist(), j.tolist()]
    alone = rso_pairs(s[:4], r[:4], t[:4], head[:1], end[:1], np.array([11], np.uint64), 100.0, 2, 0)
    assert [a.tolist() for a in alone] == [c[:2].tolist(), j[:2].tolist()]  # other prompts change nothing


def test_beta_must_be_positive():
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"'rso_beta' .* must be > 0"):
            rso_accept(np.zeros(3), 1, beta, np.random.default_rng(0))


# -- build_pairs strategy rso and Bradley–Terry soft labels -------------------------------------
def responses(n_prompts=3, n=6, seed=0):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    rows = [(p, k) for p in range(n_prompts) for k in range(n)]
    return pa.table({
        "prompt_id": [f"p{p}" for p, _ in rows],
        "prompt": [[{"role": "user", "content": f"q{p}"}] for p, _ in rows],
        "response_id": [f"r{p}-{k}" for p, k in rows],
        "response": [f"answer {p}/{k}" for p, k in rows],
        "score_x": rng.normal(size=len(rows)).round(3).tolist(),
    })


def test_build_pairs_rso_with_soft_labels():
    import pyarrow as pa

    from prefdata.steps.build import BuildPairs

    table = responses()
    step = BuildPairs(score="score_x", strategy="rso", rso_beta=0.5, pairs_per_prompt=2, label_prob=True, seed=3)
    out = step.process(table)
    pairs = out.table.to_pydict()
    assert out.counts["pairs"] == len(pairs["pair_id"]) == 6  # 2 pairs from 4 accepted samples per prompt
    assert set(pairs["pair_strategy"]) == {"rso"} and all(m > 0 for m in pairs["margin"])
    for p in ("p0", "p1", "p2"):  # the 4 accepted samples are distinct
        ids = [i for k, i in enumerate(pairs["chosen_id"] + pairs["rejected_id"])
               if (pairs["prompt_id"] * 2)[k] == p]
        assert len(ids) == len(set(ids)) == 4
    expected = 1.0 / (1.0 + np.exp(-(np.array(pairs["score_chosen"]) - np.array(pairs["score_rejected"]))))
    np.testing.assert_allclose(pairs["label_prob"], expected, rtol=1e-12)  # P(a ≻ b) = σ(r_a − r_b)
    assert "label_prob" in step.output_columns(table.column_names)
    # a prompt's pairs do not depend on the other prompts in its shard, nor on the row order
    alone = step.process(table.slice(6, 6)).table.to_pydict()
    mine = [k for k, p in enumerate(pairs["prompt_id"]) if p == "p1"]
    assert alone["pair_id"] == [pairs["pair_id"][k] for k in mine]
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    assert sorted(step.process(shuffled).table.column("pair_id").to_pylist()) == sorted(pairs["pair_id"])
    # without label_prob the output is as before
    assert "label_prob" not in BuildPairs(score="score_x", strategy="rso").process(table).table.column_names


def test_build_pairs_rso_beta_error_names_step_and_option():
    from prefdata.steps.build import BuildPairs

    for beta in (0.0, -2.0):
        with pytest.raises(ValueError, match=r"build_pairs: option 'rso_beta' .* must be > 0"):
            BuildPairs(score="score_x", strategy="rso", rso_beta=beta)
