"""Load prompts from a file into the PROMPT table: the first step of every pipeline.

Reads JSONL (one object per line), JSON (an array of objects, or JSON lines in a ``.json``
file as ``datasets.Dataset.to_json`` writes them), parquet, CSV and ``datasets``
``save_to_disk`` folders; ``.gz`` files are decompressed (``prefdata.readers``, strict:
a broken CSV quote, a bad JSON line or a duplicated key is reported by its line). The
``field`` column holds either a prompt string (it becomes one user message) or a message
list, which must be a valid conversation for a model to answer next:

* a non-empty list of ``{"role", "content"}`` objects, ``role`` one of ``schema.ROLES`` and
  ``content`` a non-blank string (other keys, e.g. ``name``, are dropped);
* a system message only as the first message;
* the last message from the user or a tool (the model writes the next turn).

``system`` prepends a system message to conversations that have none (a row's own system
message wins). Literal chat-control text in a message (``<|im_start|>`` …) is counted in
``control_text_rows`` and handled by ``special_tokens`` (``keep`` | ``escape`` |
``quarantine``; see ``prefdata.readers``). Bad rows either stop the run with an error
naming the file, the row (line number for JSONL and CSV, 0-based row index for JSON
arrays, parquet and ``datasets``) and the field, or with ``on_error: quarantine`` go to
the quarantine table with the original row (``raw``), ``file``, ``row``, a short
``reason`` code and a readable ``detail``. Problems with the whole file (missing,
corrupted gzip, unreadable JSON array, no prompt column) always raise. Reading stops once
``limit`` distinct prompts are kept, so batches past that point are neither read nor
checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from prefdata.control_text import ControlText
from prefdata.readers import (QUARANTINE, BadRow, Rows, describe, existing, file_sha256, import_datasets,
                              iter_rows, option_problems, quarantine_row)
from prefdata.schema import MESSAGES, PROMPT, ROLES, prompt_id
from prefdata.shards import KeyIndex, hash128
from prefdata.step import Output, Source

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets")


@dataclass
class LoadPromptsConfig:
    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "datasets"] = "auto"
    field: str = "prompt"
    system: str | None = None
    source: str | None = None
    limit: int | None = None
    dedupe: bool = True
    on_error: Literal["raise", "quarantine"] = "raise"
    max_chars: int = 200_000
    special_tokens: Literal["keep", "escape", "quarantine"] = "keep"


class LoadPrompts(Source):
    """Read a prompt file into ``prompt_id``, ``prompt``, ``source`` plus the file's other columns."""

    name: ClassVar[str] = "load_prompts"
    version: ClassVar[str] = "2"  # 2: strict CSV/JSON readers, control-text count and policy
    Config: ClassVar[type] = LoadPromptsConfig

    def check(self) -> None:
        c = self.config
        problems = option_problems(c, "format", FORMATS) + [
            f"max_chars must be at least 1, got {c.max_chars}" if c.max_chars < 1 else None,
            "field must be a non-empty column name" if not c.field else None,
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"step 'load_prompts': {'; '.join(problems)}")
        if c.format == "datasets":
            import_datasets()

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(PROMPT.names)

    def fingerprint_extra(self) -> Any:
        return {"sha256": file_sha256(existing(self.config.path, "prompt file"))}

    def read_batches(self) -> Iterator[Output]:
        """One Output per batch of the file (its prompts and quarantined rows), then the counts."""
        c = self.config
        path = existing(c.path, "prompt file")
        collect = _Collector(c)
        for rows in iter_rows(str(path), c.format):
            more = collect.batch(rows)
            yield collect.take(path)
            if not more:
                break
        if collect.counts["rows_read"] == 0:
            raise ValueError(f"{path}: the file holds no rows; give a file with at least one prompt")
        if not collect.counts["control_text_rows"]:
            del collect.counts["control_text_rows"]
        yield Output(pa.table({}), None, dict(collect.counts))


class _Collector:
    """Prompts kept from each batch of one file; dedupe and limit span batches (the prompt
    ids seen are kept as 128-bit keys, ``KeyIndex``, not as Python strings)."""

    def __init__(self, c: LoadPromptsConfig):
        self.c, self.control = c, ControlText(c.special_tokens)
        self.counts = Counter(rows_read=0, duplicates=0)
        self.seen = KeyIndex()
        self.kept = 0
        self._reset()

    def _reset(self) -> None:
        self.ids: list[str] = []
        self.messages: list[list[dict]] = []
        self.extras: pa.Table | None = None
        self.bad: list[dict] = []

    def batch(self, rows: Rows) -> bool:
        """Take one batch; False once ``limit`` prompts are kept (stop reading)."""
        c = self.c
        if rows.table is not None and c.field not in rows.columns:
            raise ValueError(f"{rows.path}: no column '{c.field}' (columns: {rows.columns}); "
                             "set `field:` to the column that holds the prompt")
        if rows.fmt == "csv" and c.field not in rows.columns:
            raise ValueError(f"{rows.path}: the header has no column '{c.field}' (columns: {rows.columns}); "
                             "set `field:` to the column that holds the prompt")
        events = self._convert(rows)
        earlier = self._seen_before([e[3][1] for e in events if isinstance(e[3], tuple)]) if c.dedupe else set()
        kept, local, more = [], set(), True
        for number, i, raw, result, found in events:
            self.counts["rows_read"] += 1
            if isinstance(result, BadRow):
                self._reject(rows, number, raw if i is None else rows.raw(i), result)
                continue
            messages, pid = result
            self.counts["control_text_rows"] += found
            if c.dedupe and (pid in local or pid in earlier):
                self.counts["duplicates"] += 1
                continue
            local.add(pid)
            self.ids.append(pid)
            self.messages.append(messages)
            kept.append(i)
            if c.limit is not None and self.kept + len(kept) >= c.limit:
                more = False
                break
        self.kept += len(kept)
        if c.dedupe and local:
            self.seen.add(hash128(pl.DataFrame({"p": list(local)})), np.zeros(len(local), np.int64))
        self.extras = _extras(rows, c.field, kept)
        return more

    def _convert(self, rows: Rows) -> list[tuple]:
        """(row number, index, raw, (messages, prompt id) or BadRow, control text found) per
        row in file order; nothing is raised or counted here (rows past the limit never are)."""
        values = rows.column(self.c.field)
        events = []
        for number, i, raw, exc in rows.events():
            if exc is not None:
                events.append((number, i, raw, exc, 0))
                continue
            try:
                messages, found = self._conversation(rows, i, values[i])
            except BadRow as error:
                events.append((number, i, raw, error, 0))
                continue
            events.append((number, i, raw, (messages, prompt_id(messages)), found))
        return events

    def _seen_before(self, ids: list[str]) -> set[str]:
        """The prompt ids among ``ids`` that an earlier batch kept."""
        if not len(self.seen) or not ids:
            return set()
        _, found = self.seen.get(hash128(pl.DataFrame({"p": ids})))
        return {pid for pid, hit in zip(ids, found) if hit}

    def take(self, path: Path) -> Output:
        """This batch's prompts and quarantined rows (then forgets them)."""
        quarantine = pa.Table.from_pylist(self.bad, schema=QUARANTINE) if self.bad else None
        out = Output(self.table(path), quarantine)
        self._reset()
        return out

    def _conversation(self, rows: Rows, i: int, value: Any) -> tuple[list[dict], int]:
        """The messages of a row, with the configured system message, and whether it held
        chat-control text; raises BadRow."""
        c = self.c
        if rows.objects is not None and c.field not in rows.objects[i]:
            keys = ", ".join(map(str, rows.objects[i])) or "none"
            raise BadRow("missing_field", c.field, f"the row has no field '{c.field}' (its fields: {keys})",
                         "set `field:` to the column that holds the prompt, or add it to the row")
        messages = to_messages(value, c.field, c.max_chars)
        messages, found = self.control.messages(messages, c.field)
        if c.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": c.system}] + messages
        return messages, found

    def _reject(self, rows: Rows, number: int, raw: str, exc: BadRow) -> None:
        if self.c.on_error == "raise":
            raise ValueError(describe(rows.path, rows.fmt, number, exc, hint=True)) from None
        self.counts[f"quarantined_{exc.code}"] += 1
        self.bad.append(quarantine_row(rows.path, rows.fmt, number, raw, exc))

    def table(self, path: Path) -> pa.Table:
        """This batch's prompt table."""
        c = self.c
        extras = self.extras if self.extras is not None else pa.table({})
        n = len(self.ids)
        source = pa.array([c.source] * n, pa.string()) if c.source is not None else _source(extras, path.name, n)
        columns = {"prompt_id": pa.array(self.ids, pa.string()), "prompt": pa.array(self.messages, MESSAGES),
                   "source": source}
        for name in extras.column_names:
            if name != "source":
                columns[name] = extras[name]
        return pa.table(columns)


# -- validating one row ---------------------------------------------------------------------
def to_messages(value: Any, field: str, max_chars: int) -> list[dict]:
    """A prompt string or message list as a checked list of {role, content} messages."""
    if value is None:
        raise BadRow("missing_field", field, "the value is null", "give the row a prompt")
    if isinstance(value, bytes):
        value = _decode(value, field)
    if isinstance(value, str):
        messages = [{"role": "user", "content": _text(value, field)}]
    elif isinstance(value, (list, tuple)):
        messages = [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]
    else:
        raise BadRow("bad_type", field,
                     f"expected a string or a list of messages, got {type(value).__name__}")
    _check_turns(messages, field)
    size = sum(len(m["content"]) for m in messages)
    if size > max_chars:
        raise BadRow("too_long", field, f"the prompt is {size:,} characters, over max_chars={max_chars:,}",
                     "shorten or remove it, or raise max_chars")
    return messages


def _message(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise BadRow("bad_message", where, f"a message must be an object with role and content, "
                     f"got {type(item).__name__}")
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadRow("unknown_role", f"{where}.role", f"role {role!r} is not one of {list(ROLES)}",
                     "use one of those roles")
    content = item.get("content")
    if not isinstance(content, str):
        raise BadRow("bad_content", f"{where}.content",
                     f"content must be a string, got {type(content).__name__}",
                     "put the message text in content as a string")
    return {"role": role, "content": _text(content, f"{where}.content")}


def _text(text: str, where: str) -> str:
    if not text.strip():
        raise BadRow("empty_prompt", where, "the text is empty or only whitespace", "give it some text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRow("not_utf8", where, f"the text holds invalid Unicode ({exc.reason})",
                     "re-save the file as UTF-8") from None
    return text


def _decode(value: bytes, where: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow("not_utf8", where, f"the bytes are not UTF-8 (byte 0x{value[exc.start]:02x} "
                     f"at offset {exc.start})", "re-save the file as UTF-8") from None


def _check_turns(messages: list[dict], field: str) -> None:
    if not messages:
        raise BadRow("empty_messages", field, "the message list is empty", "give at least one user message")
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRow("misplaced_system", field, "a system message may only be the first message",
                     "move it to the front or merge it into the first one")
    if messages[-1]["role"] not in ("user", "tool"):
        raise BadRow("bad_last_turn", field,
                     f"the last message is from '{messages[-1]['role']}'; a prompt must end with a "
                     "user or tool message", "drop the trailing message(s)")


# -- the output table -----------------------------------------------------------------------
def _extras(rows: Rows, field: str, kept: list[int]) -> pa.Table:
    """The file's other columns for the kept rows of one batch, Arrow-typed."""
    if rows.objects is not None:  # read line by line: the keys of the kept rows
        names = list(dict.fromkeys(k for i in kept for k in rows.objects[i] if k not in (field, "prompt_id")))
    else:
        names = [n for n in rows.columns if n not in (field, "prompt_id")]
    if "prompt" in names:
        raise ValueError(f"{rows.path}: the file has a 'prompt' column besides field '{field}', and the output's "
                         "'prompt' column would overwrite it; rename or drop it, or set `field: prompt`")
    if rows.table is not None:
        return rows.table.select(names).take(pa.array(kept, pa.int64()))
    columns = {}
    for name in names:
        try:
            columns[name] = pa.array([rows.data[name][i] for i in kept])
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ValueError(f"{rows.path}: column '{name}' mixes value types across rows ({exc}); "
                             "make its values one type") from None
    return pa.table(columns) if columns else pa.table({"n": pa.nulls(len(kept))}).select([])


def _source(extras: pa.Table, default: str, n: int) -> pa.Array:
    """The file's own ``source`` column where it has one, else the file name."""
    if "source" not in extras.column_names:
        return pa.array([default] * n, pa.string())
    return pc.fill_null(extras["source"].cast(pa.string()), default).combine_chunks()
