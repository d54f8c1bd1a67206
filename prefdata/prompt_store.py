"""Per-prompt results of a map step, reused whatever the run's ``--limit`` or ``shard_size``.

A map step's output for a prompt depends only on that prompt's input rows and on the step
itself (config, version, models: ``Step.own_fingerprint()``); sampling is seeded per
(seed, prompt_id, sample_index), so no other prompt in the shard changes it. The store
keeps every computed prompt's output under ``<workdir>/_prompts/<step>-<own fingerprint>/``
keyed by a hash of the prompt's input rows (column names and types, and every value:
different upstream content never hits). Before a shard is computed the prompts already in
the store are taken from it and the step runs on the rest only, so ``--limit 10`` then
``--limit 100`` computes 90 prompts, and a new ``shard_size`` computes none.

Layout: ``part-<id>.parquet`` holds the output rows of one computation (with a
``_prompt_key`` column), the keys it computed and its counts in the file metadata (a
prompt whose rows were all dropped is still known), ``part-<id>.quarantine.parquet`` its
quarantined rows. Parts are written temp-then-rename; ``index.parquet`` (key -> part) is
only a cache: parts it does not list are read on load, so a crash loses nothing.

A step whose output for a prompt depends on other prompts sets ``prompt_local = False``
and is computed per shard as before.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from prefdata.io import read_metadata, write_parquet

log = logging.getLogger(__name__)

STORE_DIR = "_prompts"
KEY = "_prompt_key"
PART_META = "prefdata_part"
INDEX = "index.parquet"


def prompt_local(step) -> bool:
    """Whether a map step's output for a prompt depends on that prompt's rows only."""
    return bool(getattr(step, "prompt_local", True))


def own_fingerprint(step) -> str:
    """The step's fingerprint without upstream (``Step.own_fingerprint``, when present)."""
    own = getattr(step, "own_fingerprint", None)
    return own() if callable(own) else step.fingerprint("")


def prompt_keys(table: pa.Table) -> pl.DataFrame:
    """One row per prompt, in first-appearance order: ``prompt_id``, ``key``.

    The key hashes the schema and every row of the prompt, in order (two 64-bit row hashes
    with different seeds per row, then SHA-256 over the prompt's rows).
    """
    if "prompt_id" not in table.column_names:
        raise ValueError("no prompt_id column")
    table = table.replace_schema_metadata(None)
    frame = pl.from_arrow(table)
    if not isinstance(frame, pl.DataFrame):
        frame = frame.to_frame()
    schema = ";".join(f"{f.name}:{f.type}" for f in table.schema).encode()
    rows = pl.DataFrame({
        "prompt_id": frame["prompt_id"],
        "h0": frame.hash_rows(seed=0), "h1": frame.hash_rows(seed=1),
    })
    grouped = rows.group_by("prompt_id", maintain_order=True).agg("h0", "h1")
    keys = []
    for h0, h1 in zip(grouped["h0"].to_list(), grouped["h1"].to_list()):
        pair = np.stack([np.asarray(h0, dtype=np.uint64), np.asarray(h1, dtype=np.uint64)], axis=1)
        keys.append(hashlib.sha256(schema + pair.tobytes()).hexdigest()[:32])
    return pl.DataFrame({"prompt_id": grouped["prompt_id"], "key": keys})


class PromptStore:
    """The per-prompt results of one map step (by its own fingerprint) in one workdir."""

    def __init__(self, workdir: str | Path, step_name: str, own_fp: str):
        self.dir = Path(workdir) / STORE_DIR / f"{step_name}-{own_fp}"
        self._index: dict[str, str] | None = None
        self.reuse = True  # False under --force: compute everything, still store it

    @classmethod
    def for_step(cls, workdir: str | Path, step) -> "PromptStore":
        return cls(workdir, step.name, own_fingerprint(step))

    def __getstate__(self):
        return {"dir": self.dir, "_index": None, "reuse": self.reuse}

    # -- index --------------------------------------------------------------------------
    def index(self) -> dict[str, str]:
        """key -> part file name, from ``index.parquet`` and every part it does not list."""
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def _load_index(self) -> dict[str, str]:
        index: dict[str, str] = {}
        path = self.dir / INDEX
        if path.is_file():
            try:
                t = pq.read_table(path)
                index = dict(zip(t["key"].to_pylist(), t["part"].to_pylist()))
            except (pa.ArrowInvalid, OSError, KeyError) as exc:
                log.warning("prompt store %s: index unreadable (%s); rebuilding it from the parts", self.dir, exc)
                index = {}
        listed = set(index.values())
        for part in sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []:
            if part.name.endswith(".quarantine.parquet") or part.name in listed:
                continue
            for key in self.part_info(part.name).get("keys", []):
                index[key] = part.name
        return index

    def part_info(self, part: str) -> dict:
        return read_metadata(self.dir / part, PART_META) or {}

    def save_index(self) -> None:
        """Write the index cache (atomic); a missing or stale one is rebuilt on load."""
        self._index = None
        index = self.index()
        if index:
            write_parquet(pa.table({"key": list(index), "part": list(index.values())}), self.dir / INDEX)

    # -- reading and writing --------------------------------------------------------------
    def known(self, keys: list[str]) -> set[str]:
        """The keys among ``keys`` whose results the store holds (none under --force)."""
        if not self.reuse:
            return set()
        index = self.index()
        return {k for k in keys if k in index}

    def write_part(self, out, keys: pl.DataFrame, counts: dict) -> str:
        """Store one computation's output (``Output``) for the prompts in ``keys``.

        Raises ``ValueError`` when the output cannot be attributed to prompts (no
        ``prompt_id``, or ids that were not in the input).
        """
        table = _with_keys(out.table, keys, "output")
        quarantine = None
        if out.quarantine is not None and out.quarantine.num_rows:
            quarantine = _with_keys(out.quarantine, keys, "quarantine")
        name = f"part-{uuid.uuid4().hex[:16]}.parquet"
        if quarantine is not None:
            write_parquet(quarantine, self.dir / name.replace(".parquet", ".quarantine.parquet"))
        meta = {"keys": keys["key"].to_list(), "counts": counts}
        write_parquet(table, self.dir / name, metadata={PART_META: meta})
        index = self.index()
        for key in meta["keys"]:
            index[key] = name
        return name

    def assemble(self, keys: pl.DataFrame) -> tuple[pa.Table, pa.Table | None, dict]:
        """The shard for these prompts (in this order) from the store, its quarantine, and
        the counts of the parts it wholly contains (``reused_prompts_uncounted`` for the
        prompts of parts it only partly contains)."""
        index = self.index()
        order = keys.with_row_index("_rank").select(pl.col("key").alias(KEY), "_rank")
        wanted = set(order[KEY].to_list())
        by_part: dict[str, list[str]] = {}
        for key in order[KEY].to_list():
            by_part.setdefault(index[key], []).append(key)
        tables, quarantines, counts = [], [], {}
        for part, part_keys in by_part.items():
            tables.append(_read_rows(self.dir / part, part_keys))
            q = self.dir / part.replace(".parquet", ".quarantine.parquet")
            if q.is_file():
                quarantines.append(_read_rows(q, part_keys))
            info = self.part_info(part)
            if set(info.get("keys", [])) <= wanted:
                for k, v in info.get("counts", {}).items():
                    if isinstance(v, (int, float)) and k not in ("seconds", "quarantined"):
                        counts[k] = counts.get(k, 0) + v
            else:
                counts["reused_prompts_uncounted"] = counts.get("reused_prompts_uncounted", 0) + len(part_keys)
        return _in_order(tables, order), (_in_order(quarantines, order) if quarantines else None), counts


def _with_keys(table: pa.Table, keys: pl.DataFrame, what: str) -> pa.Table:
    if table.num_rows == 0:
        return table.append_column(KEY, pa.array([], pa.string()))
    if "prompt_id" not in table.column_names:
        raise ValueError(f"its {what} has no prompt_id column")
    ids = pl.from_arrow(table.select(["prompt_id"]))
    joined = ids.join(keys, on="prompt_id", how="left", maintain_order="left")
    if joined["key"].null_count():
        raise ValueError(f"its {what} has prompt_id(s) that were not in its input")
    return table.append_column(KEY, joined["key"].to_arrow().cast(pa.string()))


def _read_rows(path: Path, keys: list[str]) -> pa.Table:
    table = pq.read_table(path, filters=[(KEY, "in", keys)])
    return table.replace_schema_metadata(None)


def _in_order(tables: list[pa.Table], order: pl.DataFrame) -> pa.Table:
    """Rows grouped by prompt in ``order``; within a prompt, the order they were stored in."""
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    keys = pl.from_arrow(table.select([KEY])).with_row_index("_row")
    rows = keys.join(order, on=KEY, how="left").sort(["_rank", "_row"])["_row"].to_numpy()
    return table.take(pa.array(rows)).drop_columns([KEY])
