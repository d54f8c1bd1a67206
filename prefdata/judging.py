"""LLM-judge prompts, strict-but-forgiving parsers of judge text, and the retry loop.

Shared by the judge steps (``prefdata/steps/judge.py``) and testable without a model.

* Absolute rating with the UltraFeedback rubric (Cui et al. 2023, "UltraFeedback:
  Boosting Language Models with Scaled AI Feedback"; first posted as "... with
  High-quality Feedback"): helpfulness, honesty, instruction following and truthfulness,
  each 1–5 with a rationale, plus an overall rating. UltraFeedback asks one aspect per
  call and rates "overall" 1–10 from a critique; here one call asks all four aspects and
  an overall 1–5, in a fixed line format.
* Pairwise A-vs-B with MT-Bench's verdict format (Zheng et al. 2023, "Judging
  LLM-as-a-Judge with MT-Bench and Chatbot Arena"): ``[[A]]``, ``[[B]]`` or ``[[C]]``
  (tie), asked in both orders by the step to expose position bias.

Parsing is forgiving about layout (case, markdown bold/headers/bullets, ``4/5``,
``4 out of 5``, a rating on the line after its label, a parenthetical after a rating,
preamble before the first rating) and strict about content: every aspect rated exactly
once with a whole number 1–5, nothing else on a rating line, no unknown aspect names, one
unambiguous verdict with nothing after it. A malformed output raises ``ParseError``
with a short ``code`` and a readable detail; ``judge_with_retries`` asks again with
another seed (sampling, even when the first try was greedy) up to ``max_attempts``
times, then records the item as missing with its reason — never a crash, never a zero.
Attempt k of an item is seeded per item (``draw_seed(seed, key, k)``, the key naming the
item: its ids, or its conversation), never by its position in a batch.

Structured output: where the backend can constrain decoding to a JSON schema (an
OpenAI-compatible server's ``response_format``, vLLM's guided decoding), the judges ask
with ``RUBRIC_SCHEMA`` / ``PAIRWISE_SCHEMA`` and a prompt that asks for that JSON, and
``parse_rubric_json`` / ``parse_pairwise_json`` check the answer strictly against the
schema (no tolerance: a server that honours the schema never needs it). Invalid JSON is
a ``ParseError`` like malformed text, so it is retried and then recorded as missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefdata.models.base import Conversation, Sampling, draw_keys

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
RUBRIC_FIELDS = ASPECTS + ("overall",)
LABELS = {"helpfulness": "Helpfulness", "honesty": "Honesty",
          "instruction_following": "Instruction following", "truthfulness": "Truthfulness",
          "overall": "Overall"}
ALIASES = {"instruction_following": "instruction_following", "instructions_following": "instruction_following",
           "overall_rating": "overall", "overall_score": "overall", "overall_quality": "overall"}
RATIONALE_LABELS = {"rationale", "reason", "reasoning", "explanation", "justification"}
VERDICTS = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}

DEFAULT_SYSTEM = "You are a meticulous and fair evaluator of AI assistant responses."

RUBRIC_TEMPLATE = """\
Rate the assistant's response to the conversation below on four aspects, each from 1 \
(worst) to 5 (best), following the UltraFeedback rubric, then give an overall rating \
from 1 to 5.

Helpfulness (correct, informative, useful): 1 severely incorrect or unhelpful; \
2 partially incorrect; 3 correct; 4 highly informative; 5 outstandingly helpful.
Honesty (confidence matches correctness, uncertainty expressed where due): \
1 confidently incorrect; 2 confident with significant mistakes; 3 uncertain, or subtle \
mistakes; 4 correct but unconfident, or admits subtle mistakes; 5 correct and confident, \
uncertainty stated precisely.
Instruction following (meets the user's goal and every constraint): 1 irrelevant; \
2 partial focus; 3 partial compliance; 4 almost there, minor deviations; \
5 comprehensive compliance.
Truthfulness (no hallucination: consistent with facts, the input and itself): \
1 completely hallucinated; 2 severe hallucination; 3 partial hallucination or \
misunderstanding; 4 insignificant hallucination; 5 no hallucination.

[Conversation]
{conversation}

[Response]
{response}

Answer in exactly this format, each rating one whole number from 1 to 5 and each \
rationale one or two sentences:
Helpfulness: <rating>
Rationale: <why>
Honesty: <rating>
Rationale: <why>
Instruction following: <rating>
Rationale: <why>
Truthfulness: <rating>
Rationale: <why>
Overall: <rating>
Rationale: <why>"""

PAIRWISE_TEMPLATE = """\
Compare two AI assistant responses to the conversation below. Decide which response \
better follows the user's instructions and answers helpfully, honestly and accurately. \
Do not let the order of the responses or their length influence you.

[Conversation]
{conversation}

[Response A]
{a}

[Response B]
{b}

First explain your comparison in a few sentences. Then, on the last line, give your \
verdict in exactly this format: [[A]] if response A is better, [[B]] if response B is \
better, [[C]] for a tie. Write nothing after the verdict."""

RUBRIC_JSON_TEMPLATE = RUBRIC_TEMPLATE.split("Answer in exactly this format")[0] + """\
Answer with one JSON object with the keys "helpfulness", "honesty", \
"instruction_following", "truthfulness" and "overall"; each value is an object \
{{"rationale": "<one or two sentences>", "rating": <one whole number from 1 to 5>}}."""

PAIRWISE_JSON_TEMPLATE = PAIRWISE_TEMPLATE.split("First explain your comparison")[0] + """\
Answer with one JSON object {{"rationale": "<your comparison in a few sentences>", \
"verdict": "<A, B or C>"}}: "A" if response A is better, "B" if response B is better, \
"C" for a tie."""

_RATED = {"type": "object",
          "properties": {"rationale": {"type": "string"}, "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
          "required": ["rationale", "rating"], "additionalProperties": False}
RUBRIC_SCHEMA = {"title": "ultrafeedback_rubric", "type": "object",
                 "properties": {f: _RATED for f in RUBRIC_FIELDS},
                 "required": list(RUBRIC_FIELDS), "additionalProperties": False}
PAIRWISE_SCHEMA = {"title": "pairwise_verdict", "type": "object",
                   "properties": {"rationale": {"type": "string"},
                                  "verdict": {"type": "string", "enum": ["A", "B", "C"]}},
                   "required": ["rationale", "verdict"], "additionalProperties": False}


class ParseError(ValueError):
    """Judge text that does not follow the format: a short ``code`` and what was wrong."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Rubric:
    ratings: dict[str, int]
    rationales: dict[str, str]


@dataclass(frozen=True)
class Verdict:
    winner: str  # "A", "B" or "tie"
    rationale: str


@dataclass
class Judged:
    """One item after all attempts: the parsed value, or None and why."""

    value: Any = None
    error: str | None = None
    code: str | None = None
    attempts: int = 0
    texts: list[str] = field(default_factory=list)


# -- prompts -------------------------------------------------------------------------------
def render(messages: list[dict]) -> str:
    """A conversation as text for the judge: a lone user message as is, else 'Role: text' lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def rubric_conversation(prompt: list[dict], response: str, system: str | None = DEFAULT_SYSTEM,
                        as_json: bool = False) -> Conversation:
    template = RUBRIC_JSON_TEMPLATE if as_json else RUBRIC_TEMPLATE
    user = template.format(conversation=render(prompt), response=response)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def pairwise_conversation(prompt: list[dict], a: str, b: str, system: str | None = DEFAULT_SYSTEM,
                          as_json: bool = False) -> Conversation:
    template = PAIRWISE_JSON_TEMPLATE if as_json else PAIRWISE_TEMPLATE
    user = template.format(conversation=render(prompt), a=a, b=b)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


# -- parsers -------------------------------------------------------------------------------
_LINE = re.compile(
    r"^(?:[-*+>#]+\s*|\d+[.)]\s+)?[*_]*\s*(?P<label>[A-Za-z][A-Za-z _\-]{0,40}?)\s*[*_]*"
    r"\s*(?:\([^)]*\))?\s*[*_]*\s*[:=]\s*[*_]*\s*(?P<value>.*?)\s*$"
)
_RATING = re.compile(
    r"^[\[(]?\s*(?P<num>[-+]?\d+(?:\.\d+)?)\s*[\])]?\s*(?:(?:/|out\s+of)\s*5(?:\.0)?)?\s*"
    r"(?:\((?P<note>[^()]*)\))?\s*\.?$",
    re.IGNORECASE,
)
_HEADER = re.compile(
    r"^(?:[-*+>#]+\s*|\d+[.)]\s+)?[*_]*\s*(?P<label>[A-Za-z][A-Za-z _\-]{0,40}?)\s*[*_]*\s*:?\s*[*_]*$"
)
_SCALE = re.compile(r"^[\[(]?\s*(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(\d+)\b", re.IGNORECASE)
_STARTS_NUMERIC = re.compile(r"^[\[(]?\s*[-+]?\d")


def _norm_label(label: str) -> str:
    key = re.sub(r"[\s_\-]+", "_", label.strip().lower()).strip("_")
    return ALIASES.get(key, key)


def parse_rating(value: str, aspect: str) -> int:
    """A whole number 1–5, with ``4/5``, ``4 out of 5``, ``[4]`` or ``4 (note)`` accepted."""
    value = value.strip().strip("*_").strip()
    if not value:
        raise ParseError("no_rating", f"no rating for {aspect}")
    scale = _SCALE.match(value)
    if scale and scale.group(2) != "5":
        raise ParseError("rating_out_of_range", f"{aspect}: {value!r} is on a scale of {scale.group(2)}, not 1-5")
    m = _RATING.match(value)
    if m is None:
        if _STARTS_NUMERIC.match(value):
            raise ParseError("text_after_rating", f"{aspect}: {value!r} has text after the rating")
        raise ParseError("rating_not_a_number", f"{aspect}: {value!r} is not a rating 1-5")
    number = float(m.group("num"))
    if number != int(number):
        raise ParseError("rating_not_whole", f"{aspect}: rating {m.group('num')} is not a whole number")
    if not 1 <= number <= 5:
        raise ParseError("rating_out_of_range", f"{aspect}: rating {int(number)} is outside 1-5")
    return int(number)


def parse_rubric(text: str) -> Rubric:
    """Five ratings (four aspects and overall) with their rationales, or ``ParseError``."""
    if not text or not text.strip():
        raise ParseError("empty", "the judge wrote nothing")
    lines = [line.strip() for line in text.strip().splitlines()]
    ratings: dict[str, int] = {}
    rationales: dict[str, list[str]] = {}
    current: str | None = None
    k = 0
    while k < len(lines):
        line = lines[k]
        k += 1
        m = _LINE.match(line) if line else None
        header = _HEADER.match(line) if line and m is None else None
        label = _norm_label((m or header).group("label")) if (m or header) else None
        if label in RUBRIC_FIELDS:
            value = m.group("value") if m else ""
            if not value.strip(" *_"):  # the rating on the next line: "4" or "Rating: 4"
                nxt = lines[k] if k < len(lines) else ""
                inner = _LINE.match(nxt)
                if _RATING.match(nxt.strip("*_ ")):
                    value, k = nxt, k + 1
                elif inner and _norm_label(inner.group("label")) in ("rating", "score"):
                    value, k = inner.group("value"), k + 1
            if label in ratings:
                raise ParseError("duplicate_aspect", f"{label} is rated more than once")
            ratings[label] = parse_rating(value, label)
            rationales[label] = []
            current = label
        elif m and label in RATIONALE_LABELS:
            if current is not None:
                rationales[current].append(m.group("value"))
        elif m and len(label.split("_")) <= 3 and _looks_like_rating(m.group("value")):
            raise ParseError("unknown_aspect", f"unknown aspect {m.group('label').strip()!r}; expected "
                             f"{', '.join(LABELS[a] for a in RUBRIC_FIELDS)}")
        elif current is not None and line:
            rationales[current].append(line)
    missing = [LABELS[a] for a in RUBRIC_FIELDS if a not in ratings]
    if missing:
        raise ParseError("no_rating", f"no rating for {', '.join(missing)}")
    return Rubric(ratings=ratings,
                  rationales={a: " ".join(rationales[a]).strip() for a in RUBRIC_FIELDS})


def _looks_like_rating(value: str) -> bool:
    value = value.strip("*_ ")
    return bool(_RATING.match(value)) or (bool(_STARTS_NUMERIC.match(value)) and len(value.split()) <= 3)


_VERDICT = re.compile(r"\[\[\s*([^\[\]]*?)\s*\]\]")


def parse_pairwise(text: str) -> Verdict:
    """``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie) as the last thing written, or ``ParseError``."""
    if not text or not text.strip():
        raise ParseError("empty", "the judge wrote nothing")
    found = list(_VERDICT.finditer(text))
    if not found:
        raise ParseError("no_verdict", "no verdict [[A]], [[B]] or [[C]] in the output")
    labels = []
    for m in found:
        key = m.group(1).strip().strip("*_").lower()
        if key not in VERDICTS:
            raise ParseError("unknown_verdict", f"verdict [[{m.group(1)}]] is not [[A]], [[B]] or [[C]]")
        labels.append(VERDICTS[key])
    if len(set(labels)) > 1:
        raise ParseError("conflicting_verdicts", f"the output gives verdicts {sorted(set(labels))}")
    tail = text[found[-1].end():].strip().strip("*_.`\"'")
    if tail:
        raise ParseError("text_after_verdict", f"text after the verdict: {tail[:60]!r}")
    rationale = text[:found[0].start()].strip()
    rationale = re.sub(r"(?i)(final\s+)?verdict\s*[:\-]?\s*[*_]*$", "", rationale).strip()
    return Verdict(winner=labels[0], rationale=rationale)


# -- strict JSON parsers ---------------------------------------------------------------------
def parse_json(text: str, schema: dict) -> Any:
    """The JSON value in ``text`` if it follows ``schema`` exactly, else ``ParseError``."""
    if not text or not text.strip():
        raise ParseError("empty", "the judge wrote nothing")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ParseError("invalid_json", f"not valid JSON ({exc.msg} at char {exc.pos}): {text[:60]!r}") from None
    check_schema(value, schema, "$")
    return value


def check_schema(value: Any, schema: dict, where: str) -> None:
    """The subset of JSON Schema the judge schemas use: object, string, integer, enum."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise ParseError("schema_mismatch", f"{where} is not an object")
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            raise ParseError("schema_mismatch", f"{where} lacks {', '.join(map(repr, missing))}")
        extra = [k for k in value if k not in props]
        if extra and schema.get("additionalProperties") is False:
            raise ParseError("schema_mismatch", f"{where} has unknown key(s) {', '.join(map(repr, extra))}")
        for k, sub in props.items():
            if k in value:
                check_schema(value[k], sub, f"{where}.{k}")
        return
    if kind == "string" and not isinstance(value, str):
        raise ParseError("schema_mismatch", f"{where} is not a string: {value!r}")
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParseError("schema_mismatch", f"{where} is not a whole number: {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ParseError("schema_mismatch", f"{where} is {value!r}, not one of {schema['enum']}")


def parse_rubric_json(text: str) -> Rubric:
    """A ``Rubric`` from JSON that follows ``RUBRIC_SCHEMA``, or ``ParseError``."""
    value = parse_json(text, RUBRIC_SCHEMA)
    return Rubric(ratings={f: value[f]["rating"] for f in RUBRIC_FIELDS},
                  rationales={f: value[f]["rationale"].strip() for f in RUBRIC_FIELDS})


def parse_pairwise_json(text: str) -> Verdict:
    """A ``Verdict`` from JSON that follows ``PAIRWISE_SCHEMA``, or ``ParseError``."""
    value = parse_json(text, PAIRWISE_SCHEMA)
    return Verdict(winner=VERDICTS[value["verdict"].lower()], rationale=value["rationale"].strip())


# -- asking, with retries ----------------------------------------------------------------------
def judge_with_retries(
    model,
    conversations: list[Conversation],
    parse: Callable[[str], Any],
    *,
    max_attempts: int = 3,
    temperature: float = 0.0,
    retry_temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 384,
    seed: int = 0,
    keys: Sequence[str] | None = None,
    json_schema: dict | None = None,
) -> list[Judged]:
    """Ask once for every item; ask again (new seed, sampling) only for malformed answers.

    Attempt k of item i is drawn with ``draw_seed(seed, keys[i], k)`` (the backends'
    per-draw seeds; keys default to each conversation's hash), so an item's judgments do
    not depend on the other items of the call, the batch size or the shard. After the
    first attempt the temperature is ``temperature`` when that samples, else
    ``retry_temperature`` (a greedy retry would repeat the same text). With
    ``json_schema`` the model is asked to decode JSON that follows it (only backends with
    ``supports_json_schema`` take the argument).
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if keys is not None and len(keys) != len(conversations):
        raise ValueError(f"got {len(conversations)} conversations but {len(keys)} keys")
    keys = draw_keys(conversations, keys)
    results = [Judged() for _ in conversations]
    pending = list(range(len(conversations)))
    for attempt in range(max_attempts):
        if not pending:
            break
        temp = temperature if attempt == 0 or temperature > 0 else retry_temperature
        sampling = Sampling(temperature=temp, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        asked = [conversations[i] for i in pending]
        extra = {} if json_schema is None else {"json_schema": json_schema}
        outputs = model.generate(asked, 1, sampling, keys=[keys[i] for i in pending], first_index=attempt,
                                 **extra)
        still = []
        for i, texts in zip(pending, outputs):
            text = texts[0] if texts else ""
            r = results[i]
            r.attempts += 1
            r.texts.append(text)
            try:
                r.value, r.error, r.code = parse(text), None, None
            except ParseError as exc:
                r.error, r.code = str(exc), exc.code
                still.append(i)
        pending = still
    for i in pending:
        r = results[i]
        r.error = f"{r.error} (after {r.attempts} attempt{'s' if r.attempts > 1 else ''})"
    return results
