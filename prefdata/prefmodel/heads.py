"""The two preference heads and their losses, as small modules and pure functions.

Bradley–Terry (BT): a scalar reward r(y|x) = w·h; P(y_c ≻ y_r) = σ((r_c − r_r − m)/τ)
with an optional per-pair margin m. A scalar reward orders responses, so it cannot
express a cycle a ≻ b ≻ c ≻ a.

General Preference Model (GPM): Zhang et al. 2024, "General Preference Modeling with
Preference Representations for Aligning Language Models" (arXiv 2410.02197); public code
github.com/general-preference/general-preference-model (read, not copied). Each response
gets a 2k-dimensional preference embedding v(y|x) = W h (a bias-free linear value head,
L2-normalised by default as in the reference code), and a pair is scored with a block
skew-symmetric operator R = diag(λ_1 J, …, λ_k J), J = [[0, −1], [1, 0]]:

    s(y_c ≻ y_r | x) = v_c^T R^T v_r = Σ_i λ_i(x) (v_c^(2i) v_r^(2i+1) − v_c^(2i+1) v_r^(2i)),

P(y_c ≻ y_r) = σ(s/τ). The optional prompt-dependent gate λ(x) = softmax(G h_x) (a
bias-free linear "prompt head" on the prompt's last hidden state, softmax over the k
blocks as in the reference code) keeps λ_i ≥ 0; without the gate every λ_i = 1. R is
skew-symmetric, so s(a ≻ b) = −s(b ≻ a) and s(a ≻ a) = 0, and cycles are representable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BTHead(nn.Module):
    """Scalar reward from a feature vector; bias-free so it is exactly a
    ``*ForSequenceClassification`` ``score`` layer (see io.py)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(h).squeeze(-1)


class GPMHead(nn.Module):
    """Preference embedding (2k) and optional prompt gate (k) from feature vectors."""

    def __init__(self, hidden_size: int, dim: int = 8, normalize: bool = True, gate: bool = True):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"gpm: the embedding dimension must be even and >= 2 (2k, one 2x2 block per k), "
                             f"got dim={dim}; set dim to an even number such as 8")
        self.dim, self.normalize, self.use_gate = dim, normalize, gate
        self.value = nn.Linear(hidden_size, dim, bias=False)
        self.gate = nn.Linear(hidden_size, dim // 2, bias=False) if gate else None

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        v = self.value(h)
        return F.normalize(v, p=2, dim=-1) if self.normalize else v

    def scales(self, h_prompt: torch.Tensor | None, n: int) -> torch.Tensor:
        """λ(x) ≥ 0, one per 2×2 block: [n, k]."""
        if self.gate is None or h_prompt is None:
            return torch.ones(n, self.dim // 2, device=self.value.weight.device, dtype=self.value.weight.dtype)
        return torch.softmax(self.gate(h_prompt), dim=-1)


def skew_operator(scales: torch.Tensor) -> torch.Tensor:
    """The block-diagonal skew-symmetric R [..., 2k, 2k] for scales [..., k] (R[2i+1, 2i] = λ_i)."""
    k = scales.shape[-1]
    R = scales.new_zeros(*scales.shape[:-1], 2 * k, 2 * k)
    idx = torch.arange(k, device=scales.device)
    R[..., 2 * idx + 1, 2 * idx] = scales
    R[..., 2 * idx, 2 * idx + 1] = -scales
    return R


def gpm_score(v_c: torch.Tensor, v_r: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """s(c ≻ r) = Σ_i λ_i (v_c^(2i) v_r^(2i+1) − v_c^(2i+1) v_r^(2i)), batched over leading dims."""
    if v_c.shape[-1] % 2:
        raise ValueError(f"gpm: embedding dimension {v_c.shape[-1]} is odd; GPM embeddings have 2k dimensions")
    even_c, odd_c = v_c[..., 0::2], v_c[..., 1::2]
    even_r, odd_r = v_r[..., 0::2], v_r[..., 1::2]
    return (scales * (even_c * odd_r - odd_c * even_r)).sum(-1)


def gpm_matrix(v: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """All pairwise scores of N responses of one prompt: S[a, b] = s(a ≻ b), [N, N]."""
    R = skew_operator(scales)
    return v @ R.transpose(-1, -2) @ v.transpose(-1, -2)


def bt_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin=None, tau: float = 1.0) -> torch.Tensor:
    """−log σ((r_c − r_r − m)/τ) per pair."""
    m = 0.0 if margin is None else margin
    return -F.logsigmoid((r_c - r_r - m) / tau)


def gpm_loss(s: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """−log σ(s/τ) per pair (the reference code's default τ is 0.1)."""
    return -F.logsigmoid(s / tau)
