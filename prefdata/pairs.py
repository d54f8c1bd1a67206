"""Shared helpers for the steps that build pairs, lists and trees: stable ids and messages.

``hash64`` is a vectorised 64-bit hash of strings, pure integer arithmetic in numpy over
the Arrow buffers (8-byte little-endian words, each mixed with the MurmurHash3 finaliser,
the byte length folded into the seed), so an id is the same on every machine, run and
library version — unlike ``polars.Expr.hash``, which the polars docs say may change
between versions. It is ~50x faster than ``hashlib`` in a list comprehension, which
matters at millions of pairs.

A pair id names the two responses compared, not the verdict: ``pair_ids(a, b) ==
pair_ids(b, a)``. Flipping a label (the ``noise`` step) or a human relabel therefore
keeps the id, and Argilla records keyed by pair id stay the same.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.schema import MESSAGE

_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S33 = np.uint64(33)
_CHUNK = 1 << 18  # rows per block when strings have different lengths
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX2 = (np.stack([_HEX[np.arange(256) >> 4], _HEX[np.arange(256) & 15]], axis=1)
         .copy().view("<u2").ravel())  # byte -> its two hex characters


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection with full avalanche)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> _S33)
        h = h * _MIX1
        h = h ^ (h >> _S33)
        h = h * _MIX2
        return h ^ (h >> _S33)


def _as_large_string(values) -> pa.Array:
    if isinstance(values, pl.Series):
        values = values.to_arrow()
    elif isinstance(values, (list, tuple, np.ndarray)):
        values = pa.array(values, pa.large_string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not pa.types.is_large_string(values.type):
        values = values.cast(pa.large_string())
    return values


def hash64(values, seed: int = 0) -> np.ndarray:
    """Stable 64-bit hash of each string (nulls hash like the empty string), as uint64."""
    arr = _as_large_string(values)
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lens = np.diff(offsets)
    if arr.null_count:
        valid = np.asarray(arr.is_valid())
        lens = np.where(valid, lens, 0)
    with np.errstate(over="ignore"):
        h = fmix64(np.uint64(seed) * _GOLDEN ^ lens.astype(np.uint64) * _MIX2 ^ _GOLDEN)
    width = int(lens.max(initial=0))
    if width == 0:
        return h
    if bool((lens == width).all()):  # one length (e.g. hex ids): one reshape, no padding
        return _mix_words(h, data[offsets[0]: offsets[0] + n * width].reshape(n, width), None)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        starts, part = offsets[start:stop], lens[start:stop]
        cols = np.arange(int(part.max()))
        idx = np.minimum(starts[:, None] + cols[None, :], len(data) - 1)
        block = np.where(cols[None, :] < part[:, None], data[idx], np.uint8(0))
        h[start:stop] = _mix_words(h[start:stop], block, (part + 7) // 8)
    return h


def _mix_words(h: np.ndarray, block: np.ndarray, n_words: np.ndarray | None) -> np.ndarray:
    """Fold each 8-byte little-endian word of each row into its hash (rows padded with 0)."""
    m, width = block.shape
    words = (width + 7) // 8
    if width != words * 8:
        padded = np.zeros((m, words * 8), dtype=np.uint8)
        padded[:, :width] = block
        block = padded
    w = np.ascontiguousarray(block).view("<u8")
    for j in range(words):
        mixed = fmix64(h ^ w[:, j])
        h = mixed if n_words is None else np.where(j < n_words, mixed, h)
    return h


def hex16(h: np.ndarray) -> pa.Array:
    """uint64 values as 16-character lowercase hex strings (an Arrow string array)."""
    h = np.ascontiguousarray(h, dtype=">u8")
    out = _HEX2[h.view(np.uint8)]
    offsets = np.arange(0, 16 * len(h) + 1, 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(h), pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def combine_unordered(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A hash of the set {a, b}: the same for (a, b) and (b, a)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return fmix64(fmix64(lo ^ _GOLDEN) ^ hi)


def pair_ids(chosen_ids, rejected_ids) -> pa.Array:
    """Stable, order-free ids of pairs of response (or node) ids, 16 hex characters."""
    return hex16(combine_unordered(hash64(chosen_ids), hash64(rejected_ids)))


def assistant_messages(texts) -> pa.Array:
    """Each text as a one-message conversation ``[{role: assistant, content: text}]``."""
    arr = _as_large_string(texts).cast(pa.string())
    n = len(arr)
    roles = pa.repeat(pa.scalar("assistant", pa.string()), n)
    values = pa.StructArray.from_arrays([roles, arr], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values)


def take(column: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> pa.Array:
    """Rows of an Arrow column by position (one contiguous array out)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column.take(pa.array(rows, pa.int64()))


def plain_types(t: pa.DataType) -> pa.DataType:
    """The same type with large_string/string_view -> string and large_list -> list."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(pa.field(t.value_field.name, plain_types(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, plain_types(f.type), f.nullable) for f in t])
    return t


def to_arrow(df: pl.DataFrame) -> pa.Table:
    """A polars frame as an Arrow table with the plain (32-bit offset) types the schemas use."""
    table = df.to_arrow()
    schema = pa.schema([pa.field(f.name, plain_types(f.type)) for f in table.schema])
    return table.cast(schema) if not schema.equals(table.schema) else table
