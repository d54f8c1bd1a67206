"""Score responses by the likelihood of the user's follow-up (FLR).

Zhang et al. 2024, "Aligning Language Models Using Follow-up Likelihood as Reward Signal":
a good answer makes a satisfied next user turn ("That answers my question perfectly.")
likely and a dissatisfied one ("That's off-topic from what I asked.") unlikely, so the
reward of a response y to prompt x is

    score_flr = mean_k ℓ(f⁺_k | x, y) − mean_k ℓ(f⁻_k | x, y)

under a chosen language model, with f⁺ / f⁻ the positive and negative follow-up lists,
each follow-up the next user turn after the response, and ℓ its mean log-probability per
token (``reduction: mean``, the default: follow-ups of different lengths weigh alike) or
its total (``sum``).

Default follow-ups: the reference code's (github.com/e0397123/FLR, ``utils.py``; verified
against that repository, whose ``run_llama3.py`` scores them): ten positive and ten
negative follow-ups for each of six helpfulness aspects (understanding, relevance,
correctness, engagingness, informativeness, instruction following), shipped verbatim in
``prefdata/flr_followups.py``. ``aspects`` picks which aspects' lists to use (all six by
default); since every aspect has ten of each, the flat means over the chosen lists equal
the mean over aspects of each aspect's positive-minus-negative score. ``positive`` /
``negative`` replace the lists outright. Each distinct follow-up is scored once; one that
a list repeats (as the reference's do) counts as often as it appears.

Where we differ from the reference code (and why):

* What is averaged. ``run_llama3.py`` takes, for each follow-up, the mean of the model's
  raw output logits at one position (the one holding the follow-up's first token) over
  the follow-up's token ids — not a log-probability, and tied to how the chat template
  ends the turn. We take the follow-up's actual token log-probabilities (mean or sum),
  the likelihood the paper's title and abstract describe, identical across backends.
* How the follow-up is scored. The reference's base-model script appends the follow-up as
  a *user* message and scores the template's last tokens; its fine-tuned-model script
  swaps the user and assistant roles (and prepends a request for feedback). Our backends
  score the next *assistant* turn, so we always swap roles — the model speaks as the user,
  the response is the turn it answers, the follow-up is its reply (system messages stay
  first) — without the fine-tuned script's extra opening line. The two lists share that
  context, so what the swap adds to every follow-up cancels in the difference.
* How aspects combine. The reference writes per-aspect follow-up scores and combines them
  outside its code; we average the aspects (above).

Every (prompt, response) context is scored against all follow-ups in one call, so the
backend shares each context's KV cache across them (prompt sharing, as for ``score_cdr``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from prefdata.flr_followups import ASPECTS, NEGATIVE, POSITIVE
from prefdata.logprobs import ResponseScoreStep, load_scorer, model_ref, option_problems, reduced

SWAP = {"user": "assistant", "assistant": "user"}


@dataclass
class ScoreFLRConfig:
    model: str = "smollm2-135m-instruct"
    aspects: list[str] = field(default_factory=lambda: list(ASPECTS))  # the reference's lists to use
    positive: list[str] | None = None  # replaces the aspects' positive follow-ups
    negative: list[str] | None = None  # replaces the aspects' negative follow-ups
    reduction: str = "mean"  # mean | sum of each follow-up's token log-probs
    name: str = "flr"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16


def follow_ups(cfg: ScoreFLRConfig) -> tuple[list[str], list[str]]:
    """The positive and negative follow-ups in use: given lists, else the aspects' lists."""
    pos = list(cfg.positive) if cfg.positive is not None else [f for a in cfg.aspects for f in POSITIVE.get(a, ())]
    neg = list(cfg.negative) if cfg.negative is not None else [f for a in cfg.aspects for f in NEGATIVE.get(a, ())]
    return pos, neg


class ScoreFLR(ResponseScoreStep):
    """Writes ``score_<name>`` per response: positive minus negative follow-up log-likelihood."""

    name = "score_flr"
    Config = ScoreFLRConfig
    version = "2"  # 2: the reference code's follow-up lists (six aspects) as defaults
    lm = None

    def check(self) -> None:
        from prefdata.models import check_backend

        c = self.config
        problems = option_problems(c)
        unknown = [a for a in c.aspects if a not in ASPECTS]
        if unknown or (not c.aspects and (c.positive is None or c.negative is None)):
            problems.append(f"option 'aspects' must list some of {list(ASPECTS)}, got {c.aspects!r}")
        pos, neg = follow_ups(c)
        for key, values in (("positive", pos), ("negative", neg)):
            if not values or any(not isinstance(v, str) or not v.strip() for v in values):
                problems.append(f"option '{key}' must be a non-empty list of non-empty follow-up texts, got {values!r}")
        overlap = sorted(set(pos) & set(neg))
        if overlap:
            problems.append(f"follow-ups {overlap} are in both 'positive' and 'negative'")
        if problems:
            raise ValueError("score_flr: " + "; ".join(problems))
        check_backend(c.backend)

    def models(self) -> list:
        return [model_ref(self.config.model, self.config)]

    def setup(self) -> None:
        self.lm = load_scorer(self.config.model, self.config)

    def teardown(self) -> None:
        self.lm = None

    def scores(self, table: pa.Table) -> np.ndarray:
        if self.lm is None:
            self.setup()
        pos, neg = follow_ups(self.config)
        distinct = list(dict.fromkeys(pos + neg))
        column = {f: k for k, f in enumerate(distinct)}
        contexts = [user_view(p, r) for p, r in zip(table.column("prompt").to_pylist(),
                                                   table.column("response").to_pylist())]
        scored = self.lm.logprobs([ctx for ctx in contexts for _ in distinct], distinct * len(contexts))
        values = reduced(scored, self.config.reduction).reshape(len(contexts), len(distinct))
        return (values[:, [column[f] for f in pos]].mean(1) - values[:, [column[f] for f in neg]].mean(1))


def user_view(prompt: list[dict], response: str) -> list[dict]:
    """The conversation as the user sees it: roles swapped, the response last, so the
    model's next (assistant) turn is the user's follow-up."""
    turns = list(prompt) + [{"role": "assistant", "content": response}]
    return [{"role": SWAP.get(m["role"], m["role"]), "content": m["content"]} for m in turns]
