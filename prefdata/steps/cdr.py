"""Score responses by a customised density ratio of a strong over a weak model.

Xu et al. 2024, "CDR: Customizable Density Ratios of Strong-over-weak LLMs for Preference
Annotation": score = log p_strong(y|x) − log p_weak(y|x), summed over response tokens
(the reference code's choice; ``reduction: mean`` divides by the token count). In the
reference code both models read the same customised input (a criteria system prompt);
that is the default here when strong and weak differ. With one model (the embedded
default) the ratio comes from the criteria prompt on the strong side only — the same
weights with and without the criteria — and dataset cards say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefdata.step import MapStep

DEFAULT_CRITERIA = (
    "You are a helpful, honest and harmless assistant. Answer the user's request "
    "accurately and concisely, follow their instructions exactly, and say so when you "
    "do not know."
)


@dataclass
class ScoreCDRConfig:
    strong: str = "smollm2-135m-instruct"
    weak: str | None = None
    criteria: str | None = DEFAULT_CRITERIA
    criteria_on_weak: bool | None = None
    reduction: str = "sum"
    name: str = "cdr"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16


class ScoreCDR(MapStep):
    """Writes ``score_<name>`` per response (strong minus weak response log-probability)."""

    name = "score_cdr"
    Config = ScoreCDRConfig

    def check(self) -> None:
        c = self.config
        if c.reduction not in ("sum", "mean"):
            raise ValueError(f"score_cdr: reduction must be 'sum' or 'mean', got '{c.reduction}'")
        if self.same_model and (not c.criteria or self.criteria_on_weak):
            raise ValueError(
                "score_cdr: with one model (weak unset or equal to strong) the ratio needs a criteria "
                "prompt on the strong side only; set 'criteria' and leave criteria_on_weak false"
            )

    @property
    def same_model(self) -> bool:
        return self.config.weak is None or self.config.weak == self.config.strong

    @property
    def criteria_on_weak(self) -> bool:
        c = self.config
        return (not self.same_model) if c.criteria_on_weak is None else c.criteria_on_weak

    def input_columns(self) -> list[str]:
        return ["prompt", "response"]

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(columns) + [f"score_{self.config.name}"]

    def setup(self) -> None:
        from prefdata.models import load_model

        c = self.config
        kw = dict(backend=c.backend, device=c.device, dtype=c.dtype)
        self.strong = load_model(c.strong, **kw)
        self.weak = self.strong if self.same_model else load_model(c.weak, **kw)

    def teardown(self) -> None:
        self.strong = self.weak = None

    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        prompts = table.column("prompt").to_pylist()
        responses = table.column("response").to_pylist()
        strong_in = [with_criteria(p, c.criteria) for p in prompts]
        weak_in = strong_in if self.criteria_on_weak else prompts
        strong = self.strong.logprobs(strong_in, responses)
        weak = self.weak.logprobs(weak_in, responses)
        field = "sum" if c.reduction == "sum" else "mean"
        scores = [getattr(s, field) - getattr(w, field) for s, w in zip(strong, weak)]
        column = f"score_{c.name}"
        if column in table.column_names:
            table = table.drop_columns([column])
        return table.append_column(column, pa.array(scores, pa.float64()))


def with_criteria(messages: list[dict], criteria: str | None) -> list[dict]:
    """Put the criteria in the system message (before any system text the prompt has)."""
    if not criteria:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{criteria}\n\n{messages[0]['content']}"}] + list(messages[1:])
    return [{"role": "system", "content": criteria}] + list(messages)
