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

Randomness is a numpy generator seeded by (``seed``, a stable hash of the prompt id), and
candidates are visited in the order of a stable hash of their response id, so a prompt's
pairs do not depend on which prompts share its shard or on the input row order.
"""

from __future__ import annotations

import numpy as np


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


def prompt_rng(seed: int, prompt_hash: int) -> np.random.Generator:
    """One generator per (seed, prompt): the same draws on every machine and shard layout."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(prompt_hash)])


def rso_pairs(s: np.ndarray, r: np.ndarray, t: np.ndarray, head: np.ndarray, end: np.ndarray,
              prompt_hashes: np.ndarray, beta: float, pairs_per_prompt: int, seed: int,
              min_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (chosen, rejected) of RSO pairs for prompts laid out as runs ``[head, end)``.

    ``s`` are scores, ``r`` response-id hashes (visit order), ``t`` text hashes; per prompt
    2·``pairs_per_prompt`` samples are accepted and consecutive ones paired. A pair of equal
    scores or equal texts, or a gap below ``min_margin``, is not a pair.
    """
    check_beta(beta, "build_pairs")
    chosen, rejected = [], []
    for h, e, key in zip(head, end, prompt_hashes):
        order = h + np.argsort(r[h:e], kind="stable")
        picked = order[rso_accept(s[order], 2 * pairs_per_prompt, beta, prompt_rng(seed, key))]
        a, b = picked[0:len(picked) - 1:2], picked[1::2]
        gap = np.abs(s[a] - s[b])
        ok = (gap > 0) & (gap >= min_margin) & (t[a] != t[b])
        a, b = a[ok], b[ok]
        higher = s[a] > s[b]
        chosen.append(np.where(higher, a, b))
        rejected.append(np.where(higher, b, a))
    if not chosen:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(chosen).astype(np.int64), np.concatenate(rejected).astype(np.int64)
