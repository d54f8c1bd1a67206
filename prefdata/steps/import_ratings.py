"""Import rated completions (UltraFeedback style) as a RESPONSE table, keeping the ratings.

Cui et al. 2023, "UltraFeedback: Boosting Language Models with Scaled AI Feedback": each
row holds an instruction and a list of completions, each with the ``model`` that wrote it,
its ``response`` and ``annotations`` — per aspect (helpfulness, honesty,
instruction_following, truthfulness) a ``Rating`` ("1"–"5", or "N/A") and a
``Rationale``; rows may also carry ``fine-grained_score`` and ``overall_score``. A plain
number per aspect (``{"helpfulness": 4}``) is accepted too.

One response row per completion: ``generator`` = model name, ``sample_index`` = position
in the list, ``score_original_<aspect>`` (float, null for N/A) and
``rationale_original_<aspect>``, ``score_original_overall`` when the row has
``overall_score``, and ``score_original`` = the row's ``fine-grained_score`` or else the
mean of the aspect ratings present, ``label_source = "original"``. ``build_pairs`` with
``score: score_original`` (or any aspect) then pairs them as UltraFeedback-binarized does.

A bad row (no instruction, no completion list) or a bad completion (empty response,
rating that is not a number) raises with file/row/field, or with ``on_error: quarantine``
is set aside with a ``reason``; a row whose completions are all bad is quarantined too.
The file is read in batches by ``prefdata.readers`` (strict: a broken CSV quote, a bad
JSON line or a duplicated key is reported by its line). Literal chat-control text
(``<|im_start|>`` …) in an instruction or a response is counted in ``control_text_rows``
(rows) and handled by ``special_tokens`` (``keep`` | ``escape`` | ``quarantine``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator

import pyarrow as pa

from prefdata.control_text import ControlText
from prefdata.readers import (QUARANTINE, BadRow, FileOptions, FileSource, Rows, quarantine_row, raise_first,
                              text_or_json)
from prefdata.schema import MESSAGES, RESPONSE, ROLES, SAMPLING, prompt_id, response_id
from prefdata.step import Output

MISSING_RATING = {"n/a", "na", "none", "", "-"}


@dataclass
class ImportRatingsConfig(FileOptions):
    prompt_field: str = "instruction"
    completions_field: str = "completions"
    response_field: str = "response"
    model_field: str = "model"
    annotations_field: str = "annotations"
    aspects: list[str] | None = None  # default: every aspect found


class ImportRatings(FileSource):
    """Read instruction + rated completions rows into one response row per completion."""

    name: ClassVar[str] = "import_ratings"
    version: ClassVar[str] = "2"  # 2: strict readers, control-text count and policy
    Config: ClassVar[type] = ImportRatingsConfig

    def output_columns(self, columns: list[str]) -> list[str]:
        aspects = [f"score_original_{_slug(a)}" for a in self.config.aspects or []]
        return list(RESPONSE.names) + ["score_original", "label_source", "original_row"] + aspects

    def convert_batches(self, batches: Iterable[Rows]) -> Iterator[Output]:
        return rating_batches(batches, self.config)

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """``score_original_overall`` before the aspect columns, as one table would have it
        (a batch without overall scores, or aspects first seen in a later batch, change the
        order the batches' schemas unify in)."""
        names = list(RESPONSE.names) + ["score_original", "label_source", "original_row", "score_original_overall"]
        first = [schema.field(n) for n in names if n in schema.names]
        return pa.schema(first + [f for f in schema if f.name not in names], metadata=schema.metadata)


def rating_batches(batches: Iterable[Rows], c: ImportRatingsConfig) -> Iterator[Output]:
    """One Output per batch read (its response rows and bad rows), then the counts."""
    counts, path = Counter(rows_read=0, imported=0), None
    quarantined, responses, missing = Counter(), 0, 0
    control = ControlText(c.special_tokens)
    for rows in batches:
        path = rows.path
        for name in (c.prompt_field, c.completions_field):
            if name not in rows.columns and len(rows):
                raise ValueError(f"{rows.path}: no column '{name}' (columns: {rows.columns}); set "
                                 f"`prompt_field:` / `completions_field:`")
        out, bad = [], []
        more = _batch(rows, c, control, counts, out, bad)
        if bad and c.on_error == "raise":
            raise_first(bad)
        for row in bad:
            quarantined[f"quarantined_{row['reason']}"] += 1
        responses += len(out)
        missing += sum(v is None for r in out for v in r["ratings"].values())
        yield Output(_table(out, c), pa.Table.from_pylist(bad, schema=QUARANTINE) if bad else None)
        if not more:
            break
    if counts["rows_read"] == 0:
        raise ValueError(f"{path}: the file holds no rows; give a file with at least one instruction")
    counts.update(quarantined)
    counts["responses"] = responses
    counts["ratings_missing"] = missing
    if not counts["control_text_rows"]:
        del counts["control_text_rows"]
    yield Output(pa.table({}), None, dict(counts))


def _batch(rows: Rows, c: ImportRatingsConfig, control: ControlText, counts: Counter, out: list, bad: list) -> bool:
    """Add one batch's responses to ``out`` (bad rows to ``bad``); False once ``limit`` prompts are in."""
    prompts, completions, sources = rows.column(c.prompt_field), rows.column(c.completions_field), rows.column("source")
    csv_cell = text_or_json if rows.fmt == "csv" else (lambda v: v)
    for number, i, raw, exc in rows.events():
        counts["rows_read"] += 1
        if exc is not None:
            bad.append(quarantine_row(rows.path, rows.fmt, number, raw, exc))
            continue
        try:
            prompt, found = control.messages(_prompt(csv_cell(prompts[i]), c.prompt_field), c.prompt_field)
            items = _items(csv_cell(completions[i]), c)
        except BadRow as exc:
            bad.append(quarantine_row(rows.path, rows.fmt, number, rows.raw(i), exc))
            continue
        good = []
        for k, item in enumerate(items):
            try:
                completion = _completion(item, k, c)
                text, hit = control.text(completion[2], f"{c.completions_field}[{k}].{c.response_field}")
            except BadRow as exc:
                bad.append(quarantine_row(rows.path, rows.fmt, number, json.dumps(item, ensure_ascii=False,
                                                                                  default=str), exc))
                continue
            good.append((*completion[:2], text, *completion[3:]))
            found |= hit
        if not good:
            bad.append(quarantine_row(rows.path, rows.fmt, number, rows.raw(i), BadRow(
                "no_valid_completions", c.completions_field, "every completion is bad")))
            continue
        counts["imported"] += 1
        counts["control_text_rows"] += found
        pid = prompt_id(prompt)
        source = c.source or (sources[i] if isinstance(sources[i], str) else rows.path.name)
        for k, model, text, ratings, rationales, fine_k, overall_k in good:
            ratings_present = [v for v in ratings.values() if v is not None]
            score = fine_k
            if score is None:
                score = sum(ratings_present) / len(ratings_present) if ratings_present else None
            out.append({"prompt_id": pid, "prompt": prompt, "source": source,
                        "response_id": response_id(pid, model, text, k), "response": text, "generator": model,
                        "sample_index": k, "score_original": score, "row": number,
                        "overall": overall_k, "ratings": ratings, "rationales": rationales})
        if c.limit is not None and counts["imported"] >= c.limit:
            return False
    return True


def _items(items: Any, c: ImportRatingsConfig) -> list:
    if not isinstance(items, (list, tuple)):
        raise BadRow("missing_field" if items is None else "bad_type", c.completions_field,
                     f"expected a list of completions, got {type(items).__name__}")
    if not items:
        raise BadRow("no_completions", c.completions_field, "the completion list is empty",
                     "remove the row or give it completions")
    return list(items)


def _prompt(value: Any, field: str) -> list[dict]:
    if value is None:
        raise BadRow("missing_field", field, "the instruction is missing or null", "give the row an instruction")
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty_prompt", field, "the instruction is empty or only whitespace")
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        if messages[-1]["role"] in ("user", "tool") and all(m["content"].strip() for m in messages):
            return messages
    raise BadRow("bad_type", field, "expected an instruction string or a message list ending with a user turn")


def _completion(item: Any, k: int, c: ImportRatingsConfig):
    where = f"{c.completions_field}[{k}]"
    if not isinstance(item, dict):
        raise BadRow("bad_completion", where, f"a completion must be an object, got {type(item).__name__}")
    text = item.get(c.response_field)
    if not isinstance(text, str):
        raise BadRow("missing_field" if text is None else "bad_type", f"{where}.{c.response_field}",
                     "the response is missing or not a string")
    if not text.strip():
        raise BadRow("empty_response", f"{where}.{c.response_field}", "the response is empty or only whitespace",
                     "remove the completion or give it a response")
    model = item.get(c.model_field)
    model = model if isinstance(model, str) and model else "original"
    annotations = item.get(c.annotations_field) or {}
    if not isinstance(annotations, dict):
        raise BadRow("bad_type", f"{where}.{c.annotations_field}", "annotations must be an object of aspect ratings")
    ratings, rationales = {}, {}
    for aspect, value in annotations.items():
        if value is None:
            continue
        if c.aspects is not None and aspect not in c.aspects:
            continue
        rating, rationale = (_get(value, "rating"), _get(value, "rationale")) if isinstance(value, dict) else (value, None)
        try:
            ratings[aspect] = _number(rating)
        except ValueError:
            raise BadRow("bad_rating", f"{where}.{c.annotations_field}.{aspect}",
                         f"the rating {rating!r} is not a number (or N/A)", "fix the rating") from None
        rationales[aspect] = rationale if isinstance(rationale, str) else None
    for aspect in c.aspects or []:
        ratings.setdefault(aspect, None)
        rationales.setdefault(aspect, None)
    scores = []
    for key in ("fine-grained_score", "overall_score"):
        try:
            scores.append(_number(item.get(key)))
        except ValueError:
            raise BadRow("bad_rating", f"{where}.{key}", f"{item.get(key)!r} is not a number") from None
    return (k, model, text, ratings, rationales, *scores)


def _get(value: dict, key: str):
    for k, v in value.items():
        if k.lower() == key:
            return v
    return None


def _number(value: Any) -> float | None:
    """A rating as a float; None for N/A; ValueError for anything else."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, str):
        if value.strip().lower() in MISSING_RATING:
            return None
        return float(value.strip())
    raise ValueError(value)


def _slug(aspect: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", aspect).strip("_").lower()


def _table(out: list[dict], c: ImportRatingsConfig) -> pa.Table:
    aspects = list(c.aspects) if c.aspects is not None else list(dict.fromkeys(a for r in out for a in r["ratings"]))
    n = len(out)
    cols = {
        "prompt_id": pa.array([r["prompt_id"] for r in out], pa.string()),
        "prompt": pa.array([r["prompt"] for r in out], MESSAGES),
        "source": pa.array([r["source"] for r in out], pa.string()),
        "response_id": pa.array([r["response_id"] for r in out], pa.string()),
        "response": pa.array([r["response"] for r in out], pa.string()),
        "generator": pa.array([r["generator"] for r in out], pa.string()),
        "sample_index": pa.array([r["sample_index"] for r in out], pa.int64()),
        "sampling": pa.nulls(n, SAMPLING),
        "score_original": pa.array([r["score_original"] for r in out], pa.float64()),
        "label_source": pa.repeat(pa.scalar("original", pa.string()), n),
        "original_row": pa.array([r["row"] for r in out], pa.int64()),
    }
    if any(r["overall"] is not None for r in out):
        cols["score_original_overall"] = pa.array([r["overall"] for r in out], pa.float64())
    for a in aspects:
        cols[f"score_original_{_slug(a)}"] = pa.array([r["ratings"].get(a) for r in out], pa.float64())
        cols[f"rationale_original_{_slug(a)}"] = pa.array([r["rationales"].get(a) for r in out], pa.string())
    return pa.table(cols)
