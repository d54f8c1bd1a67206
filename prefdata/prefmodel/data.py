"""Pair tables for preference models: any table with ``prompt``, ``chosen``, ``rejected``
(TRL's conversational columns, as prefdata's build step, imports and Argilla merges write
them; plain strings are accepted too). Each distinct (prompt, response) becomes one item,
so a response that appears in several pairs is featurised once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from prefdata.train.data import DataError

REQUIRED = ("prompt", "chosen", "rejected")


@dataclass
class Pairs:
    path: str
    conversations: list[list[dict]]          # per item
    texts: list[str]                         # per item
    chosen: np.ndarray                       # per pair: item index
    rejected: np.ndarray
    groups: list[str]                        # per pair: prompt_id (eval split unit)
    margin: np.ndarray | None = None
    source: list[str] | None = None
    label_source: list[str] | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)


def read_pairs(path: str | Path, margin_column: str | None = None,
               label_source: str | None = None) -> Pairs:
    """Read and check a pair parquet; ``label_source`` (``ai``|``human``) keeps only those pairs."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    names = pq.read_schema(path).names if path.is_file() else pq.read_table(path).schema.names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a preference-model pair table needs "
                        f"{list(REQUIRED)} (found {names}). Point it at the output of build_pairs or import_pairs")
    if margin_column and margin_column not in names:
        raise DataError(f"{path}: margin_column '{margin_column}' is not a column (found {names}); "
                        "unset margin_column or name an existing numeric column")
    extra = [c for c in ("prompt_id", "source", "label_source", margin_column) if c and c in names]
    rows = pq.read_table(path, columns=list(REQUIRED) + list(dict.fromkeys(extra))).to_pydict()
    n = len(rows["prompt"])
    if n == 0:
        raise DataError(f"{path}: the table has no rows")
    keep = list(range(n))
    if label_source is not None:
        if "label_source" not in rows:
            raise DataError(f"{path}: label_source={label_source!r} asked, but the table has no 'label_source' column")
        keep = [i for i in keep if rows["label_source"][i] == label_source]
        if not keep:
            raise DataError(f"{path}: no pair has label_source == {label_source!r}")
    index: dict[str, int] = {}
    convs, texts, c_idx, r_idx, groups = [], [], [], [], []
    for i in keep:
        prompt = _prompt(rows["prompt"][i], path, i)
        pkey = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        pair = []
        for col in ("chosen", "rejected"):
            text = _text(rows[col][i], path, i, col)
            key = pkey + "\x00" + text
            if key not in index:
                index[key] = len(texts)
                convs.append(prompt)
                texts.append(text)
            pair.append(index[key])
        c_idx.append(pair[0])
        r_idx.append(pair[1])
        groups.append(str(rows["prompt_id"][i]) if "prompt_id" in rows else pkey)
    out = Pairs(str(path), convs, texts, np.array(c_idx), np.array(r_idx), groups,
                stats={"rows": n, "pairs": len(keep), "items": len(texts)})
    if margin_column:
        vals = [rows[margin_column][i] for i in keep]
        bad = [i for i, v in zip(keep, vals) if v is None]
        if bad:
            raise DataError(f"{path}: margin column '{margin_column}' is empty in row {bad[0]} "
                            f"({len(bad)} rows); fill it or unset margin_column")
        out.margin = np.asarray(vals, dtype=np.float32)
    for col in ("source", "label_source"):
        if col in rows:
            setattr(out, col, [str(rows[col][i]) for i in keep])
    return out


def _prompt(value, path, row: int) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not value:
        raise DataError(f"{path}, row {row}: 'prompt' is empty; every pair needs a prompt")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{path}, row {row}: 'prompt' must be a string or a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"] or ""} for m in value]


def _text(value, path, row: int, column: str) -> str:
    """The response text: a string, or the last message's content of a message list."""
    if isinstance(value, list):
        value = value[-1].get("content") if value and isinstance(value[-1], dict) else None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}, row {row}: '{column}' is empty; drop the row or regenerate the response")
    return value
