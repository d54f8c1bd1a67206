"""Score responses by the likelihood of the user's follow-up (FLR).

Zhang et al. 2024, "Aligning Language Models Using Follow-up Likelihood as Reward Signal":
a good answer makes a satisfied next user turn ("Thanks, that helped.") likely and a
dissatisfied one ("That's wrong.") unlikely, so the reward of a response y to prompt x is

    score_flr = mean_k log p(f⁺_k | x, y) − mean_k log p(f⁻_k | x, y)

under a chosen language model, with f⁺ / f⁻ the positive and negative follow-up lists
(``positive`` / ``negative``), each follow-up the next user turn after the response.
``reduction: mean`` (the default) takes each follow-up's mean log-probability per token,
so follow-ups of different lengths weigh alike; ``sum`` takes the total.

How the follow-up is scored: the backends' ``logprobs`` scores the next *assistant* turn,
so the conversation is shown with the user and assistant roles swapped — the model speaks
as the user, the response is the turn it answers, and the follow-up is scored as its
reply (system messages stay first). The two lists share that context, so the difference
cancels what the role swap adds equally to every follow-up. Every (prompt, response)
context is scored against all follow-ups in one call, so the backend shares each
context's KV cache across them (prompt sharing, as for ``score_cdr``).

Default lists: the paper's own follow-up lists could not be retrieved while writing this
step (no copy of its text or code was reachable), so the defaults are a small documented
set in its spirit, three of each; set ``positive``/``negative`` to reproduce the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from prefdata.step import MapStep

DEFAULT_POSITIVE = [
    "Thanks, that helped.",
    "Great, that's exactly what I needed.",
    "That makes sense, thank you!",
]
DEFAULT_NEGATIVE = [
    "That's wrong.",
    "That's not what I asked.",
    "This doesn't help at all.",
]
SWAP = {"user": "assistant", "assistant": "user"}


@dataclass
class ScoreFLRConfig:
    model: str = "smollm2-135m-instruct"
    positive: list[str] = field(default_factory=lambda: list(DEFAULT_POSITIVE))
    negative: list[str] = field(default_factory=lambda: list(DEFAULT_NEGATIVE))
    reduction: str = "mean"  # mean | sum of each follow-up's token log-probs
    name: str = "flr"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16


class ScoreFLR(MapStep):
    """Writes ``score_<name>`` per response: positive minus negative follow-up log-likelihood."""

    name = "score_flr"
    Config = ScoreFLRConfig
    lm = None

    def check(self) -> None:
        from prefdata.models import check_backend

        c = self.config
        problems = []
        if c.reduction not in ("sum", "mean"):
            problems.append(f"option 'reduction' must be 'sum' or 'mean', got {c.reduction!r}")
        for key in ("positive", "negative"):
            values = getattr(c, key)
            if not values or any(not isinstance(v, str) or not v.strip() for v in values):
                problems.append(f"option '{key}' must be a non-empty list of non-empty follow-up texts, got {values!r}")
        overlap = sorted(set(c.positive) & set(c.negative))
        if overlap:
            problems.append(f"follow-ups {overlap} are in both 'positive' and 'negative'")
        if c.batch_size < 1:
            problems.append(f"option 'batch_size' must be at least 1, got {c.batch_size}")
        if problems:
            raise ValueError("score_flr: " + "; ".join(problems))
        check_backend(c.backend)

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        return [ModelRef(c.model, backend=c.backend, device=c.device, dtype=c.dtype)]

    def input_columns(self) -> list[str]:
        return ["prompt", "response"]

    def output_columns(self, columns: list[str]) -> list[str]:
        column = f"score_{self.config.name}"
        return [c for c in columns if c != column] + [column]

    def setup(self) -> None:
        from prefdata.models import load_model

        c = self.config
        self.lm = load_model(c.model, backend=c.backend, device=c.device, dtype=c.dtype, batch_size=c.batch_size)

    def teardown(self) -> None:
        self.lm = None

    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        column = f"score_{c.name}"
        if column in table.column_names:
            table = table.drop_columns([column])
        if table.num_rows == 0:
            return table.append_column(column, pa.array([], pa.float64()))
        if self.lm is None:
            self.setup()
        contexts = [user_view(p, r) for p, r in zip(table.column("prompt").to_pylist(),
                                                   table.column("response").to_pylist())]
        follow = list(c.positive) + list(c.negative)
        k = len(follow)
        scored = self.lm.logprobs([ctx for ctx in contexts for _ in follow], follow * len(contexts))
        values = np.array([getattr(s, c.reduction) for s in scored], dtype=np.float64).reshape(len(contexts), k)
        scores = values[:, :len(c.positive)].mean(1) - values[:, len(c.positive):].mean(1)
        return table.append_column(column, pa.array(scores, pa.float64()))


def user_view(prompt: list[dict], response: str) -> list[dict]:
    """The conversation as the user sees it: roles swapped, the response last, so the
    model's next (assistant) turn is the user's follow-up."""
    turns = list(prompt) + [{"role": "assistant", "content": response}]
    return [{"role": SWAP.get(m["role"], m["role"]), "content": m["content"]} for m in turns]
