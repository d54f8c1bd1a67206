"""Statistical rejection sampling of responses from the optimal policy (RSO).

Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization" (ICLR
2024): for a KL-regularised reward r and strength β the optimal policy is
π*(y|x) ∝ π_sft(y|x)·exp(r(x, y)/β). Given N responses sampled from π_sft and their
rewards, the paper's Algorithm 1 turns them into draws from π*: in each round, with the
largest reward among the remaining candidates as the envelope, each remaining candidate
is accepted with probability exp((r − r_max)/β) (the envelope candidate always is);
accepted candidates leave the pool (sampling without replacement) and rounds repeat until
enough are accepted or none remain. The accepted responses are then paired (the paper's
"rso-sample-rank": pairs of accepted samples, labelled by the reward), here consecutive
accepted samples, the higher reward chosen.

``rso_accept`` is the algorithm for one prompt, step by step, with a numpy generator;
``rso_accepted`` runs it for every prompt of a shard at once (a few rounds of array
operations, no loop over prompts), each uniform draw a stable hash of (``seed``, prompt id,
response id, round), and candidates visited in the order of their response-id hash — so a
prompt's pairs do not depend on which prompts share its shard, the input row order or the
machine.
"""

from __future__ import annotations

import numpy as np

from prefdata.pairs import _GOLDEN, fmix64


def check_beta(beta: float, where: str = "rso") -> None:
    if not beta > 0:
        raise ValueError(f"{where}: option 'rso_beta' (β of π* ∝ π_sft·exp(r/β)) must be > 0, got {beta}")


def rso_accept(rewards: np.ndarray, n_accept: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the accepted candidates, in acceptance order (at most ``len(rewards)``)."""
    check_beta(beta)
    rewards = np.asarray(rewards, dtype=np.float64)
    remaining = np.arange(len(rewards))
    accepted: list[np.ndarray] = []
    need = min(int(n_accept), len(rewards))
    while need > 0 and len(remaining):
        r = rewards[remaining]
        passed = rng.random(len(remaining)) < np.exp((r - r.max()) / beta)
        take = remaining[passed][:need]  # the scan stops once enough are accepted
        accepted.append(take)
        need -= len(take)
        remaining = remaining[~np.isin(remaining, take)]
    return np.concatenate(accepted) if accepted else np.zeros(0, np.int64)


def uniforms(response_hash: np.ndarray, prompt_hash: np.ndarray, seed: int, round_: int) -> np.ndarray:
    """U(0, 1) draws fixed by (seed, prompt, response, round): the same on every machine and
    for any shard layout or row order, and computable for all candidates at once."""
    key = fmix64(fmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ _GOLDEN) ^ prompt_hash.astype(np.uint64))
    with np.errstate(over="ignore"):
        mixed = fmix64(fmix64(key ^ response_hash.astype(np.uint64)) + np.uint64(round_ + 1) * _GOLDEN)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def rso_accepted(s: np.ndarray, r: np.ndarray, head: np.ndarray, end: np.ndarray, prompt_hashes: np.ndarray,
                 beta: float, n_accept: int, seed: int) -> np.ndarray:
    """Positions accepted by Algorithm 1 in every prompt run ``[head, end)`` at once, ordered by
    run, then acceptance (round, then visit order by response hash).

    Each round, per run: the envelope is the largest score among the candidates still in the
    pool; every pool candidate passes with probability exp((s − envelope)/β); in visit order
    the first passing ones are accepted until the run has ``n_accept`` (or its pool is empty).
    """
    check_beta(beta, "build_pairs")
    n = len(s)
    if n == 0:
        return np.zeros(0, np.int64)
    seg = np.repeat(np.arange(len(head)), end - head)
    order = np.lexsort((r, seg))  # visit order: by response hash within each run
    s, r, seg = s[order], r[order], seg[order]
    keys = prompt_hashes.astype(np.uint64)[seg]
    need = np.minimum(end - head, n_accept).astype(np.int64)
    alive = np.ones(n, bool)
    accepted_round = np.full(n, -1, np.int64)
    round_ = 0
    while (need[seg] > 0).any() and alive.any():
        live = alive & (need[seg] > 0)
        envelope = np.full(len(head), -np.inf)
        np.maximum.at(envelope, seg[live], s[live])
        with np.errstate(over="ignore", invalid="ignore"):
            passed = live & (uniforms(r, keys, seed, round_) < np.exp((s - envelope[seg]) / beta))
        rank = np.cumsum(passed) - 1  # rank among passing positions, made per run below
        starts = np.searchsorted(seg, np.arange(len(head)))
        before = np.concatenate([[0], np.cumsum(passed)])[starts]
        rank = rank - before[seg]
        take = passed & (rank < need[seg])
        accepted_round[take] = round_
        np.subtract.at(need, seg[take], 1)
        alive &= ~take
        round_ += 1
    picked = np.flatnonzero(accepted_round >= 0)
    picked = picked[np.lexsort((picked, accepted_round[picked], seg[picked]))]
    return order[picked]


def rso_pairs(s: np.ndarray, r: np.ndarray, t: np.ndarray, head: np.ndarray, end: np.ndarray,
              prompt_hashes: np.ndarray, beta: float, pairs_per_prompt: int, seed: int,
              min_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (chosen, rejected) of RSO pairs for prompts laid out as runs ``[head, end)``.

    ``s`` are scores, ``r`` response-id hashes (visit order and draws), ``t`` text hashes;
    per prompt 2·``pairs_per_prompt`` samples are accepted and consecutive ones paired. A
    pair of equal scores or equal texts, or a gap below ``min_margin``, is not a pair.
    """
    picked = rso_accepted(s, r, head, end, prompt_hashes, beta, 2 * pairs_per_prompt, seed)
    run = np.searchsorted(head, picked, side="right") - 1
    first_of_run = np.r_[True, run[1:] != run[:-1]] if len(run) else np.zeros(0, bool)
    idx = np.arange(len(picked))
    rank = idx - np.maximum.accumulate(np.where(first_of_run, idx, 0)) if len(run) else idx
    lead = np.flatnonzero((rank % 2 == 0) & (np.r_[run[1:], -1] == run))  # has a partner in its run
    a, b = picked[lead], picked[lead + 1]
    gap = np.abs(s[a] - s[b])
    ok = (gap > 0) & (gap >= min_margin) & (t[a] != t[b])
    a, b = a[ok], b[ok]
    higher = s[a] > s[b]
    return np.where(higher, a, b).astype(np.int64), np.where(higher, b, a).astype(np.int64)
