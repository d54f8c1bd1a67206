"""Reading outside data files into columns, with errors that name the file, row and field.

Shared by the source steps (not a step itself). ``read_rows`` reads JSONL (also ``.gz``),
JSON arrays, parquet, CSV and ``datasets`` ``save_to_disk`` folders into a ``Rows``: the
file's columns as Python lists, each row's number (line number for JSONL and CSV, 0-based
row index otherwise) and the rows that could not be parsed at all (bad JSON, not UTF-8,
not an object), which the caller raises on or quarantines. JSONL takes a fast path
(``pyarrow.json``, multi-threaded) when the file has no blank lines and parses as one
table; otherwise it is read line by line so every bad line is found and numbered.
Problems with the whole file (missing, corrupted gzip, unreadable parquet) always raise.

A path that is not a local file or folder but looks like a Hub id (``owner/name``) is
loaded with ``datasets.load_dataset``; any failure to reach the Hub becomes one clear error.
"""

from __future__ import annotations

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
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets", "hub")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".pq": "parquet", ".csv": "csv"}
DATASETS_MARKERS = ("dataset_info.json", "state.json")
LINE_FORMATS = ("jsonl", "csv")
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
QUARANTINE = pa.schema([("file", pa.string()), ("row", pa.int64()), ("raw", pa.string()),
                        ("reason", pa.string()), ("detail", pa.string())])


class BadRow(Exception):
    """One row that cannot be used: a short ``code``, the field, and what a person should know."""

    def __init__(self, code: str, field: str, problem: str, fix: str = "fix or remove the row"):
        super().__init__(problem)
        self.code, self.field, self.problem, self.fix = code, field, problem, fix


@dataclass
class Rows:
    """A file read into columns: ``value(name, i)`` is row i's value (None when absent).

    Files read by Arrow keep their ``table``; its columns become Python lists only when a
    caller asks for them (a vectorised caller may never need to).
    """

    path: Path
    fmt: str
    columns: list[str]
    data: dict[str, list]
    numbers: Any  # a list or range of row numbers
    raw: Callable[[int], str]
    bad: list[tuple[int, str, BadRow]] = field(default_factory=list)  # (row number, raw text, error)
    table: pa.Table | None = None

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


def describe(path: Path | str, fmt: str, row: int, exc: BadRow, hint: bool = False) -> str:
    """``<file>: line 3, field 'chosen': <problem>; <fix>`` — the text of errors and quarantine rows."""
    where = f"line {row}" if fmt in LINE_FORMATS else f"row index {row}"
    text = f"{path}: {where}, field '{exc.field}': {exc.problem}; {exc.fix}"
    return text + (", or set `on_error: quarantine` to set bad rows aside" if hint else "")


def quarantine_row(path, fmt: str, row: int, raw: str, exc: BadRow) -> dict:
    return {"file": str(path), "row": row, "raw": raw, "reason": exc.code, "detail": describe(path, fmt, row, exc)}


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


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they are gzip (whatever the name says)."""
    data = path.read_bytes()
    if data[:2] == GZIP_MAGIC:
        with decompressing(path):
            return gzip.decompress(data)
    if path.name.lower().endswith(".gz"):
        raise ValueError(f"{path}: the name ends in .gz but the file is not gzip-compressed; "
                         "re-create it or rename it")
    return data


# -- formats ----------------------------------------------------------------------------
def read_rows(path: str, fmt: str = "auto", split: str = "train") -> Rows:
    """Read a local file/folder, or a Hub dataset id, into ``Rows``."""
    if fmt == "hub" or (fmt == "auto" and is_hub_id(path)):
        return _table_rows(Path(path), "hub", load_hub(path, split))
    p = existing(path)
    fmt = resolve_format(p, fmt)
    if fmt == "jsonl":
        return read_jsonl(p)
    if fmt == "json":
        return read_json(p)
    if fmt == "csv":
        return read_csv(p)
    if fmt == "parquet":
        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{p}: cannot read as parquet ({exc}); check the file or `format:`") from None
        return _table_rows(p, fmt, table)
    if fmt == "datasets":
        return _table_rows(p, fmt, read_datasets_dir(p))
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def read_jsonl(path: Path) -> Rows:
    data = read_bytes(path).removeprefix(BOM)
    if data.strip():
        table = _arrow_json(data)
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        if table is not None and table.num_rows == lines:  # no blank lines: row i is line i + 1
            return _table_rows(path, "jsonl", table, first=1)
    return _json_objects(path, "jsonl", _numbered_lines(data))


def _arrow_json(data: bytes) -> pa.Table | None:
    """One pass with pyarrow's parser; None when it cannot type the file (mixed types, bad lines)."""
    import pyarrow.json as pajson

    try:
        opts = pajson.ReadOptions(block_size=max(1 << 20, min(len(data) // 8 + 1, 1 << 26)))
        return pajson.read_json(pa.BufferReader(data), read_options=opts)
    except (pa.ArrowException, ValueError):
        return None


def _numbered_lines(data: bytes):
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield number, line


def read_json(path: Path) -> Rows:
    """A JSON array of objects; a file not starting with '[' is read as JSON lines."""
    data = read_bytes(path).removeprefix(BOM)
    if not data.lstrip().startswith(b"["):
        return _json_objects(path, "jsonl", _numbered_lines(data))
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); "
                         "re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         "fix the file, or write one object per line as JSONL") from None
    encoded = ((i, json.dumps(item, ensure_ascii=False).encode()) for i, item in enumerate(items))
    return _json_objects(path, "json", encoded)


def _json_objects(path: Path, fmt: str, lines) -> Rows:
    objects, numbers, raws, bad = [], [], [], []
    for number, line in lines:
        raw = line.decode("utf-8", errors="backslashreplace").rstrip("\r")
        try:
            value = json.loads(line.decode("utf-8"))
            if not isinstance(value, dict):
                raise BadRow("not_object", "(row)", f"expected a JSON object, got {type(value).__name__}",
                             "write each row as one JSON object")
        except UnicodeDecodeError as exc:
            bad.append((number, raw, BadRow("not_utf8", "(row)", f"the line is not UTF-8 (byte "
                                            f"0x{line[exc.start]:02x} at column {exc.start + 1})",
                                            "re-save the file as UTF-8")))
            continue
        except json.JSONDecodeError as exc:
            bad.append((number, raw, BadRow("malformed_json", "(row)", f"the line is not valid JSON "
                                            f"({exc.msg} at column {exc.colno})", "fix the line")))
            continue
        except BadRow as exc:
            bad.append((number, raw, exc))
            continue
        objects.append(value)
        numbers.append(number)
        raws.append(raw)
    columns = list(dict.fromkeys(k for obj in objects for k in obj))
    data = {name: [obj.get(name) for obj in objects] for name in columns}
    return Rows(path, fmt, columns, data, numbers, lambda i: raws[i], bad)


def read_csv(path: Path) -> Rows:
    """CSV with a header row; every cell is a string (a message list is JSON text in a cell)."""
    text = read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None) or []
    rows, numbers, bad = [], [], []
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not cells:
            continue
        raw = json.dumps(cells, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()
        if len(cells) != len(header):
            bad.append((start, raw, BadRow("malformed_csv", "(row)", f"the row has {len(cells)} cells, the "
                                           f"header {len(header)}", "quote cells that hold commas or newlines")))
        elif any(_has_surrogates(c) for c in cells):
            bad.append((start, raw, BadRow("not_utf8", "(row)", "the row holds bytes that are not UTF-8",
                                           "re-save the file as UTF-8")))
        else:
            rows.append(cells)
            numbers.append(start)
    data = {name: [r[j] for r in rows] for j, name in enumerate(header)}
    raws = [json.dumps(dict(zip(header, r)), ensure_ascii=False) for r in rows]
    return Rows(path, "csv", list(header), data, numbers, lambda i: raws[i], bad)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
