"""Sample on-policy responses: each prompt row becomes ``n`` response rows.

Each response is seeded by (config seed, ``prompt_id``, ``sample_index``), so a prompt
gets the same responses whatever shard, ``--limit``, batch size, executor or other
prompts it is sampled with, and a larger run can reuse a smaller one's prompts. Appended
samples (``append: true``) continue a prompt's ``sample_index`` and so its streams.
``finish_reason`` says whether a reply ended (``stop``: eos or a ``stop`` string) or was
cut at ``max_new_tokens`` (``length``). Every backend takes ``stop`` and
``min_new_tokens``; over ``backend: api`` they go out as the API's ``stop`` and vLLM's
``min_tokens`` request field (a server without it is refused with a clear error, see
``prefdata/models/api_backend.py``), and ``model_options`` reach the backend
(``base_url``, ``api_key_env``, ``concurrency`` …). The ``sampling`` struct records every
setting that shapes a reply: temperature, top_p, max_new_tokens, seed, stop and
min_new_tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from prefdata import schema
from prefdata.models import LanguageModel, Sampling, check_backend, load_model
from prefdata.models.base import Generation, sampling_problems
from prefdata.step import MapStep

log = logging.getLogger(__name__)

NEW_COLUMNS = ["response_id", "response", "generator", "sample_index", "sampling"]
FINISH = schema.FINISH_REASON.name
OUTPUT = pa.schema(list(schema.RESPONSE) + [schema.FINISH_REASON])  # the columns' types


@dataclass
class SampleConfig:
    model: str = "smollm2-135m-instruct"
    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64  # transformers: replies decoded together (continuous batching; KV memory grows with it)
    append: bool = False
    min_new_tokens: int = 0  # eos is suppressed before this many tokens
    stop: list[str] = field(default_factory=list)  # a reply is cut before the first of these
    model_options: dict[str, Any] | None = None  # backend keywords, e.g. {base_url: ...} for api


class Sample(MapStep):
    """Generate ``n`` replies per prompt with one language model."""

    name: ClassVar[str] = "sample"
    # 2: seeds per (seed, prompt_id, sample_index); finish_reason. 3: sampling records stop and
    # min_new_tokens; api replies have a finish_reason and per-draw seeds
    version: ClassVar[str] = "3"
    Config: ClassVar[type] = SampleConfig
    model: LanguageModel | None = None

    def check(self) -> None:
        c = self.config
        problems = sampling_problems(c.temperature, c.top_p, c.max_new_tokens, c.min_new_tokens, c.stop)
        problems += [
            f"n must be at least 1, got {c.n}" if c.n < 1 else None,
            f"batch_size must be at least 1, got {c.batch_size}" if c.batch_size < 1 else None,
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"step 'sample': {'; '.join(problems)}")
        check_backend(c.backend)

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        base_url = (c.model_options or {}).get("base_url") if c.backend == "api" else None
        return [ModelRef(c.model, kind="api" if c.backend == "api" else "lm", backend=c.backend,
                         device=c.device, dtype=c.dtype, base_url=base_url)]

    def input_columns(self) -> list[str]:
        return ["prompt_id", "prompt"]

    def output_columns(self, columns: list[str]) -> list[str]:
        clash = [c for c in NEW_COLUMNS if c in columns]
        if self.config.append and len(clash) == len(NEW_COLUMNS):
            return list(columns) + ([] if FINISH in columns else [FINISH])
        clash += [FINISH] if FINISH in columns else []
        if clash:
            raise ValueError(
                f"step 'sample': the input already has column(s) {clash}; sample reads prompt "
                "rows, so drop or rename them first, or set append: true to add more responses "
                "(another generator or temperature) to a response table"
            )
        return list(columns) + NEW_COLUMNS + [FINISH]

    def setup(self) -> None:
        c = self.config
        self.model = load_model(c.model, backend=c.backend, device=c.device, dtype=c.dtype,
                                batch_size=c.batch_size, **(c.model_options or {}))

    def teardown(self) -> None:
        self.model = None

    def process(self, table: pa.Table) -> pa.Table:
        self.output_columns(table.column_names)
        if self.config.append and "response_id" in table.column_names:
            return self._append(table)
        if table.num_rows == 0:
            return _empty(table.schema)
        return self._generate(table, np.zeros(table.num_rows, dtype=np.int64))

    def _generate(self, table: pa.Table, first_index: np.ndarray) -> pa.Table:
        """``n`` response rows per prompt row, numbered from ``first_index`` of that prompt."""
        if self.model is None:
            self.setup()
        c = self.config
        replies = self._replies(table, first_index)
        texts = [g.text for per_prompt in replies for g in per_prompt]
        out = table.take(pa.array(np.repeat(np.arange(table.num_rows), c.n)))
        sample_index = np.tile(np.arange(c.n, dtype=np.int64), table.num_rows) + np.repeat(first_index, c.n)
        ids = [
            schema.response_id(pid, c.model, text, int(k))
            for pid, text, k in zip(out.column("prompt_id").to_pylist(), texts, sample_index)
        ]
        rows = out.num_rows
        out = (
            out.append_column("response_id", pa.array(ids, pa.string()))
            .append_column("response", pa.array(texts, pa.string()))
            .append_column("generator", pa.array([c.model] * rows, pa.string()))
            .append_column("sample_index", pa.array(sample_index))
            .append_column("sampling", _sampling_column(c, rows))
            .append_column(schema.FINISH_REASON, pa.array(
                [g.finish_reason for per_prompt in replies for g in per_prompt], pa.string()))
        )
        log.info("sampled %d responses for %d prompts", rows, table.num_rows)
        return schema.conform(out, OUTPUT)

    def _replies(self, table: pa.Table, first_index: np.ndarray) -> list[list[Generation]]:
        """The model's replies, each draw seeded by (seed, prompt_id, sample_index)."""
        c = self.config
        sampling = Sampling(temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                            seed=c.seed, min_new_tokens=c.min_new_tokens, stop=tuple(c.stop))
        prompts = table.column("prompt").to_pylist()
        keys = table.column("prompt_id").to_pylist()
        return self.model.generate_replies(prompts, c.n, sampling, keys=keys,
                                           first_index=[int(i) for i in first_index])

    def _append(self, responses: pa.Table) -> pa.Table:
        """Sample for each prompt of a response table and add the rows after the prompt's
        own, numbered after its existing samples (another generator or temperature)."""
        import polars as pl

        df = pl.from_arrow(responses).with_row_index("_row")
        prompt_level = [c for c in responses.column_names
                        if c not in NEW_COLUMNS and c != FINISH and not c.startswith("score_")]
        first = df.group_by("prompt_id", maintain_order=True).agg(
            pl.col("_row").first(), pl.col("sample_index").max().alias("_last"))
        prompts = responses.take(pa.array(first["_row"].to_numpy())).select(prompt_level)
        fresh = self._generate(prompts, first["_last"].to_numpy().astype(np.int64) + 1)
        rank = first.select("prompt_id", pl.int_range(pl.len()).alias("_rank"))
        merged = pl.concat([df.drop("_row"), pl.from_arrow(fresh)], how="diagonal_relaxed").with_row_index("_row")
        order = merged.join(rank, on="prompt_id", how="left").sort(["_rank", "_row"]).get_column("_row")
        table = merged.drop("_row").to_arrow().take(pa.array(order.to_numpy()))
        return schema.conform(table.select(self.output_columns(responses.column_names)), OUTPUT)


def _sampling_column(c: SampleConfig, rows: int) -> pa.StructArray:
    """The settings every row was sampled with (one struct per row, all equal)."""
    values = {
        "temperature": float(c.temperature), "top_p": float(c.top_p),
        "max_new_tokens": int(c.max_new_tokens), "seed": int(c.seed),
        "min_new_tokens": int(c.min_new_tokens),
    }
    stop = [str(s) for s in c.stop]
    arrays = []
    for f in schema.SAMPLING:
        if f.name == "stop":
            offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * len(stop), pa.int32())
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(stop * rows, pa.string()), type=f.type))
        else:
            arrays.append(pa.array(np.full(rows, values[f.name]), f.type))
    return pa.StructArray.from_arrays(arrays, fields=list(schema.SAMPLING))


def _empty(input_schema: pa.Schema) -> pa.Table:
    fields = list(input_schema) + [schema.RESPONSE.field(name) for name in NEW_COLUMNS] + [schema.FINISH_REASON]
    return pa.schema(fields).empty_table()
