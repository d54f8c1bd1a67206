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

Options that reproduce the reference implementation (gx-ai-architect/CDR-preference-
annotation) where it differs from the defaults (which stay as they were):

* ``exemplar_placement: user`` puts the exemplars in the last user turn, before the
  request, which then ends with a "Good Assistant:" cue, as the reference's few-shot
  prompts do (``system``, the default, renders them in the system message). With
  ``exemplars_per_prompt: k`` each prompt gets k of its domain's exemplars drawn at random
  (the reference draws one few-shot block per example from a per-domain pool), seeded by
  ``exemplar_seed`` and the prompt, so the draw does not depend on the shard.
* ``criteria_with_system: replace`` replaces a prompt's own system message with the
  criteria, as the reference does; ``prepend`` (the default) keeps it after the criteria.
* ``truncate: keep_start`` cuts, as the reference does, the response to its first
  ``max_response_tokens`` (1,024) tokens and the templated prompt to its last
  ``max_prompt_tokens`` (1,024), removing the earliest message text first; ``error`` (the
  default) scores everything and leaves a too-long item to the backend's context check.
  Truncation needs the model's tokenizer (transformers or vLLM backends).

Verified against the reference repository (gx-ai-architect/CDR-preference-annotation):
``src/dpo_vllm.py`` scores strong minus weak as the *sum* of response-token log-probs, both
models reading the same customised text (an end-of-sequence token appended when the
template leaves none); ``scripts/run_bon_scoring.py`` (``load_ibm_bon_data``) replaces an
existing system message with the criteria or adds one, and for few-shot prompts rewrites
the last user message as block + newline + request + a "Good Assistant:" line, the block
drawn once per prompt from its domain's pool; ``src/utils.py`` (``truncate_prompt``) keeps
the last ``max_prompt_length`` tokens of the templated prompt and the first
``max_output_length`` of the response, both 1,024 by the script's defaults. Differences
that remain: a reference pool entry is a ready-written text (its own lead-in, then
"User:" / "Good Assistant:" / "Bad Assistant:" / "Bad Assistant Response Explanation:"
transcripts), drawn with Python's unseeded ``random.choice``; ours renders structured
exemplars under our own lead-in and "Explanation:" label and draws k of them with a seed,
the same in every shard. The reference's ``vanilla_domain`` mode (no customisation for its
chat domain) is a ``criteria`` mapping that gives that domain an empty string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from prefdata.logprobs import ResponseScoreStep, load_scorer, model_ref, option_problems, reduced
from prefdata.schema import stable_hash

DEFAULT_CRITERIA = (
    "You are a helpful, honest and harmless assistant. Answer the user's request "
    "accurately and concisely, follow their instructions exactly, and say so when you "
    "do not know."
)
EXEMPLAR_KEYS = {"good", "bad", "explanation", "prompt"}
CHOICES = {"exemplar_placement": ("system", "user"), "criteria_with_system": ("prepend", "replace"),
           "truncate": ("error", "keep_start")}


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
    exemplar_placement: str = "system"  # system | user (reference: few-shot in the user turn)
    exemplars_per_prompt: int | None = None  # user placement: k exemplars drawn per prompt (default all)
    exemplar_seed: int = 0
    criteria_with_system: str = "prepend"  # prepend | replace (reference: replace)
    truncate: str = "error"  # error | keep_start (reference: 1,024 prompt / response tokens)
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 1024


class ScoreCDR(ResponseScoreStep):
    """Writes ``score_<name>`` per response (strong minus weak response log-probability)."""

    name = "score_cdr"
    Config = ScoreCDRConfig
    strong = weak = None

    def check(self) -> None:
        from prefdata.models import check_backend

        c = self.config
        problems = option_problems(c)
        if problems:
            raise ValueError("score_cdr: " + "; ".join(problems))
        if isinstance(c.criteria, dict):
            bad = [k for k, v in c.criteria.items() if not isinstance(v, str)]
            if bad:
                raise ValueError(f"score_cdr: criteria for domain(s) {bad} must be strings")
        _check_exemplars(c.exemplars)
        _check_reference_options(c)
        if self.same_model and (self.criteria_on_weak or not self._customises_default()):
            raise ValueError(
                "score_cdr: with one model (weak unset or equal to strong) the ratio needs a "
                "customisation on the strong side only; set 'criteria' (or criteria/exemplars for "
                f"the default domain '{c.default_domain}') and leave criteria_on_weak false"
            )
        check_backend(c.backend)

    def models(self) -> list:
        c = self.config
        return [model_ref(m, c) for m in ([c.strong] if self.same_model else [c.strong, c.weak])]

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

    # input_columns: prompt and response. The domain column usually comes from the prompt
    # file's extra columns, which load_prompts cannot declare before reading the file: it
    # is checked in scores().

    def setup(self) -> None:
        c = self.config
        self.strong = load_scorer(c.strong, c)
        self.weak = self.strong if self.same_model else load_scorer(c.weak, c)

    def teardown(self) -> None:
        self.strong = self.weak = None

    def scores(self, table: pa.Table) -> np.ndarray:
        c = self.config
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
        strong_in = self._customised(prompts, domains)
        weak_in = strong_in if self.criteria_on_weak else prompts
        if c.truncate == "keep_start":
            tok = _tokenizer(self.strong)
            responses = [keep_first_tokens(tok, r, c.max_response_tokens) for r in responses]
            strong_in = [keep_last_tokens(tok, m, c.max_prompt_tokens) for m in strong_in]
            weak_in = strong_in if self.criteria_on_weak else [
                keep_last_tokens(_tokenizer(self.weak), m, c.max_prompt_tokens) for m in weak_in]
        if self.weak is self.strong:  # one call: fuller batches
            both = self.strong.logprobs(strong_in + weak_in, responses + responses)
            strong, weak = both[:len(responses)], both[len(responses):]
        else:
            strong = self.strong.logprobs(strong_in, responses)
            weak = self.weak.logprobs(weak_in, responses)
        return reduced(strong, c.reduction) - reduced(weak, c.reduction)

    def _customised(self, prompts: list[list[dict]], domains: list) -> list[list[dict]]:
        """Each prompt with its domain's criteria (system) and exemplars (system or user turn)."""
        c = self.config
        in_user = c.exemplar_placement == "user"
        systems: dict[str, str | None] = {}
        out = []
        for p, d in zip(prompts, domains):
            d = c.default_domain if d is None else str(d)
            if d not in systems:
                systems[d] = customisation(c.criteria, None if in_user else c.exemplars, d, c.default_domain)
            messages = with_criteria(p, systems[d], c.criteria_with_system)
            if in_user:
                shots = drawn_exemplars(c, d, p)
                messages = with_user_exemplars(messages, shots) if shots else messages
            out.append(messages)
        return out


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


def with_criteria(messages: list[dict], criteria: str | None, with_system: str = "prepend") -> list[dict]:
    """Put the criteria in the system message: before any system text the prompt has
    (``prepend``), or instead of it (``replace``, as the reference code does)."""
    if not criteria:
        return messages
    if messages and messages[0]["role"] == "system":
        text = criteria if with_system == "replace" else f"{criteria}\n\n{messages[0]['content']}"
        return [{"role": "system", "content": text}] + list(messages[1:])
    return [{"role": "system", "content": criteria}] + list(messages)


def drawn_exemplars(cfg: ScoreCDRConfig, domain: str, prompt: list[dict]) -> list[dict]:
    """The domain's exemplars (default domain as fallback); k of them drawn per prompt when
    ``exemplars_per_prompt`` is set, seeded by ``exemplar_seed`` and the prompt's content."""
    ex = cfg.exemplars or {}
    shots = ex.get(domain, ex.get(cfg.default_domain)) or []
    k = cfg.exemplars_per_prompt
    if k is None or k >= len(shots):
        return list(shots)
    seed = int(stable_hash([cfg.exemplar_seed, [[m["role"], m["content"]] for m in prompt]], length=15), 16)
    picked = np.random.default_rng(seed).choice(len(shots), size=k, replace=False)
    return [shots[i] for i in sorted(picked)]


def render_user_exemplars(exemplars: list[dict[str, str]], request: str) -> str:
    """Few-shot exemplars as a transcript in the user turn, then the request and the cue
    the reference's few-shot prompts end with."""
    lines = ["Examples of a good and a bad answer:"]
    for ex in exemplars:
        if ex.get("prompt"):
            lines += ["User:", ex["prompt"]]
        lines += ["Good Assistant:", ex["good"], "Bad Assistant:", ex["bad"]]
        if ex.get("explanation"):
            lines += ["Explanation:", ex["explanation"]]
        lines.append("")
    lines += ["User:", request, "Good Assistant:"]
    return "\n".join(lines)


def with_user_exemplars(messages: list[dict], exemplars: list[dict]) -> list[dict]:
    """The last user message rewritten to carry the exemplars before the request."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return messages
    out = list(messages)
    out[last] = {"role": "user", "content": render_user_exemplars(exemplars, messages[last]["content"])}
    return out


def _tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"score_cdr: option 'truncate: keep_start' needs the model's tokenizer, which the "
                         f"backend of '{getattr(model, 'name', model)}' does not expose (an API model); "
                         "use the transformers or vllm backend, or truncate: error")
    return tok


def keep_first_tokens(tok, text: str, limit: int) -> str:
    """The text cut to its first ``limit`` tokens (unchanged when it fits)."""
    ids = tok(text, add_special_tokens=False).input_ids
    return text if len(ids) <= limit else tok.decode(ids[:limit])


def keep_last_tokens(tok, messages: list[dict], limit: int) -> list[dict]:
    """The conversation cut so that its template fits ``limit`` tokens, earliest text first
    (the reference keeps the last tokens of the templated prompt): earlier messages are
    dropped whole when their text is gone; the last message keeps its end."""
    messages = [dict(m) for m in messages]
    for _ in range(16):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        excess = len(ids["input_ids"] if hasattr(ids, "keys") else ids) - limit
        if excess <= 0:
            return messages
        first = tok(messages[0]["content"], add_special_tokens=False).input_ids
        if len(messages) > 1 and len(first) <= excess:
            messages = messages[1:]
        elif len(first) == 0:
            raise ValueError(f"score_cdr: the chat template alone needs more than max_prompt_tokens={limit} tokens; "
                             "raise max_prompt_tokens")
        else:
            messages[0]["content"] = tok.decode(first[min(excess, len(first)):])
    return messages


def _check_reference_options(c: ScoreCDRConfig) -> None:
    problems = [f"option '{k}' must be one of {list(v)}, got {getattr(c, k)!r}"
                for k, v in CHOICES.items() if getattr(c, k) not in v]
    if c.exemplars_per_prompt is not None and (c.exemplars_per_prompt < 1 or c.exemplar_placement != "user"):
        problems.append("option 'exemplars_per_prompt' must be >= 1 and applies to exemplar_placement: user")
    if c.max_prompt_tokens < 16 or c.max_response_tokens < 1:
        problems.append(f"options max_prompt_tokens (>= 16) / max_response_tokens (>= 1) are too small: "
                        f"{c.max_prompt_tokens} / {c.max_response_tokens}")
    if problems:
        raise ValueError("score_cdr: " + "; ".join(problems))


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


def choice_note(label: str, config: dict) -> str:
    """One dataset-card sentence naming a score_cdr step's choices where the reference code differs."""
    c = {f.name: f.default for f in __import__("dataclasses").fields(ScoreCDRConfig)} | dict(config)
    placement = ("in the last user turn" + (f", {c['exemplars_per_prompt']} drawn per prompt (seed "
                                            f"{c['exemplar_seed']})" if c.get("exemplars_per_prompt") else "")
                 if c["exemplar_placement"] == "user" else "in the system message")
    system = ("replace" if c["criteria_with_system"] == "replace" else "are put before") + " a prompt's own system message"
    cut = (f"prompts cut to their last {c['max_prompt_tokens']} and responses to their first "
           f"{c['max_response_tokens']} tokens" if c["truncate"] == "keep_start" else "nothing truncated")
    return (f"{label}: exemplars {placement}; criteria {system}; {cut} (the CDR reference code puts few-shot "
            "exemplars in the user turn, replaces the system message and truncates prompt and response to 1,024 "
            "tokens each).")
