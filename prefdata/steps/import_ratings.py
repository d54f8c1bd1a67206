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
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from prefdata.readers import (BadRow, QUARANTINE, existing, file_sha256, is_hub_id, quarantine_row,
                              read_rows, text_or_json)
from prefdata.schema import MESSAGES, RESPONSE, ROLES, SAMPLING, prompt_id, response_id
from prefdata.step import Output, Source

FILE_FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets", "hub")
MISSING_RATING = {"n/a", "na", "none", "", "-"}


@dataclass
class ImportRatingsConfig:
    path: str
    file_format: str = "auto"
    split: str = "train"
    prompt_field: str = "instruction"
    completions_field: str = "completions"
    response_field: str = "response"
    model_field: str = "model"
    annotations_field: str = "annotations"
    aspects: list[str] | None = None  # default: every aspect found
    source: str | None = None
    limit: int | None = None
    on_error: str = "raise"  # raise | quarantine


class ImportRatings(Source):
    """Read instruction + rated completions rows into one response row per completion."""

    name: ClassVar[str] = "import_ratings"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = ImportRatingsConfig

    def check(self) -> None:
        c = self.config
        if c.file_format not in FILE_FORMATS:
            raise ValueError(f"step 'import_ratings': file_format must be one of {list(FILE_FORMATS)}, "
                             f"got {c.file_format!r}")
        if c.on_error not in ("raise", "quarantine"):
            raise ValueError(f"step 'import_ratings': on_error must be 'raise' or 'quarantine', got {c.on_error!r}")
        if c.limit is not None and c.limit < 1:
            raise ValueError(f"step 'import_ratings': limit must be at least 1 (or null), got {c.limit}")

    def output_columns(self, columns: list[str]) -> list[str]:
        aspects = [f"score_original_{_slug(a)}" for a in self.config.aspects or []]
        return list(RESPONSE.names) + ["score_original", "label_source", "original_row"] + aspects

    def fingerprint_extra(self) -> Any:
        c = self.config
        if c.file_format == "hub" or (c.file_format == "auto" and is_hub_id(c.path)):
            return {"hub": c.path, "split": c.split}
        return {"sha256": file_sha256(existing(c.path))}

    def read(self) -> Output:
        c = self.config
        return import_ratings(read_rows(c.path, c.file_format, c.split), c)


def import_ratings(rows, c: ImportRatingsConfig) -> Output:
    counts = Counter(rows_read=len(rows) + len(rows.bad))
    if counts["rows_read"] == 0:
        raise ValueError(f"{rows.path}: the file holds no rows; give a file with at least one instruction")
    for name in (c.prompt_field, c.completions_field):
        if name not in rows.columns and len(rows):
            raise ValueError(f"{rows.path}: no column '{name}' (columns: {rows.columns}); set "
                             f"`prompt_field:` / `completions_field:`")
    bad = [_reject(rows, c, n, raw, exc) for n, raw, exc in rows.bad]
    prompts, completions, sources = rows.column(c.prompt_field), rows.column(c.completions_field), rows.column("source")
    out: list[dict] = []
    n_prompts = 0
    for i in range(len(rows)):
        try:
            csv_cell = text_or_json if rows.fmt == "csv" else (lambda v: v)
            prompt = _prompt(csv_cell(prompts[i]), c.prompt_field)
            items = csv_cell(completions[i])
            if not isinstance(items, (list, tuple)):
                raise BadRow("missing_field" if items is None else "bad_type", c.completions_field,
                             f"expected a list of completions, got {type(items).__name__}")
            if not items:
                raise BadRow("no_completions", c.completions_field, "the completion list is empty",
                             "remove the row or give it completions")
        except BadRow as exc:
            bad.append(_reject(rows, c, rows.numbers[i], rows.raw(i), exc))
            continue
        pid = prompt_id(prompt)
        source = c.source or (sources[i] if isinstance(sources[i], str) else rows.path.name)
        good = []
        for k, item in enumerate(items):
            try:
                good.append(_completion(item, k, c))
            except BadRow as exc:
                bad.append(_reject(rows, c, rows.numbers[i], json.dumps(item, ensure_ascii=False, default=str), exc))
        if not good:
            bad.append(_reject(rows, c, rows.numbers[i], rows.raw(i),
                               BadRow("no_valid_completions", c.completions_field, "every completion is bad")))
            continue
        n_prompts += 1
        for k, model, text, ratings, rationales, fine_k, overall_k in good:
            ratings_present = [v for v in ratings.values() if v is not None]
            score = fine_k
            if score is None:
                score = sum(ratings_present) / len(ratings_present) if ratings_present else None
            out.append({"prompt_id": pid, "prompt": prompt, "source": source,
                        "response_id": response_id(pid, model, text, k), "response": text, "generator": model,
                        "sample_index": k, "score_original": score, "row": rows.numbers[i],
                        "overall": overall_k, "ratings": ratings, "rationales": rationales})
        if c.limit is not None and n_prompts >= c.limit:
            break
    if bad and c.on_error == "raise":
        _raise_first(rows, bad)
    for row in bad:
        counts[f"quarantined_{row['reason']}"] += 1
    counts["imported"] = n_prompts
    counts["responses"] = len(out)
    counts["ratings_missing"] = sum(v is None for r in out for v in r["ratings"].values())
    quarantine = pa.Table.from_pylist(bad, schema=QUARANTINE) if bad else None
    return Output(_table(out, c), quarantine, dict(counts))


def _reject(rows, c: ImportRatingsConfig, number: int, raw: str, exc: BadRow) -> dict:
    return quarantine_row(rows.path, rows.fmt, number, raw, exc)


def _raise_first(rows, bad: list[dict]) -> None:
    """With ``on_error: raise``, stop at the first bad row of the file (parse or content)."""
    first = min(bad, key=lambda r: r["row"])
    raise ValueError(first["detail"] + ", or set `on_error: quarantine` to set bad rows aside")


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
