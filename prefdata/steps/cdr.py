"""Score responses by a customised density ratio of a strong over a weak model.

Xu et al. 2024, "CDR: Customizable Density Ratios of Strong-over-weak LLMs for Preference
Annotation": score = log p_strong(y|x') − log p_weak(y|x'), summed over response tokens
(the reference code's choice; ``reduction: mean`` divides by the token count, eos
included). Prompt tokens never count: the backend scores response tokens only.

Customisation, chosen per domain (a ``domain_column`` such as ``domain``; rows without
one, or whose domain has no entry, use ``default_domain``):

* ``criteria``: a system prompt — one string for every domain, or a mapping
  ``domain -> text``;
* ``exemplars``: in-context examples per domain, each ``{good, bad, explanation}`` (and
  optionally the ``prompt`` they answer), rendered after the criteria in the system
  message.

In the reference code both models read the same customised input x'; that is the default
here when strong and weak differ. With one model (the embedded default) the ratio comes
from the customisation on the strong side only — the same weights with and without it —
and dataset cards say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from prefdata.step import MapStep

DEFAULT_CRITERIA = (
    "You are a helpful, honest and harmless assistant. Answer the user's request "
    "accurately and concisely, follow their instructions exactly, and say so when you "
    "do not know."
)
EXEMPLAR_KEYS = {"good", "bad", "explanation", "prompt"}


@dataclass
class ScoreCDRConfig:
    strong: str = "smollm2-135m-instruct"
    weak: str | None = None
    criteria: str | dict[str, str] | None = DEFAULT_CRITERIA
    exemplars: dict[str, list[dict[str, str]]] | None = None
    domain_column: str | None = None
    default_domain: str = "default"
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
    strong = weak = None

    def check(self) -> None:
        from prefdata.models import check_backend

        c = self.config
        if c.reduction not in ("sum", "mean"):
            raise ValueError(f"score_cdr: reduction must be 'sum' or 'mean', got '{c.reduction}'")
        if c.batch_size < 1:
            raise ValueError(f"score_cdr: batch_size must be at least 1, got {c.batch_size}")
        if isinstance(c.criteria, dict):
            bad = [k for k, v in c.criteria.items() if not isinstance(v, str)]
            if bad:
                raise ValueError(f"score_cdr: criteria for domain(s) {bad} must be strings")
        _check_exemplars(c.exemplars)
        if self.same_model and (self.criteria_on_weak or not self._customises_default()):
            raise ValueError(
                "score_cdr: with one model (weak unset or equal to strong) the ratio needs a "
                "customisation on the strong side only; set 'criteria' (or criteria/exemplars for "
                f"the default domain '{c.default_domain}') and leave criteria_on_weak false"
            )
        check_backend(c.backend)

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        names = [c.strong] if self.same_model else [c.strong, c.weak]
        return [ModelRef(m, backend=c.backend, device=c.device, dtype=c.dtype) for m in names]

    @property
    def same_model(self) -> bool:
        return self.config.weak is None or self.config.weak == self.config.strong

    @property
    def criteria_on_weak(self) -> bool:
        c = self.config
        return (not self.same_model) if c.criteria_on_weak is None else c.criteria_on_weak

    def _customises_default(self) -> bool:
        c = self.config
        return bool(customisation(c.criteria, c.exemplars, c.default_domain, c.default_domain))

    def input_columns(self) -> list[str]:
        # The domain column usually comes from the prompt file's extra columns, which
        # load_prompts cannot declare before reading the file: it is checked in process().
        return ["prompt", "response"]

    def output_columns(self, columns: list[str]) -> list[str]:
        column = f"score_{self.config.name}"
        return [c for c in columns if c != column] + [column]

    def setup(self) -> None:
        from prefdata.models import load_model

        c = self.config
        kw = dict(backend=c.backend, device=c.device, dtype=c.dtype, batch_size=c.batch_size)
        self.strong = load_model(c.strong, **kw)
        self.weak = self.strong if self.same_model else load_model(c.weak, **kw)

    def teardown(self) -> None:
        self.strong = self.weak = None

    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        column = f"score_{c.name}"
        if column in table.column_names:
            table = table.drop_columns([column])
        if table.num_rows == 0:
            return table.append_column(column, pa.array([], pa.float64()))
        if self.strong is None:
            self.setup()
        prompts = table.column("prompt").to_pylist()
        responses = table.column("response").to_pylist()
        if c.domain_column and c.domain_column not in table.column_names:
            raise ValueError(
                f"score_cdr: domain_column '{c.domain_column}' is not in the table (columns: "
                f"{table.column_names}); add it to the prompt file or unset domain_column"
            )
        domains = (table.column(c.domain_column).to_pylist() if c.domain_column
                   else [None] * table.num_rows)
        systems = {}
        strong_in = []
        for p, d in zip(prompts, domains):
            d = c.default_domain if d is None else str(d)
            if d not in systems:
                systems[d] = customisation(c.criteria, c.exemplars, d, c.default_domain)
            strong_in.append(with_criteria(p, systems[d]))
        weak_in = strong_in if self.criteria_on_weak else prompts
        if self.weak is self.strong:  # one call: fuller batches
            both = self.strong.logprobs(strong_in + weak_in, responses + responses)
            strong, weak = both[:len(responses)], both[len(responses):]
        else:
            strong = self.strong.logprobs(strong_in, responses)
            weak = self.weak.logprobs(weak_in, responses)
        field = "sum" if c.reduction == "sum" else "mean"
        scores = [getattr(s, field) - getattr(w, field) for s, w in zip(strong, weak)]
        return table.append_column(column, pa.array(scores, pa.float64()))


def customisation(criteria, exemplars, domain: str, default_domain: str) -> str | None:
    """The system text for a domain: its criteria, then its exemplars (default as fallback)."""
    def pick(mapping):
        if mapping is None or isinstance(mapping, str):
            return mapping
        return mapping.get(domain, mapping.get(default_domain))

    parts = [pick(criteria) or ""]
    shots = pick(exemplars) or []
    if shots:
        parts.append(render_exemplars(shots))
    text = "\n\n".join(p for p in parts if p)
    return text or None


def render_exemplars(exemplars: list[dict[str, str]]) -> str:
    """In-context examples as plain text: what a good and a bad answer look like, and why."""
    lines = ["Examples of a good and a bad answer:"]
    for k, ex in enumerate(exemplars, 1):
        lines.append(f"\nExample {k}")
        if ex.get("prompt"):
            lines.append(f"Request: {ex['prompt']}")
        lines.append(f"Good answer: {ex['good']}")
        lines.append(f"Bad answer: {ex['bad']}")
        if ex.get("explanation"):
            lines.append(f"Why: {ex['explanation']}")
    return "\n".join(lines)


def with_criteria(messages: list[dict], criteria: str | None) -> list[dict]:
    """Put the criteria in the system message (before any system text the prompt has)."""
    if not criteria:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{criteria}\n\n{messages[0]['content']}"}] + list(messages[1:])
    return [{"role": "system", "content": criteria}] + list(messages)


def _check_exemplars(exemplars: Any) -> None:
    if exemplars is None:
        return
    if not isinstance(exemplars, dict):
        raise ValueError("score_cdr: exemplars must map a domain to a list of {good, bad, explanation}")
    for domain, shots in exemplars.items():
        if not isinstance(shots, list):
            raise ValueError(f"score_cdr: exemplars for domain '{domain}' must be a list")
        for k, ex in enumerate(shots):
            where = f"score_cdr: exemplars['{domain}'][{k}]"
            if not isinstance(ex, dict):
                raise ValueError(f"{where} must be a mapping with good, bad and explanation")
            missing = [key for key in ("good", "bad") if not isinstance(ex.get(key), str) or not ex[key].strip()]
            unknown = sorted(set(ex) - EXEMPLAR_KEYS)
            if missing or unknown:
                raise ValueError(f"{where}: missing {missing} / unknown keys {unknown}; "
                                 f"allowed keys: {sorted(EXEMPLAR_KEYS)}")
