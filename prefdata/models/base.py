"""One protocol for language-model backends (transformers on CPU/GPU, vLLM on GPU).

Steps talk to this protocol only, so a recipe scales up by changing the model name or
backend, never the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

Conversation = list[dict]  # [{"role": ..., "content": ...}, ...]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class LogProb:
    """Log-probability of a response given its conversation, over response tokens only."""

    sum: float
    mean: float
    n_tokens: int


class LanguageModel(Protocol):
    name: str

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling) -> list[list[str]]:
        """``n`` sampled assistant replies per conversation (outer list follows input order)."""

    def logprobs(self, conversations: list[Conversation], responses: list[str]) -> list[LogProb]:
        """Log p(response | conversation) for each pair, prompt tokens excluded."""

    def hidden_states(self, conversations: list[Conversation], responses: list[str]) -> list[np.ndarray]:
        """Last-layer hidden states at the positions that predict the response tokens:
        from the last prompt token to the second-to-last response token, ``[T, d]``."""
