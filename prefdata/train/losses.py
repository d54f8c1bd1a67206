"""Preference losses as small pure functions on per-example log-probabilities.

Every function returns one loss per example (the trainer takes the mean). Inputs are the
*summed* log-probabilities of the response tokens, ``log π(y|x) = Σ_t log π(y_t|x, y_<t)``,
unless a method says otherwise (SimPO and PRO normalise by the response length, the NLL
terms are token means). ``h`` below is the DPO log-ratio difference

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAIR_LOSSES = ("dpo", "rpo", "rdpo", "cdpo", "ipo", "simpo", "sppo", "ld_dpo", "gpo")
LIST_LOSSES = ("pro", "sppo", "gpo")
LOSSES = tuple(dict.fromkeys(PAIR_LOSSES + LIST_LOSSES))
# Losses that read each response's estimated win probability (the ``win_rates`` step's
# ``win_prob``, carried as the pair's score_chosen/score_rejected or the list's scores).
WIN_PROB_LOSSES = ("sppo", "gpo")  # gpo: the GPM general preference score (score_gpm)
REFERENCE_FREE = ("simpo", "pro")


def _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO, sigmoid form: −log σ(β h).

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", NeurIPS 2023.
    """
    h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def rpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_n_tokens, beta: float, alpha: float):
    """RPO: DPO + α × NLL of the chosen response (mean over its tokens).

    The NLL term keeps the chosen response likely while the margin grows. Pang et al.,
    "Iterative Reasoning Preference Optimization", NeurIPS 2024; named RPO in Liu et al.,
    "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
    Adversarial Regularizer", 2024.
    """
    nll = -chosen_logps / chosen_n_tokens.clamp(min=1)
    return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) + alpha * nll


def rdpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
              beta: float, eps, eps_max: float = 0.45):
    """Robust DPO: [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1 − 2ε).

    An unbiased loss when each label is flipped with probability ε; ``eps`` is one number
    for the dataset or a tensor with one ε per pair (the ``flip_prob`` column), clipped to
    [0, eps_max] with eps_max < 0.5 so the 1/(1−2ε) factor stays finite.
    Chowdhury, Kini & Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", ICML 2024.
    """
    if not 0.0 <= eps_max < 0.5:
        raise ValueError(f"rdpo: eps_max must be in [0, 0.5), got {eps_max}")
    h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = torch.as_tensor(eps, dtype=h.dtype, device=h.device).clamp(0.0, eps_max)
    return ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def cdpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
              beta: float, label_smoothing: float):
    """Conservative DPO (label smoothing): (1−ε)(−log σ(βh)) + ε(−log σ(−βh)).

    Mitchell, "A note on DPO with noisy preferences & relationship to IPO", 2023.
    """
    h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    return (1 - eps) * -F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, tau: float,
             chosen_n_tokens=None, rejected_n_tokens=None, normalize: str = "sum"):
    """IPO: (h − 1/(2τ))², on summed log-probs as in the paper (``normalize: sum``); with
    ``per_token`` each log-ratio is divided by its response's token count, as TRL computes
    it, so a TRL run can be reproduced.

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", AISTATS 2024.
    """
    if normalize == "per_token":
        h = ((chosen_logps - ref_chosen_logps) / chosen_n_tokens.clamp(min=1)
             - (rejected_logps - ref_rejected_logps) / rejected_n_tokens.clamp(min=1))
    else:
        h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1 / (2 * tau)) ** 2


def simpo_loss(chosen_logps, rejected_logps, chosen_n_tokens, rejected_n_tokens,
               beta: float, gamma: float):
    """SimPO, reference-free: −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ).

    Meng, Xia & Chen, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", NeurIPS 2024.
    """
    chosen = chosen_logps / chosen_n_tokens.clamp(min=1)
    rejected = rejected_logps / rejected_n_tokens.clamp(min=1)
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def pro_loss(logps, n_tokens, valid, scores=None, sft_weight: float = 0.05):
    """PRO, a list loss for responses ranked best first, plus an SFT term on the best.

    With r_i = log π(y_i|x)/|y_i|, for each rank k the best-so-far y_k is pushed above every
    worse y_i (i > k) by a softmax:
        L = −Σ_k log [exp(r_k / T_k^k) / Σ_{i≥k} exp(r_i / T_k^i)] + w · NLL(y_1)
    with 1/T_k^i = s_k − s_i from the scores (i > k) and 1/T_k^k = max_{i>k} 1/T_k^i;
    without scores every 1/T is 1. ``logps``, ``n_tokens``, ``valid`` (bool) and ``scores``
    are [B, K]; lists shorter than K are padded and marked invalid.
    Song et al., "Preference Ranking Optimization for Human Alignment", AAAI 2024.
    """
    r = logps / n_tokens.clamp(min=1)
    B, K = r.shape
    total = r.new_zeros(B)
    for k in range(K - 1):
        rest = valid[:, k + 1:]  # the worse responses i > k
        has_rest = valid[:, k] & rest.any(dim=1)
        if scores is None:
            inv_t = torch.ones_like(r[:, k:])
        else:
            diff = (scores[:, k:k + 1] - scores[:, k + 1:]).clamp(min=0).masked_fill(~rest, 0)
            inv_t = torch.cat([diff.max(dim=1, keepdim=True).values, diff], dim=1)
        z = (r[:, k:] * inv_t).masked_fill(~valid[:, k:], float("-inf"))
        term = -(z[:, 0] - torch.logsumexp(z, dim=1))
        total = total + torch.where(has_rest, term, torch.zeros_like(term))
    nll_best = -logps[:, 0] / n_tokens[:, 0].clamp(min=1)
    return total + sft_weight * nll_best


def sppo_loss(logps, ref_logps, win_prob, valid, eta: float):
    """SPPO: mean over a prompt's responses of (log π(y|x) − log π_t(y|x) − η (P̂(y ≻ π_t|x) − ½))².

    ``π_t`` is the reference (the previous round's policy) and ``P̂`` each response's
    estimated win probability against π_t (the ``win_rates`` step). Every response is
    regressed on its own target, so a list of K responses uses all K (the paper's form);
    for a pair it is the reference code's ``sppo_single`` loss with η = 1/β, averaged
    rather than summed over the two responses. ``logps``, ``ref_logps``, ``win_prob`` and
    ``valid`` are [B, K]. Wu et al., "Self-Play Preference Optimization for Language Model
    Alignment", 2024 (the paper sets η = 1e3; 1000 is the default here).
    """
    if win_prob is None:
        raise ValueError("sppo needs each response's win probability: build pairs or lists with "
                         "score: win_prob after a win_rates step")
    p = win_prob.to(logps.dtype)
    bad = valid & ((p < 0) | (p > 1) | torch.isnan(p))
    if bad.any():
        raise ValueError("sppo: the scores are not win probabilities in [0, 1]; build pairs or lists with "
                         "score: win_prob (the win_rates step writes it)")
    sq = ((logps - ref_logps) - eta * (p - 0.5)) ** 2
    sq = torch.where(valid, sq, torch.zeros_like(sq))
    return sq.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def gpo_loss(logps, ref_logps, gp_score, valid, eta: float):
    """GPO: SPPO's squared loss with a General Preference Model's scores as the targets.

    ``gp_score`` [B, K] is each sample's general preference score under the GPM — its mean
    win probability σ(s(y ≻ y')/τ) against the prompt's other samples from π_t (the
    ``score_gpm`` column) — the estimate of P(y ≻ π_t | x) that SPPO takes from a pairwise
    model. Zhang et al. 2024, "General Preference Modeling with Preference Representations
    for Aligning Language Models" (General Preference Optimization, with Wu et al. 2024,
    "Self-Play Preference Optimization for Language Model Alignment").
    """
    return sppo_loss(logps, ref_logps, gp_score, valid, eta)


def ld_logps(logps, public_logps, alpha: float):
    """LD-DPO's length-desensitised log-probability: the part over the first l_p tokens plus
    α times the rest, l_p = min(|y_w|, |y_l|) (for the shorter response the rest is empty)."""
    return public_logps + alpha * (logps - public_logps)


def ld_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_public_logps, rejected_public_logps, ref_chosen_public_logps, ref_rejected_public_logps,
                beta: float, alpha: float):
    """LD-DPO: DPO on log π̂(y|x) = log π(y_{≤l_p}|x) + α·log π(y_{>l_p}|x), for the policy and
    the reference alike, with l_p the shorter response's length; α = 1 is DPO, α < 1 damps
    the verbosity that the longer response's extra tokens push into the DPO gradient.

    Liu et al., "Length Desensitization in Direct Preference Optimization", 2024.
    ``*_public_logps`` are the summed log-probs of each response's first l_p tokens.

    Verified against: the split of a response's log-likelihood at l_p = min(|y_w|, |y_l|)
    with the excess weighted by α is the paper's (as TRL's paper index restates it); the
    paper's own method section could not be retrieved here. Whether the *reference*
    log-probs are desensitised too differs between reimplementations: TRL today
    (huggingface/trl ``trl/trainer/dpo_trainer.py``, since its 2026 DPO refactor) weights
    the reference's excess by α as well — what we do, the same formula for both models —
    while TRL's first LD-DPO version (PR #3458, 2025) and LLaMA-Factory
    (``src/llamafactory/train/trainer_utils.py`` ``get_batch_logps``, called with
    ``ld_alpha`` only for the policy) keep the reference's full sum. Per pair the gradient
    direction is the same; their margin is ours plus β·(1 − α)·(E_l − E_w), E the
    reference's log-prob of a response's excess tokens (0 for the shorter one), which
    changes each pair's weight σ(−margin).
    """
    return dpo_loss(ld_logps(chosen_logps, chosen_public_logps, alpha),
                    ld_logps(rejected_logps, rejected_public_logps, alpha),
                    ld_logps(ref_chosen_logps, ref_chosen_public_logps, alpha),
                    ld_logps(ref_rejected_logps, ref_rejected_public_logps, alpha), beta)


def ld_public_logps(logps, n_tokens):
    """Each side's log-prob over the first l_p = min(|y_w|, |y_l|) tokens, from [B, 3] rows
    ``[chosen, rejected, the longer one's first l_p tokens]`` (``train.data.with_ld_prefix``;
    column 2 is unused where the lengths are equal)."""
    c_longer = n_tokens[:, 0] > n_tokens[:, 1]
    r_longer = n_tokens[:, 1] > n_tokens[:, 0]
    prefix = logps[:, 2] if logps.shape[1] > 2 else logps[:, 0]
    return torch.where(c_longer, prefix, logps[:, 0]), torch.where(r_longer, prefix, logps[:, 1])


def rewards(loss: str, logps, n_tokens, ref_logps, beta: float, simpo_beta: float, ld_alpha: float = 1.0):
    """The implicit reward of each response, [B, K]: what reward accuracy and margins use."""
    if loss == "ld_dpo":  # [B, 2] from the [B, 3] rows (chosen, rejected, prefix)
        c, r = ld_public_logps(logps, n_tokens)
        rc, rr = ld_public_logps(ref_logps, n_tokens)
        pol = torch.stack([ld_logps(logps[:, 0], c, ld_alpha), ld_logps(logps[:, 1], r, ld_alpha)], 1)
        ref = torch.stack([ld_logps(ref_logps[:, 0], rc, ld_alpha), ld_logps(ref_logps[:, 1], rr, ld_alpha)], 1)
        return beta * (pol - ref)
    if loss == "simpo":
        return simpo_beta * logps / n_tokens.clamp(min=1)
    if loss == "pro":
        return logps / n_tokens.clamp(min=1)
    return beta * (logps - ref_logps)


def compute_loss(cfg, logps, n_tokens, valid, ref_logps=None, scores=None, flip_prob=None, rdpo_eps=None,
                 label_prob=None):
    """Dispatch on ``cfg.loss``: per-example losses [B] for [B, K] log-probs (K = 2 for pairs).

    rDPO takes ``rdpo_eps`` (one ε, resolved at start by robust.py) or else the per-pair
    ``flip_prob`` [B]."""
    name = cfg.loss
    if name == "sppo":
        return sppo_loss(logps, ref_logps, scores, valid, cfg.sppo_eta)
    if name == "gpo":
        return gpo_loss(logps, ref_logps, scores, valid, cfg.sppo_eta)
    if name == "pro":
        return pro_loss(logps, n_tokens, valid, scores, cfg.pro_sft_weight)
    c, r = logps[:, 0], logps[:, 1]
    if name == "simpo":
        return simpo_loss(c, r, n_tokens[:, 0], n_tokens[:, 1], cfg.simpo_beta, cfg.simpo_gamma)
    rc, rr = ref_logps[:, 0], ref_logps[:, 1]
    if name == "dpo":
        return dpo_loss(c, r, rc, rr, cfg.beta)
    if name == "ld_dpo":
        pc, pr = ld_public_logps(logps, n_tokens)
        prc, prr = ld_public_logps(ref_logps, n_tokens)
        return ld_dpo_loss(c, r, rc, rr, pc, pr, prc, prr, cfg.beta, cfg.ld_alpha)
    if name == "rpo":
        return rpo_loss(c, r, rc, rr, n_tokens[:, 0], cfg.beta, cfg.rpo_alpha)
    if name == "rdpo":
        eps = rdpo_eps if rdpo_eps is not None else flip_prob
        if cfg.rdpo_eps == "label_prob":  # per-pair soft label: ε = 1 − P(chosen ≻ rejected)
            eps = None if label_prob is None else 1 - label_prob
        if eps is None:
            raise ValueError("rdpo: no ε: give rdpo_eps or the per-pair flip_prob")
        return rdpo_loss(c, r, rc, rr, cfg.beta, eps, cfg.rdpo_eps_max)
    if name == "cdpo":
        smoothing = cfg.label_smoothing if cfg.label_smoothing != "label_prob" else 1 - label_prob
        return cdpo_loss(c, r, rc, rr, cfg.beta, smoothing)
    if name == "ipo":
        return ipo_loss(c, r, rc, rr, cfg.beta, n_tokens[:, 0], n_tokens[:, 1], cfg.ipo_normalize)
    raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")
