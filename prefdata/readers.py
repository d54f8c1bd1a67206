"""Reading outside data files into columns, strictly, with errors that name the file and row.

Shared by the source steps ``load_prompts``, ``import_pairs`` and ``import_ratings`` (not a
step itself). ``iter_rows`` reads JSONL (also ``.gz``), JSON arrays, parquet, CSV and
``datasets`` ``save_to_disk`` folders in batches (``Rows``): the batch's columns, each
row's number (line number for JSONL and CSV, 0-based row index otherwise) and the rows
that could not be parsed at all, which the caller raises on or quarantines. Reading is
lazy, so a caller that has enough rows (``limit``) stops reading the file there. JSONL is
read ``BATCH_BYTES`` at a time, CSV and parquet ``BATCH_ROWS`` rows at a time; a
``datasets`` folder or Hub split is memory-mapped and handed out in ``BATCH_ROWS`` slices;
only a JSON array (no line boundaries) is parsed whole.

Strictness, so that nothing bad passes as data:

* JSON(L): a line that is not valid JSON, not UTF-8 or not an object is reported by its
  line (``file: line 7: …``), not as some field; an object with a duplicated key (which
  ``json.loads`` would silently resolve to the last value) is reported with the key. A JSONL
  batch takes a fast path (``pyarrow.json``) when it parses as one table with one row per
  line (strings Arrow would type as timestamps are kept as text); otherwise it is read line
  by line.
* CSV is parsed with ``csv``'s strict mode: a quote that opens a cell and is not closed
  properly (which would otherwise swallow the next lines into one garbage cell) is reported
  with the line the record starts on; in quarantine mode that one line is set aside and
  parsing resumes on the next line, so the good rows after it are kept. A header naming a
  column twice is an error.
* Problems with the whole file (missing, corrupted gzip, unreadable parquet, a JSON array
  that does not parse) always raise.

Chat-control text in content is found and handled by ``prefdata.control_text``.

A path that is not a local file or folder but looks like a Hub id (``owner/name``) is
loaded with ``datasets.load_dataset``; any failure to reach the Hub becomes one clear error.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import gzip
import hashlib
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from prefdata.step import Output, Source

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets", "hub")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".pq": "parquet", ".csv": "csv"}
DATASETS_MARKERS = ("dataset_info.json", "state.json")
LINE_FORMATS = ("jsonl", "csv")
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
BATCH_BYTES = 64 << 20  # JSONL read per batch
BATCH_ROWS = 100_000  # CSV / parquet rows per batch
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WHITESPACE = re.compile(r"[ \t\n\r]*")
QUARANTINE = pa.schema([("file", pa.string()), ("row", pa.int64()), ("raw", pa.string()),
                        ("reason", pa.string()), ("detail", pa.string())])
ON_ERROR = ("raise", "quarantine")


class BadRow(Exception):
    """One row that cannot be used: a short ``code``, the field (None: the whole row), what to know."""

    def __init__(self, code: str, field: str | None, problem: str, fix: str = "fix or remove the row"):
        super().__init__(problem)
        self.code, self.field, self.problem, self.fix = code, field, problem, fix


@dataclass
class Rows:
    """A batch of a file read into columns: ``value(name, i)`` is row i's value (None when absent).

    Files read by Arrow keep their ``table``; its columns become Python lists only when a
    caller asks for them. Files read line by line keep their ``objects`` (so a caller can
    tell a missing key from a null value).
    """

    path: Path
    fmt: str
    columns: list[str]
    data: dict[str, list]
    numbers: Any  # a list or range of row numbers
    raw: Callable[[int], str]
    bad: list[tuple[int, str, BadRow]] = field(default_factory=list)  # (row number, raw text, error)
    table: pa.Table | None = None
    objects: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.numbers)

    def column(self, name: str) -> list:
        if name not in self.data and self.table is not None and name in self.table.column_names:
            self.data[name] = self.table.column(name).to_pylist()
        return self.data.get(name) or [None] * len(self.numbers)

    def value(self, name: str, i: int) -> Any:
        if name in self.data:
            return self.data[name][i]
        if self.table is not None and name in self.table.column_names:
            return self.table.column(name)[i].as_py()
        return None

    def events(self) -> Iterator[tuple[int, int | None, str | None, BadRow | None]]:
        """Good and bad rows in file order: (row number, index or None, raw or None, error or None)."""
        bad = sorted(self.bad, key=lambda b: b[0])
        j = 0
        for i, number in enumerate(self.numbers):
            while j < len(bad) and bad[j][0] < number:
                yield bad[j][0], None, bad[j][1], bad[j][2]
                j += 1
            yield number, i, None, None
        for number, raw, exc in bad[j:]:
            yield number, None, raw, exc


def describe(path: Path | str, fmt: str, row: int, exc: BadRow, hint: bool = False) -> str:
    """``<file>: line 3, field 'chosen': <problem>; <fix>`` (``<file>: line 3: …`` for a whole row)."""
    where = f"line {row}" if fmt in LINE_FORMATS else f"row index {row}"
    if exc.field:
        where += f", field '{exc.field}'"
    text = f"{path}: {where}: {exc.problem}; {exc.fix}"
    return text + (", or set `on_error: quarantine` to set bad rows aside" if hint else "")


def quarantine_row(path, fmt: str, row: int, raw: str, exc: BadRow) -> dict:
    return {"file": str(path), "row": row, "raw": raw, "reason": exc.code, "detail": describe(path, fmt, row, exc)}


def raise_first(bad: list[dict]) -> None:
    """With ``on_error: raise``, stop at the first bad row (parse or content) of the file."""
    first = min(bad, key=lambda r: r["row"])
    raise ValueError(first["detail"] + ", or set `on_error: quarantine` to set bad rows aside")


# -- options shared by the import steps ---------------------------------------------------
@dataclass
class FileOptions:
    """Where an import step reads from and what it does with bad rows (shared config fields)."""

    path: str
    file_format: str = "auto"  # auto | jsonl | json | parquet | csv | datasets | hub
    split: str = "train"  # for Hub ids
    source: str | None = None
    limit: int | None = None
    on_error: str = "raise"  # raise | quarantine
    special_tokens: str = "keep"  # keep | escape | quarantine (chat-control text in content)


class FileSource(Source):
    """A source step whose config is a ``FileOptions``: checks, fingerprint and batches shared.

    Subclasses add ``problems()`` (their own config checks) and ``convert_batches(batches)``:
    from the file's batches of ``Rows``, the step's output in pieces (``Source.read_batches``),
    so the runner writes shards while the file is read.
    """

    def check(self) -> None:
        problems = self.problems() + option_problems(self.config)
        if problems:
            raise ValueError(f"step '{self.name}': {'; '.join(problems)}")

    def problems(self) -> list[str]:
        return []

    def fingerprint_extra(self) -> Any:
        c = self.config
        return source_fingerprint(c.path, c.file_format, c.split)

    def read_batches(self) -> Iterator[Output]:
        c = self.config
        return self.convert_batches(iter_rows(c.path, c.file_format, c.split))

    def convert_batches(self, batches: Iterator[Rows]) -> Iterator[Output]:
        raise NotImplementedError


def option_problems(c: Any, format_field: str = "file_format", formats=FORMATS) -> list[str]:
    """What is wrong with the shared reading options of a step config (empty: nothing)."""
    from prefdata.control_text import SPECIAL_TOKENS  # it raises readers' BadRow

    fmt = getattr(c, format_field)
    problems = [
        f"{format_field} must be one of {list(formats)}, got {fmt!r}" if fmt not in formats else None,
        f"on_error must be 'raise' or 'quarantine', got {c.on_error!r}" if c.on_error not in ON_ERROR else None,
        f"limit must be at least 1 (or null for no limit), got {c.limit}"
        if c.limit is not None and c.limit < 1 else None,
        f"special_tokens must be one of {list(SPECIAL_TOKENS)}, got {c.special_tokens!r}"
        if c.special_tokens not in SPECIAL_TOKENS else None,
    ]
    return [p for p in problems if p]


def source_fingerprint(path: str, fmt: str, split: str = "train") -> dict:
    """What identifies the input: the Hub id and split, or the bytes of the local file(s)."""
    if fmt == "hub" or (fmt == "auto" and is_hub_id(path)):
        return {"hub": path, "split": split}
    return {"sha256": file_sha256(existing(path))}


# -- locating and naming ----------------------------------------------------------------
def is_hub_id(path: str) -> bool:
    """Not a local path, but shaped like ``owner/name`` with no file extension."""
    p = Path(path).expanduser()
    return not p.exists() and bool(HUB_ID.match(path)) and Path(path).suffix.lower() not in (
        *EXTENSIONS, ".gz")


def existing(path: str, what: str = "input file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist (working directory: {Path.cwd()}); check `path:`")
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
    ext = Path(path.name.lower().removesuffix(".gz")).suffix
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


# -- bytes ------------------------------------------------------------------------------
@contextlib.contextmanager
def decompressing(path: Path):
    """Turn gzip's errors into one that names the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot decompress ({exc}); the gzip file is corrupted or truncated, "
                         "re-download or re-create it") from None


def open_binary(path: Path):
    """The file as a binary stream, gunzipped when it is gzip (whatever the name says)."""
    with open(path, "rb") as fh:
        is_gzip = fh.read(2) == GZIP_MAGIC
    if path.name.lower().endswith(".gz") and not is_gzip:
        raise ValueError(f"{path}: the name ends in .gz but the file is not gzip-compressed; "
                         "re-create it or rename it")
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def read_bytes(path: Path) -> bytes:
    with decompressing(path), open_binary(path) as fh:
        return fh.read()


# -- formats ----------------------------------------------------------------------------
def iter_rows(path: str, fmt: str = "auto", split: str = "train", batch_bytes: int | None = None,
              batch_rows: int | None = None) -> Iterator[Rows]:
    """Read a local file/folder, or a Hub dataset id, as batches of ``Rows`` in file order
    (``BATCH_BYTES`` / ``BATCH_ROWS`` as they are at the call, unless given)."""
    batch_bytes = BATCH_BYTES if batch_bytes is None else batch_bytes
    batch_rows = BATCH_ROWS if batch_rows is None else batch_rows
    if fmt == "hub" or (fmt == "auto" and is_hub_id(path)):
        yield from _table_batches(Path(path), "hub", load_hub(path, split), batch_rows)
        return
    p = existing(path)
    fmt = resolve_format(p, fmt)
    if fmt == "jsonl":
        yield from iter_jsonl(p, batch_bytes)
    elif fmt == "json":
        yield from iter_json(p, batch_bytes)
    elif fmt == "csv":
        yield from iter_csv(p, batch_rows)
    elif fmt == "parquet":
        yield from iter_parquet(p, batch_rows)
    elif fmt == "datasets":
        yield from _table_batches(p, fmt, read_datasets_dir(p), batch_rows)
    else:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def iter_jsonl(path: Path, batch_bytes: int = BATCH_BYTES) -> Iterator[Rows]:
    """Batches of whole lines; each parsed by Arrow when it can be, else line by line."""
    first_line, tail, start = 1, b"", True
    with decompressing(path), open_binary(path) as fh:
        while True:
            chunk = fh.read(batch_bytes)
            data = tail + chunk
            if start:
                data, start = data.removeprefix(BOM), False
            cut = data.rfind(b"\n") if chunk else len(data) - 1
            if cut < 0 and chunk:
                tail = data
                continue
            block, tail = data[: cut + 1], data[cut + 1:]
            if block:
                yield _jsonl_batch(path, block, first_line)
                first_line += block.count(b"\n")
            if not chunk:
                return


def _jsonl_batch(path: Path, data: bytes, first_line: int) -> Rows:
    if data.strip():
        table = _arrow_json(data)
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        if table is not None and table.num_rows == lines:
            return _table_rows(path, "jsonl", table, first=first_line)  # no blank lines: row i is line i + first
    return _json_objects(path, "jsonl", _numbered_lines(data, first_line))


def _arrow_json(data: bytes) -> pa.Table | None:
    """One pass with pyarrow's parser; None when it cannot type the batch (mixed types, bad or
    duplicate keys, bytes that are not UTF-8): then the batch is read line by line."""
    import pyarrow.json as pajson

    try:
        opts = pajson.ReadOptions(block_size=max(1 << 20, min(len(data) // 8 + 1, 1 << 26)))
        table = pajson.read_json(pa.BufferReader(data), read_options=opts)
        if _has_timestamp(table.schema):  # ISO-date strings were typed as timestamps: read them as text
            schema = pa.schema([pa.field(f.name, _as_text(f.type)) for f in table.schema])
            table = pajson.read_json(pa.BufferReader(data), read_options=opts,
                                     parse_options=pajson.ParseOptions(explicit_schema=schema))
        table.validate(full=True)  # Arrow's JSON parser lets bytes that are not UTF-8 through
        return table
    except (pa.ArrowException, ValueError):
        return None


def _has_timestamp(t: pa.Schema | pa.DataType) -> bool:
    """Arrow turns ISO-date strings into timestamps; JSON has none, so those strings stay text."""
    if isinstance(t, pa.Schema):
        return any(_has_timestamp(f.type) for f in t)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_timestamp(t.value_type)
    if pa.types.is_struct(t):
        return any(_has_timestamp(f.type) for f in t)
    return False


def _as_text(t: pa.DataType) -> pa.DataType:
    """The same type with every timestamp or date (inferred from a string) as a string."""
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(pa.field(t.value_field.name, _as_text(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _as_text(f.type), f.nullable) for f in t])
    return t


def _numbered_lines(data: bytes, first: int = 1):
    for number, line in enumerate(data.split(b"\n"), start=first):
        if line.strip():
            yield number, line


def _duplicate_tracker() -> tuple[list[str], Callable]:
    """An ``object_pairs_hook`` that builds dicts as json does and notes every repeated key."""
    repeated: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            repeated.extend(k for k, _ in pairs if k in seen or seen.add(k))
        return obj

    return repeated, hook


def _not_a_row(value: Any, repeated: list[str], where: str = "") -> BadRow | None:
    """Why a parsed JSON value cannot be a row (a repeated key, not an object), or None."""
    if repeated:
        return BadRow("duplicate_key", None, f"the key {repeated[0]!r} appears more than once in one object"
                      f"{where}, and only one of its values could be kept", "keep the key once")
    if not isinstance(value, dict):
        return BadRow("not_object", None, f"expected a JSON object, got {type(value).__name__}{where}",
                      "write each row as one JSON object")
    return None


def _json_objects(path: Path, fmt: str, lines) -> Rows:
    objects, numbers, raws, bad = [], [], [], []
    repeated, hook = _duplicate_tracker()
    decoder = json.JSONDecoder(object_pairs_hook=hook)
    for number, line in lines:
        raw = line.decode("utf-8", errors="backslashreplace").rstrip("\r")
        repeated.clear()
        try:
            value = decoder.decode(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad.append((number, raw, BadRow("not_utf8", None, f"the line is not UTF-8 (byte "
                                            f"0x{line[exc.start]:02x} at column {exc.start + 1})",
                                            "re-save the file as UTF-8")))
            continue
        except json.JSONDecodeError as exc:
            bad.append((number, raw, BadRow("malformed_json", None, f"the line is not valid JSON "
                                            f"({exc.msg} at column {exc.colno})", "fix the line")))
            continue
        problem = _not_a_row(value, repeated)
        if problem:
            bad.append((number, raw, problem))
        else:
            objects.append(value)
            numbers.append(number)
            raws.append(raw)
    return _object_rows(path, fmt, objects, numbers, lambda i: raws[i], bad)


def _object_rows(path: Path, fmt: str, objects: list[dict], numbers, raw, bad) -> Rows:
    columns = list(dict.fromkeys(k for obj in objects for k in obj))
    data = {name: [obj.get(name) for obj in objects] for name in columns}
    return Rows(path, fmt, columns, data, numbers, raw, bad, objects=objects)


def iter_json(path: Path, batch_bytes: int = BATCH_BYTES) -> Iterator[Rows]:
    """A JSON array of objects (one batch); a file not starting with '[' is read as JSON lines."""
    with decompressing(path), open_binary(path) as fh:
        head = fh.read(4096).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        yield from iter_jsonl(path, batch_bytes)
        return
    data = read_bytes(path).removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); "
                         "re-save the file as UTF-8") from None
    yield _json_array(path, text)


def _json_array(path: Path, text: str) -> Rows:
    """Element by element (``raw_decode``), so a duplicated key is pinned to its element and line."""
    repeated, hook = _duplicate_tracker()
    decoder = json.JSONDecoder(object_pairs_hook=hook)
    objects, numbers, spans, bad = [], [], [], []
    pos = WHITESPACE.match(text).end() + 1  # past '['
    line, counted = 1, 0
    pos = WHITESPACE.match(text, pos).end()
    index = 0
    while pos < len(text) and text[pos] != "]":
        repeated.clear()
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            _bad_array(path, exc.msg, exc.lineno, exc.colno)
        line += text.count("\n", counted, pos)
        counted = pos
        problem = _not_a_row(value, repeated, f" (line {line})")
        if problem:
            bad.append((index, text[pos:end], problem))
        else:
            objects.append(value)
            numbers.append(index)
            spans.append((pos, end))
        index += 1
        pos = WHITESPACE.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = WHITESPACE.match(text, pos + 1).end()
        elif pos >= len(text) or text[pos] != "]":
            _bad_array(path, "Expecting ',' delimiter", *_line_col(text, pos))
    if pos >= len(text) or text[WHITESPACE.match(text, pos + 1).end():]:
        _bad_array(path, "Expecting ']' at the end of the array" if pos >= len(text) else "Extra data",
                   *_line_col(text, min(pos, len(text) - 1)))
    return _object_rows(path, "json", objects, numbers, lambda i: text[spans[i][0]: spans[i][1]], bad)


def _line_col(text: str, pos: int) -> tuple[int, int]:
    return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)


def _bad_array(path: Path, msg: str, line: int, col: int) -> None:
    raise ValueError(f"{path}: not valid JSON ({msg} at line {line}, column {col}); "
                     "fix the file, or write one object per line as JSONL")


# -- CSV --------------------------------------------------------------------------------
class _Lines:
    """Physical lines of a text stream, numbered, with the lines of the current record kept
    so that a record that fails to parse can be given back (all but its first line)."""

    def __init__(self, stream):
        self.stream, self.back, self.number, self.taken = stream, collections.deque(), 0, []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.back.popleft() if self.back else next(self.stream)
        self.number += 1
        self.taken.append(line)
        return line

    def record(self) -> tuple[int, list[str]]:
        """(first line number, lines) of the record just read; starts the next one."""
        taken, self.taken = self.taken, []
        return self.number - len(taken) + 1, taken

    def give_back(self, lines: list[str]) -> None:
        self.back.extendleft(reversed(lines))
        self.number -= len(lines)


def _csv_records(lines: _Lines) -> Iterator[tuple[int, list[str] | None, str, csv.Error | None]]:
    """(first line, cells, raw, None) per record, or (line, None, that line, error) for a broken one."""
    while True:
        try:
            for cells in csv.reader(lines, strict=True):
                start, taken = lines.record()
                if cells:
                    yield start, cells, "".join(taken), None
            return
        except csv.Error as exc:
            start, taken = lines.record()
            lines.give_back(taken[1:])
            yield start, None, taken[0] if taken else "", exc


def iter_csv(path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[Rows]:
    """CSV with a header row; every cell is a string (a message list is JSON text in a cell)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long prompt is not a syntax error
    with decompressing(path), open_binary(path) as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
        lines = _Lines(text)
        header = _csv_header(path, lines)
        batch: list = []
        for record in _csv_records(lines):
            batch.append(record)
            if len(batch) >= batch_rows:
                yield _csv_batch(path, header, batch)
                batch = []
        yield _csv_batch(path, header, batch)


def _csv_header(path: Path, lines: _Lines) -> list[str]:
    for start, cells, _, exc in _csv_records(lines):
        if exc is not None:
            raise ValueError(f"{path}: line {start}: the header row is not valid CSV ({exc}); fix it")
        twice = sorted({c for c in cells if cells.count(c) > 1})
        if twice:
            raise ValueError(f"{path}: line {start}: the header names column(s) {twice} more than once, so "
                             "one cell of each row would be lost; rename the repeated columns")
        return cells
    return []


def _csv_batch(path: Path, header: list[str], records: list) -> Rows:
    rows, numbers, bad = [], [], []
    for start, cells, raw, exc in records:
        if exc is not None:
            bad.append((start, _undecodable(raw.rstrip("\r\n")), BadRow(
                "malformed_csv", None, f"the CSV record starting here does not parse ({exc}); most often a "
                "quote opens a cell and is not closed, which would swallow the lines after it",
                "close the quote, or write a quote inside a quoted cell as two quotes (\"\")")))
        elif len(cells) != len(header):
            bad.append((start, _csv_raw(header, cells), BadRow(
                "malformed_csv", None, f"the row has {len(cells)} cells, the header {len(header)}",
                "quote cells that hold commas or newlines")))
        elif any(_has_surrogates(c) for c in cells):
            bad.append((start, _csv_raw(header, cells), BadRow("not_utf8", None, "the row holds bytes that are "
                                                               "not UTF-8", "re-save the file as UTF-8")))
        else:
            rows.append(cells)
            numbers.append(start)
    data = {name: [r[j] for r in rows] for j, name in enumerate(header)}
    return Rows(path, "csv", list(header), data, numbers, lambda i: _csv_raw(header, rows[i]), bad)


def _csv_raw(header: list[str], cells: list[str]) -> str:
    """The row as JSON text, with undecodable bytes shown as \\xNN escapes."""
    cells = [_undecodable(c) for c in cells]
    row = dict(zip(header, cells)) if len(cells) == len(header) else cells
    return json.dumps(row, ensure_ascii=False)


def _undecodable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- Arrow-backed formats ------------------------------------------------------------------
def iter_parquet(path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[Rows]:
    try:
        parquet = pq.ParquetFile(path)
        start = 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch])
            yield _table_rows(path, "parquet", table, first=start)
            start += table.num_rows
        if start == 0:
            yield _table_rows(path, "parquet", parquet.schema_arrow.empty_table())
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: cannot read as parquet ({exc}); check the file or `format:`") from None


def _table_batches(path: Path, fmt: str, table: pa.Table, batch_rows: int) -> Iterator[Rows]:
    """A memory-mapped ``datasets`` table in batches, so a caller converts one at a time."""
    for start in range(0, max(table.num_rows, 1), batch_rows):
        yield _table_rows(path, fmt, table.slice(start, batch_rows), first=start)


def _table_rows(path: Path, fmt: str, table: pa.Table, first: int = 0) -> Rows:
    def raw(i: int) -> str:
        return json.dumps(table.slice(i, 1).to_pylist()[0], ensure_ascii=False, default=str)

    return Rows(path, fmt, list(table.column_names), {}, range(first, first + table.num_rows), raw, table=table)


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading `datasets` folders or Hub ids needs the `datasets` package: "
                          "pip install datasets") from None
    return datasets


def read_datasets_dir(path: Path) -> pa.Table:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    datasets = import_datasets()
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {list(ds)}; point `path:` at one split, e.g. "
                         f"{path / next(iter(ds), 'train')}")
    return ds.with_format("arrow")[:]


def load_hub(name: str, split: str = "train") -> pa.Table:
    """``datasets.load_dataset(name, split=split)`` as Arrow; any failure is one clear error."""
    datasets = import_datasets()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id, gated: all mean "get it some other way"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionError(f"could not reach the Hugging Face Hub for '{name}' ({type(exc).__name__}: "
                              f"{first[:200]}); download it elsewhere and pass a local path") from None
    return ds.with_format("arrow")[:]


def text_or_json(value: Any) -> Any:
    """A CSV cell holding a JSON list or object, decoded; anything else as it is."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
