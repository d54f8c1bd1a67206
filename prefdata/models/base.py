"""One protocol for language-model backends (transformers on CPU/GPU, vLLM on GPU).

Steps talk to this protocol only, so a recipe scales up by changing the model name or
backend, never the step.

Each sampled reply (a *draw*) is seeded from (config seed, conversation key, sample
index) by ``draw_seed``, never from its position in a call, so a prompt gets the same
replies whatever shard, batch or other prompts it is sampled with. The key is the
``prompt_id`` the sample step passes; callers without one get the conversation's hash.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from prefdata import schema

Conversation = list[dict]  # [{"role": ..., "content": ...}, ...]

FINISH_REASONS = ("stop", "length")  # stop: eos or a stop string; length: max_new_tokens


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    min_new_tokens: int = 0  # eos is suppressed before this many tokens
    stop: tuple[str, ...] = ()  # a reply is cut before the first of these strings

    def __post_init__(self):
        problems = sampling_problems(self.temperature, self.top_p, self.max_new_tokens,
                                     self.min_new_tokens, self.stop)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "stop", tuple(self.stop))


def sampling_problems(temperature, top_p, max_new_tokens, min_new_tokens=0, stop=()) -> list[str]:
    """What is wrong with these sampling settings, one sentence each (empty when fine)."""
    problems = []
    if not isinstance(temperature, numbers.Real) or temperature < 0:
        problems.append(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        problems.append(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, numbers.Integral) or min_new_tokens < 0:
        problems.append(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    elif isinstance(max_new_tokens, numbers.Integral) and min_new_tokens > max_new_tokens:
        problems.append(f"min_new_tokens ({min_new_tokens}) must not exceed max_new_tokens "
                        f"({max_new_tokens})")
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in stop):
        problems.append(f"stop must be a list of non-empty strings (e.g. [\"\\n\\n\"]), got {stop!r}")
    return problems


@dataclass(frozen=True)
class Generation:
    """One sampled reply and why it ended (``stop`` or ``length``)."""

    text: str
    finish_reason: str


@dataclass(frozen=True)
class LogProb:
    """Log-probability of a response given its conversation, over response tokens only."""

    sum: float
    mean: float
    n_tokens: int


def draw_seed(seed: int, key: str, sample_index: int) -> int:
    """The seed of one draw: fixed by the config seed, the prompt's key and the sample index."""
    return int(schema.stable_hash([int(seed), str(key), int(sample_index)], length=15), 16)


def draw_keys(conversations: Sequence[Conversation], keys: Sequence[str] | None) -> list[str]:
    """Per-conversation keys: the given ones, or each conversation's stable hash."""
    if keys is None:
        return [schema.prompt_id(list(c)) for c in conversations]
    if len(keys) != len(conversations):
        raise ValueError(f"got {len(conversations)} conversations but {len(keys)} keys")
    return [str(k) for k in keys]


def first_indices(conversations: Sequence[Conversation], first_index) -> list[int]:
    """Per-conversation index of the first draw (0 unless appending to earlier samples)."""
    if first_index is None:
        return [0] * len(conversations)
    if isinstance(first_index, (int, np.integer)):
        return [int(first_index)] * len(conversations)
    if len(first_index) != len(conversations):
        raise ValueError(f"got {len(conversations)} conversations but {len(first_index)} first indices")
    return [int(i) for i in first_index]


class LanguageModel(Protocol):
    name: str

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling,
                 keys: Sequence[str] | None = None,
                 first_index: Sequence[int] | int | None = None) -> list[list[str]]:
        """``n`` sampled assistant replies per conversation (outer list follows input order).

        Draw k of conversation i is seeded by ``draw_seed(sampling.seed, keys[i],
        first_index[i] + k)``.
        """

    def generate_replies(self, conversations: list[Conversation], n: int, sampling: Sampling,
                         keys: Sequence[str] | None = None,
                         first_index: Sequence[int] | int | None = None) -> list[list[Generation]]:
        """Like ``generate``, with each reply's finish reason."""

    def logprobs(self, conversations: list[Conversation], responses: list[str]) -> list[LogProb]:
        """Log p(response | conversation) for each pair, prompt tokens excluded."""

    def hidden_states(self, conversations: list[Conversation], responses: list[str]) -> list[np.ndarray]:
        """Last-layer hidden states at the positions that predict the response tokens:
        from the last prompt token to the second-to-last response token, ``[T, d]``."""

    def hidden_state_sums(self, conversations: list[Conversation],
                          responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The same states summed over positions (float64 ``[n, d]``) and their counts ``[n]``."""
