"""Load prompts from a file into the PROMPT table: the first step of every pipeline.

Reads JSONL (one object per line), JSON (an array of objects, or JSON lines in a ``.json``
file as ``datasets.Dataset.to_json`` writes them), parquet, CSV and ``datasets``
``save_to_disk`` folders; ``.gz`` files are decompressed. The ``field`` column holds either
a prompt string (it becomes one user message) or a message list, which must be a valid
conversation for a model to answer next:

* a non-empty list of ``{"role", "content"}`` objects, ``role`` one of ``schema.ROLES`` and
  ``content`` a non-blank string (other keys, e.g. ``name``, are dropped);
* a system message only as the first message;
* the last message from the user or a tool (the model writes the next turn).

``system`` prepends a system message to conversations that have none (a row's own system
message wins). Bad rows either stop the run with an error naming the file, the row (line
number for JSONL and CSV, 0-based row index for JSON arrays, parquet and ``datasets``) and
the field, or with ``on_error: quarantine`` go to the quarantine table with the original
row (``raw``), ``file``, ``row``, a short ``reason`` code and a readable ``detail``.
Problems with the whole file (missing, corrupted gzip, unreadable JSON array, no prompt
column) always raise. Reading stops once ``limit`` distinct prompts are kept, so rows past
that point are neither read nor checked.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefdata.schema import MESSAGES, PROMPT, ROLES, prompt_id
from prefdata.step import Output, Source

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".pq": "parquet", ".csv": "csv"}
DATASETS_MARKERS = ("dataset_info.json", "state.json")
LINE_FORMATS = ("jsonl", "csv")
GZIP_MAGIC = b"\x1f\x8b"
QUARANTINE = pa.schema([("file", pa.string()), ("row", pa.int64()), ("raw", pa.string()),
                        ("reason", pa.string()), ("detail", pa.string())])


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


class BadRow(Exception):
    """One row that cannot become a prompt: a short ``code`` and what a person should know."""

    def __init__(self, code: str, field: str, problem: str, fix: str = "fix or remove the row"):
        super().__init__(problem)
        self.code, self.field, self.problem, self.fix = code, field, problem, fix


@dataclass
class Record:
    """A row as read: its number, its values (or why it could not be read), its raw text."""

    row: int
    data: dict | None
    raw: Callable[[], str]
    error: BadRow | None = None
    index: int = 0


class LoadPrompts(Source):
    """Read a prompt file into ``prompt_id``, ``prompt``, ``source`` plus the file's other columns."""

    name: ClassVar[str] = "load_prompts"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = LoadPromptsConfig

    def check(self) -> None:
        c = self.config
        problems = [
            f"format must be one of {list(FORMATS)}, got {c.format!r}" if c.format not in FORMATS else None,
            f"on_error must be 'raise' or 'quarantine', got {c.on_error!r}"
            if c.on_error not in ("raise", "quarantine") else None,
            f"limit must be at least 1 (or null for no limit), got {c.limit}"
            if c.limit is not None and c.limit < 1 else None,
            f"max_chars must be at least 1, got {c.max_chars}" if c.max_chars < 1 else None,
            "field must be a non-empty column name" if not c.field else None,
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"step 'load_prompts': {'; '.join(problems)}")
        if c.format == "datasets":
            _import_datasets()

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(PROMPT.names)

    def fingerprint_extra(self) -> Any:
        return {"sha256": file_sha256(_existing(self.config.path))}

    def read(self) -> Output:
        c = self.config
        path = _existing(c.path)
        fmt = resolve_format(path, c.format)
        records, table = READERS[fmt](path, c.field)
        with contextlib.closing(records):
            kept, bad, counts = self._collect(path, fmt, records)
        if counts["rows_read"] == 0:
            raise ValueError(f"{path}: the file holds no rows; give a file with at least one prompt")
        out = _prompt_table(path, c, kept, table)
        quarantine = pa.Table.from_pylist(bad, schema=QUARANTINE) if bad else None
        return Output(out, quarantine, dict(counts))

    def _collect(self, path: Path, fmt: str, records: Iterator[Record]):
        """Turn records into (record, id, messages), quarantining or raising on bad ones."""
        c = self.config
        kept, bad, seen, counts = [], [], set(), Counter(rows_read=0, duplicates=0)
        for rec in records:
            counts["rows_read"] += 1
            try:
                messages = _conversation(rec, c)
            except BadRow as exc:
                if c.on_error == "raise":
                    raise ValueError(_describe(path, fmt, rec.row, exc, hint=True)) from None
                counts[f"quarantined_{exc.code}"] += 1
                bad.append({"file": str(path), "row": rec.row, "raw": rec.raw(),
                            "reason": exc.code, "detail": _describe(path, fmt, rec.row, exc)})
                continue
            pid = prompt_id(messages)
            if c.dedupe and pid in seen:
                counts["duplicates"] += 1
                continue
            seen.add(pid)
            kept.append((rec, pid, messages))
            if c.limit is not None and len(kept) >= c.limit:
                break
        return kept, bad, counts


# -- validating one row ---------------------------------------------------------------------
def _conversation(rec: Record, c: LoadPromptsConfig) -> list[dict]:
    """The messages of a row, with the configured system message; raises BadRow."""
    if rec.error is not None:
        raise rec.error
    if c.field not in rec.data:
        keys = ", ".join(map(str, rec.data)) or "none"
        raise BadRow("missing_field", c.field, f"the row has no field '{c.field}' (its fields: {keys})",
                     "set `field:` to the column that holds the prompt, or add it to the row")
    messages = to_messages(rec.data[c.field], c.field, c.max_chars)
    if c.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": c.system}] + messages
    return messages


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


def _describe(path: Path, fmt: str, row: int, exc: BadRow, hint: bool = False) -> str:
    where = f"line {row}" if fmt in LINE_FORMATS else f"row index {row}"
    text = f"{path}: {where}, field '{exc.field}': {exc.problem}; {exc.fix}"
    return text + (", or set `on_error: quarantine` to set bad rows aside" if hint else "")


# -- the output table -----------------------------------------------------------------------
def _prompt_table(path: Path, c: LoadPromptsConfig, kept: list, table: pa.Table | None) -> pa.Table:
    extras = _extras(path, c.field, kept, table)
    n = len(kept)
    source = pa.array([c.source] * n, pa.string()) if c.source is not None else _source(extras, path.name, n)
    columns = {
        "prompt_id": pa.array([pid for _, pid, _ in kept], pa.string()),
        "prompt": pa.array([m for _, _, m in kept], MESSAGES),
        "source": source,
    }
    for name in extras.column_names:
        if name != "source":
            columns[name] = extras[name]
    return pa.table(columns)


def _extras(path: Path, field: str, kept: list, table: pa.Table | None) -> pa.Table:
    """The file's other columns for the kept rows, Arrow-typed."""
    if table is not None:
        names = [n for n in table.column_names if n not in (field, "prompt_id")]
        _check_prompt_clash(path, field, names)
        return table.select(names).take(pa.array([rec.index for rec, _, _ in kept], pa.int64()))
    rows = [rec.data for rec, _, _ in kept]
    names = list(dict.fromkeys(k for row in rows for k in row if k not in (field, "prompt_id")))
    _check_prompt_clash(path, field, names)
    columns = {}
    for name in names:
        try:
            columns[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: column '{name}' mixes value types across rows ({exc}); "
                             "make its values one type") from None
    return pa.table(columns)


def _check_prompt_clash(path: Path, field: str, names: list[str]) -> None:
    if "prompt" in names:
        raise ValueError(f"{path}: the file has a 'prompt' column besides field '{field}', and the output's "
                         "'prompt' column would overwrite it; rename or drop it, or set `field: prompt`")


def _source(extras: pa.Table, default: str, n: int) -> pa.Array:
    """The file's own ``source`` column where it has one, else the file name."""
    if "source" not in extras.column_names:
        return pa.array([default] * n, pa.string())
    return pc.fill_null(extras["source"].cast(pa.string()), default).combine_chunks()


# -- reading files --------------------------------------------------------------------------
def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"prompt file {p} does not exist (working directory: {Path.cwd()}); "
                                "check `path:`")
    return p


def resolve_format(path: Path, fmt: str) -> str:
    """The format to read ``path`` with: the configured one, or guessed from the name."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if any((path / m).exists() for m in DATASETS_MARKERS):
            return "datasets"
        raise ValueError(f"{path} is a folder but not a `datasets` save_to_disk folder (no "
                         f"{' or '.join(DATASETS_MARKERS)}); point `path:` at a file or a split's folder")
    name = path.name.lower().removesuffix(".gz")
    ext = Path(name).suffix
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: cannot tell the format from the extension '{ext}'; set `format:` to "
                         f"one of {list(FORMATS[1:])}")
    return EXTENSIONS[ext]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files and their relative names."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _open(path: Path):
    with open(path, "rb") as fh:
        is_gzip = fh.read(2) == GZIP_MAGIC
    if path.name.lower().endswith(".gz") and not is_gzip:
        raise ValueError(f"{path}: the name ends in .gz but the file is not gzip-compressed; "
                         "re-create it or rename it")
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


@contextlib.contextmanager
def _decompressing(path: Path):
    """Turn gzip's errors into one that names the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot decompress ({exc}); the gzip file is corrupted or truncated, "
                         "re-download or re-create it") from None


def _byte_lines(path: Path) -> Iterator[bytes]:
    with _decompressing(path), _open(path) as fh:
        yield from fh


def _read_all(path: Path) -> bytes:
    return b"".join(_byte_lines(path))


def read_jsonl(path: Path, field: str) -> tuple[Iterator[Record], None]:
    return _jsonl_records(path, field), None


def _jsonl_records(path: Path, field: str) -> Iterator[Record]:
    for number, line in enumerate(_byte_lines(path), start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if line.strip():
            yield _jsonl_record(number, line, field)


def _jsonl_record(number: int, line: bytes, field: str) -> Record:
    raw = line.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    rec = Record(number, None, lambda: raw)
    try:
        rec.data = _object(json.loads(line.decode("utf-8")), field)
    except UnicodeDecodeError as exc:
        rec.error = BadRow("not_utf8", field, f"the line is not UTF-8 (byte 0x{line[exc.start]:02x} at "
                           f"column {exc.start + 1})", "re-save the file as UTF-8")
    except json.JSONDecodeError as exc:
        rec.error = BadRow("malformed_json", field, f"the line is not valid JSON ({exc.msg} at column "
                           f"{exc.colno})", "fix the line")
    except BadRow as exc:
        rec.error = exc
    return rec


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise BadRow("not_object", field, f"expected a JSON object, got {type(value).__name__}",
                     'write the row as {"prompt": ...}')
    return value


def read_json(path: Path, field: str) -> tuple[Iterator[Record], None]:
    """A JSON array of objects; a file not starting with '[' is read as JSON lines."""
    with _decompressing(path), _open(path) as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        return _jsonl_records(path, field), None
    items = _parse_json_array(path, _read_all(path))
    return (_json_item(i, item, field) for i, item in enumerate(items)), None


def _parse_json_array(path: Path, data: bytes) -> list:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); "
                         "re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         "fix the file, or write one object per line as JSONL") from None


def _json_item(index: int, item: Any, field: str) -> Record:
    rec = Record(index, None, lambda: json.dumps(item, ensure_ascii=False, default=str))
    try:
        rec.data = _object(item, field)
    except BadRow as exc:
        rec.error = exc
    return rec


def read_csv(path: Path, field: str) -> tuple[Iterator[Record], None]:
    """CSV with a header row; every cell is a string, so a prompt here is always text."""
    text = _read_all(path).decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or field not in header:
        raise ValueError(f"{path}: the header has no column '{field}' (columns: {header}); "
                         "set `field:` to the column that holds the prompt")
    return _csv_records(reader, header, field), None


def _csv_records(reader, header: list[str], field: str) -> Iterator[Record]:
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not cells:
            continue
        rec = Record(start, dict(zip(header, cells)), lambda h=header, c=cells: _csv_raw(h, c))
        if len(cells) != len(header):
            rec.error = BadRow("malformed_csv", field, f"the row has {len(cells)} cells, the header "
                               f"{len(header)}", "quote cells that hold commas or newlines")
        elif any(_has_surrogates(v) for v in cells):
            rec.error = BadRow("not_utf8", field, "the row holds bytes that are not UTF-8",
                               "re-save the file as UTF-8")
        yield rec


def _csv_raw(header: list[str], cells: list[str]) -> str:
    """The row as JSON text, with undecodable bytes shown as \\xNN escapes."""
    cells = [c.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for c in cells]
    row = dict(zip(header, cells)) if len(cells) == len(header) else cells
    return json.dumps(row, ensure_ascii=False)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_parquet(path: Path, field: str) -> tuple[Iterator[Record], pa.Table]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: cannot read as parquet ({exc}); check the file or `format:`") from None
    return _table_records(path, table, field), table


def read_datasets(path: Path, field: str) -> tuple[Iterator[Record], pa.Table]:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    datasets = _import_datasets()
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {list(ds)}; point `path:` at one split, e.g. "
                         f"{path / next(iter(ds), 'train')}")
    table = ds.with_format("arrow")[:]
    return _table_records(path, table, field), table


def _table_records(path: Path, table: pa.Table, field: str) -> Iterator[Record]:
    if field not in table.column_names:
        raise ValueError(f"{path}: no column '{field}' (columns: {table.column_names}); "
                         "set `field:` to the column that holds the prompt")
    for i, value in enumerate(table[field].to_pylist()):
        yield Record(i, {field: value}, lambda i=i: _row_json(table, i), index=i)


def _row_json(table: pa.Table, index: int) -> str:
    return json.dumps(table.slice(index, 1).to_pylist()[0], ensure_ascii=False, default=str)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("format 'datasets' needs the `datasets` package: pip install datasets") from None
    return datasets


READERS = {"jsonl": read_jsonl, "json": read_json, "parquet": read_parquet, "csv": read_csv,
           "datasets": read_datasets}
