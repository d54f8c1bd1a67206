"""LLM judges as map steps: an UltraFeedback-rubric rater and a position-swapped pairwise judge.

``judge_rubric`` (Cui et al. 2023, "UltraFeedback: Boosting Language Models with Scaled
AI Feedback") rates each response on helpfulness, honesty, instruction following and
truthfulness, 1–5 with a rationale each, plus an overall 1–5. It writes
``score_<name>`` (overall), ``score_<name>_<aspect>``, ``<name>_rationales`` (a struct
of the five rationales), ``<name>_attempts`` and ``<name>_error`` (null, or why the
item is missing after ``max_attempts``).

``judge_pairwise`` (verdict format of Zheng et al. 2023, "Judging LLM-as-a-Judge with
MT-Bench and Chatbot Arena") asks twice with the responses swapped. On a pair table
(``on: pairs``) it writes ``<name>_first`` (chosen shown as A) and ``<name>_second``
(chosen shown as B), each ``chosen`` | ``rejected`` | ``tie``; ``<name>_verdict`` —
their common answer, or ``tie`` when the orders disagree; ``<name>_agreement`` (bool,
what the ``route`` step's ``judge_disagreement`` reads as ``judge_agreement``);
``<name>_rationale`` and ``<name>_error``. On a response table (``on: responses``) it
compares every two responses of a prompt both ways and writes ``score_<name>`` = the
win rate (a tie, or a disagreement between orders, counts half), ``<name>_agreement``
(the share of the response's comparisons whose orders agreed) and ``<name>_error``.

Malformed judge text is retried with another seed and then recorded as missing with the
reason (``prefdata.judging``); the counts go to the run summary. Each judgment is seeded
per item: attempt k by ``draw_seed(seed, key, k)``, the key naming the item by
``prompt_id`` and its ids (``response_id``; ``pair_id``; the two compared responses'
``response_id``) and the order shown, or by its texts when those columns are missing. So a
verdict does not depend on the shard, the batch size or the other rows, and a larger
``--limit`` reuses the prompts already judged (``prefdata.prompt_store``). Prompts and
parsers live in ``prefdata/judging.py``. The judge is any ``LanguageModel``: a local model,
or ``backend: api`` with ``model_options: {base_url: ...}`` for a served one.

``structured`` chooses how the answer is constrained: ``json_schema`` asks for JSON that
follows the judge's schema (a server's ``response_format``, vLLM's guided decoding) and
parses it strictly; ``off`` asks for the text format and parses it tolerantly; ``auto``
(default) is ``json_schema`` for backends that can constrain decoding (api, vllm) and
``off`` for the others (transformers), whose output is then unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from prefdata import judging
from prefdata.schema import stable_hash
from prefdata.step import MapStep, Output

log = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    model: str = "smollm2-135m-instruct"
    name: str = "judge"
    system: str | None = judging.DEFAULT_SYSTEM
    max_attempts: int = 3
    temperature: float = 0.0
    retry_temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 384
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    model_options: dict[str, Any] | None = None
    structured: Literal["auto", "json_schema", "off"] = "auto"


@dataclass
class JudgePairwiseConfig(JudgeConfig):
    on: str = "pairs"
    max_new_tokens: int = 256


class _Judge(MapStep):
    model = None
    version = "2"  # 2: seeds per item (was: per shard), so judgments are prompt-local

    def check(self) -> None:
        from prefdata.models import check_backend

        c = self.config
        problems = [
            f"max_attempts must be at least 1, got {c.max_attempts}" if c.max_attempts < 1 else None,
            f"temperature must be >= 0, got {c.temperature}" if c.temperature < 0 else None,
            f"retry_temperature must be > 0, got {c.retry_temperature}" if c.retry_temperature <= 0 else None,
            f"max_new_tokens must be at least 1, got {c.max_new_tokens}" if c.max_new_tokens < 1 else None,
            f"batch_size must be at least 1, got {c.batch_size}" if c.batch_size < 1 else None,
            f"on must be 'pairs' or 'responses', got {getattr(c, 'on', 'pairs')!r}"
            if getattr(c, "on", "pairs") not in ("pairs", "responses") else None,
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"{self.name}: {'; '.join(problems)}")
        check_backend(c.backend)  # also: the openai package for backend api
        if c.structured == "json_schema" and c.backend == "transformers":
            raise ValueError(f"{self.name}: structured: json_schema needs a backend that can constrain "
                             "decoding (api or vllm); the transformers backend cannot — set "
                             "structured: auto or off")

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        base_url = (c.model_options or {}).get("base_url") if c.backend == "api" else None
        return [ModelRef(c.model, kind="api" if c.backend == "api" else "lm", backend=c.backend,
                         device=c.device, dtype=c.dtype, base_url=base_url)]

    def setup(self) -> None:
        from prefdata.models import load_model

        c = self.config
        self.model = load_model(c.model, backend=c.backend, device=c.device, dtype=c.dtype,
                                batch_size=c.batch_size, **(c.model_options or {}))

    def teardown(self) -> None:
        self.model = None

    def output_columns(self, columns: list[str]) -> list[str]:
        new = self.new_columns()
        return [c for c in columns if c not in new] + new

    def new_columns(self) -> list[str]:
        raise NotImplementedError

    def as_json(self) -> bool:
        """Whether to ask for JSON under a schema: ``structured`` resolved for the loaded model."""
        c = self.config
        if self.model is None:
            self.setup()
        can = bool(getattr(self.model, "supports_json_schema", False))
        if c.structured == "json_schema" and not can:
            raise ValueError(f"{self.name}: structured: json_schema, but the {type(self.model).__name__} "
                             "backend cannot constrain decoding to a schema; use backend api or vllm, "
                             "or set structured: auto or off")
        return c.structured == "json_schema" or (c.structured == "auto" and can)

    def _ask(self, conversations, parse, keys, schema=None) -> list[judging.Judged]:
        """Judge each conversation; ``keys`` name the items (their per-item seeds)."""
        from prefdata.models.api_backend import StructuredOutputUnsupported

        c = self.config
        try:
            results = judging.judge_with_retries(
                self.model, conversations, parse, max_attempts=c.max_attempts, temperature=c.temperature,
                retry_temperature=c.retry_temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                seed=c.seed, keys=keys, json_schema=schema,
            )
        except StructuredOutputUnsupported as exc:
            raise StructuredOutputUnsupported(f"step '{self.name}' (name: {c.name}): {exc}") from None
        if schema is not None and results and all(r.code == "invalid_json" for r in results):
            log.warning("%s (%s): no answer in this shard was valid JSON; if the server ignores "
                        "response_format, set structured: off", self.name, c.name)
        return results


class JudgeRubric(_Judge):
    """UltraFeedback-rubric ratings per response: four aspects and an overall, 1–5."""

    name = "judge_rubric"
    Config = JudgeConfig

    def input_columns(self) -> list[str]:
        return ["prompt", "response"]

    def new_columns(self) -> list[str]:
        n = self.config.name
        return ([f"score_{n}"] + [f"score_{n}_{a}" for a in judging.ASPECTS]
                + [f"{n}_rationales", f"{n}_attempts", f"{n}_error"])

    def process(self, table: pa.Table) -> Output:
        n = self.config.name
        table = table.drop_columns([c for c in self.new_columns() if c in table.column_names])
        prompts = table.column("prompt").to_pylist()
        responses = table.column("response").to_pylist()
        if not prompts:
            results = []
        else:
            as_json = self.as_json()
            convs = [judging.rubric_conversation(p, r, self.config.system, as_json)
                     for p, r in zip(prompts, responses)]
            keys = _item_keys(table, ["prompt_id", "response_id"], ["prompt", "response"])
            results = (self._ask(convs, judging.parse_rubric_json, keys, judging.RUBRIC_SCHEMA) if as_json
                       else self._ask(convs, judging.parse_rubric, keys))
        ratings = {f: [r.value.ratings[f] if r.value else None for r in results] for f in judging.RUBRIC_FIELDS}
        rationale_type = pa.struct([(f, pa.string()) for f in judging.RUBRIC_FIELDS])
        columns = {f"score_{n}": pa.array(ratings["overall"], pa.float64())}
        for a in judging.ASPECTS:
            columns[f"score_{n}_{a}"] = pa.array(ratings[a], pa.float64())
        columns[f"{n}_rationales"] = pa.array(
            [r.value.rationales if r.value else None for r in results], rationale_type)
        columns[f"{n}_attempts"] = pa.array([r.attempts for r in results], pa.int64())
        columns[f"{n}_error"] = pa.array([r.error for r in results], pa.string())
        for col, arr in columns.items():
            table = table.append_column(col, arr)
        return Output(table, counts=_counts(n, results))


class JudgePairwise(_Judge):
    """A vs B asked in both orders; verdict, agreement, tie on disagreement."""

    name = "judge_pairwise"
    Config = JudgePairwiseConfig

    def input_columns(self) -> list[str]:
        if self.config.on == "pairs":
            return ["prompt", "chosen", "rejected"]
        return ["prompt_id", "prompt", "response"]

    def new_columns(self) -> list[str]:
        n = self.config.name
        if self.config.on == "pairs":
            return [f"{n}_first", f"{n}_second", f"{n}_verdict", f"{n}_agreement",
                    f"{n}_rationale", f"{n}_error"]
        return [f"score_{n}", f"{n}_agreement", f"{n}_error"]

    def process(self, table: pa.Table) -> Output:
        table = table.drop_columns([c for c in self.new_columns() if c in table.column_names])
        if self.config.on == "pairs":
            return self._pairs(table)
        return self._responses(table)

    def _both_orders(self, prompts, first, second, keys):
        """Verdicts for (first as A, second as B) and the swap, as 'first'|'second'|'tie'|None;
        ``keys`` name the comparisons (each order gets its own seeds)."""
        sys = self.config.system
        results = []
        if prompts:
            js = self.as_json()
            convs = ([judging.pairwise_conversation(p, a, b, sys, js) for p, a, b in zip(prompts, first, second)]
                     + [judging.pairwise_conversation(p, b, a, sys, js) for p, a, b in zip(prompts, first, second)])
            ordered = [f"{k}:AB" for k in keys] + [f"{k}:BA" for k in keys]
            results = (self._ask(convs, judging.parse_pairwise_json, ordered, judging.PAIRWISE_SCHEMA) if js
                       else self._ask(convs, judging.parse_pairwise, ordered))
        half = len(prompts)
        ab = [_as_slot(r, {"A": "first", "B": "second"}) for r in results[:half]]
        ba = [_as_slot(r, {"A": "second", "B": "first"}) for r in results[half:]]
        return results[:half], results[half:], ab, ba

    def _pairs(self, table: pa.Table) -> Output:
        n = self.config.name
        prompts = table.column("prompt").to_pylist()
        chosen = [_last(m) for m in table.column("chosen").to_pylist()]
        rejected = [_last(m) for m in table.column("rejected").to_pylist()]
        keys = _item_keys(table, ["prompt_id", "pair_id"], ["prompt", "chosen", "rejected"])
        r1, r2, ab, ba = self._both_orders(prompts, chosen, rejected, keys)
        names = {"first": "chosen", "second": "rejected", "tie": "tie", None: None}
        verdict, agreement, errors = [], [], []
        for x, y, a, b in zip(r1, r2, ab, ba):
            if a is None or b is None:
                verdict.append(None)
                agreement.append(None)
                failed = [("chosen as A", x)] if a is None else []
                failed += [("chosen as B", y)] if b is None else []
                errors.append("; ".join(f"{order}: {r.error}" for order, r in failed))
            else:
                verdict.append(names[a] if a == b else "tie")
                agreement.append(a == b)
                errors.append(None)
        columns = {
            f"{n}_first": pa.array([names[a] for a in ab], pa.string()),
            f"{n}_second": pa.array([names[b] for b in ba], pa.string()),
            f"{n}_verdict": pa.array(verdict, pa.string()),
            f"{n}_agreement": pa.array(agreement, pa.bool_()),
            f"{n}_rationale": pa.array([r.value.rationale if r.value else None for r in r1], pa.string()),
            f"{n}_error": pa.array(errors, pa.string()),
        }
        for col, arr in columns.items():
            table = table.append_column(col, arr)
        counts = _counts(n, r1 + r2)
        counts[f"{n}_pairs_agree"] = sum(a is True for a in agreement)
        counts[f"{n}_pairs_disagree"] = sum(a is False for a in agreement)
        return Output(table, counts=counts)

    def _responses(self, table: pa.Table) -> Output:
        n = self.config.name
        pids = table.column("prompt_id").to_pylist()
        prompts = table.column("prompt").to_pylist()
        texts = table.column("response").to_pylist()
        rows: dict[str, list[int]] = {}
        for i, pid in enumerate(pids):
            rows.setdefault(pid, []).append(i)
        pairs = [(g[x], g[y]) for g in rows.values() for x in range(len(g)) for y in range(x + 1, len(g))]
        rows_key = _item_keys(table, ["prompt_id", "response_id"], ["prompt_id", "prompt", "response"])
        keys = [stable_hash([rows_key[i], rows_key[j]]) for i, j in pairs]
        r1, r2, ab, ba = self._both_orders([prompts[i] for i, _ in pairs], [texts[i] for i, _ in pairs],
                                           [texts[j] for _, j in pairs], keys)
        wins = np.zeros(table.num_rows)
        games = np.zeros(table.num_rows)
        agree = np.zeros(table.num_rows)
        reasons: dict[int, list[str]] = {}
        for (i, j), x, y, a, b in zip(pairs, r1, r2, ab, ba):
            if a is None or b is None:
                for row in (i, j):
                    reasons.setdefault(row, []).append((x if a is None else y).error)
                continue
            share = {("first", "first"): 1.0, ("second", "second"): 0.0}.get((a, b), 0.5)
            wins[i] += share
            wins[j] += 1 - share
            games[[i, j]] += 1
            agree[[i, j]] += a == b
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(games > 0, wins / np.maximum(games, 1), np.nan)
            rate = np.where(games > 0, agree / np.maximum(games, 1), np.nan)
        errors = [None if games[k] > 0 or k not in reasons else
                  f"every comparison missing; first: {reasons[k][0]}" for k in range(table.num_rows)]
        table = (table.append_column(f"score_{n}", pa.array(score, pa.float64(), from_pandas=True))
                 .append_column(f"{n}_agreement", pa.array(rate, pa.float64(), from_pandas=True))
                 .append_column(f"{n}_error", pa.array(errors, pa.string())))
        counts = _counts(n, r1 + r2)
        counts[f"{n}_comparisons"] = len(pairs)
        return Output(table, counts=counts)


def _as_slot(result: judging.Judged, mapping: dict[str, str]) -> str | None:
    if result.value is None:
        return None
    return mapping.get(result.value.winner, "tie")


def _counts(name: str, results: list[judging.Judged]) -> dict[str, int]:
    counts = Counter()
    counts[f"{name}_asked"] = len(results)
    counts[f"{name}_parsed"] = sum(r.value is not None for r in results)
    counts[f"{name}_retries"] = sum(max(r.attempts - 1, 0) for r in results)
    counts[f"{name}_missing"] = sum(r.value is None for r in results)
    for r in results:
        if r.value is None:
            counts[f"{name}_missing_{r.code}"] += 1
    return dict(counts)


def _item_keys(table: pa.Table, ids: list[str], content: list[str]) -> list[str]:
    """One key per row naming the item judged: its id columns when the table has them all,
    else its texts. Seeds come from these keys, never from a row's position."""
    cols = ids if all(c in table.column_names for c in ids) else content
    values = zip(*(table.column(c).to_pylist() for c in cols))
    return [stable_hash(list(v)) for v in values]


def _last(messages) -> str:
    if isinstance(messages, str):
        return messages
    return messages[-1]["content"] if messages else ""
