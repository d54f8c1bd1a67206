"""Steps: a config dataclass, declared columns, and one method that maps a table to a table.

Two kinds, after datatrove and distilabel:

* ``MapStep`` works on one shard of prompts at a time (all responses of a prompt live in
  the same shard). It may hold a model, loaded once in ``setup()`` — and only when some
  shard of the step still has to be computed.
* ``GlobalStep`` needs the whole table; it gets a polars ``LazyFrame`` over all shards.

A ``Source`` step produces the first table from outside data (files).

The fingerprint of a step is a hash of its name, version, canonical config and the
fingerprint of the step before it, so changing one step recomputes it and what follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import polars as pl
import pyarrow as pa


@dataclass
class Output:
    """What ``process`` may return instead of a bare table: rows kept, rows quarantined.

    ``quarantine`` rows carry a ``reason`` column; the runner writes them next to the
    step's shards and counts them, so nothing is dropped silently. ``counts`` adds
    named counters (``dropped_<reason>`` …) to the run summary.
    """

    table: pa.Table
    quarantine: pa.Table | None = None
    counts: dict[str, int] = field(default_factory=dict)


class Step:
    """Base of every step. Subclasses set ``name``, ``Config`` and the column methods."""

    name: ClassVar[str] = "step"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "map"
    Config: ClassVar[type] = None  # a dataclass

    def __init__(self, config: Any = None, **kwargs: Any):
        if config is None:
            config = build_config(self.Config, kwargs, where=f"step '{self.name}'")
        elif kwargs:
            raise TypeError(f"step '{self.name}': pass either a config or keyword arguments")
        self.config = config
        self.check()

    # -- declared columns -------------------------------------------------------------
    def input_columns(self) -> list[str]:
        """Columns this step reads; the runner checks them before any work starts."""
        return []

    def output_columns(self, columns: list[str]) -> list[str]:
        """Columns after this step, given the columns before it (default: adds nothing)."""
        return list(columns)

    # -- lifecycle ----------------------------------------------------------------------
    def check(self) -> None:
        """Validate the config and optional dependencies at construction time."""

    def setup(self) -> None:
        """Load models or other heavy state; called at most once per run, lazily."""

    def teardown(self) -> None:
        """Release what ``setup`` loaded."""

    def fingerprint_extra(self) -> Any:
        """Anything besides the config that decides the output (e.g. an input file hash)."""
        return None

    def fingerprint(self, upstream: str = "") -> str:
        payload = {
            "name": self.name,
            "version": self.version,
            "config": canonical(self.config),
            "extra": self.fingerprint_extra(),
            "upstream": upstream,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class Source(Step):
    """Produces the first table of a pipeline from outside data."""

    kind: ClassVar[str] = "source"

    def read(self) -> pa.Table | Output:
        raise NotImplementedError


class MapStep(Step):
    """Maps one shard (a table of whole prompts) to a table."""

    kind: ClassVar[str] = "map"

    def process(self, table: pa.Table) -> pa.Table | Output:
        raise NotImplementedError


class GlobalStep(Step):
    """Maps the whole dataset, as a polars LazyFrame over all shards, to a table."""

    kind: ClassVar[str] = "global"

    def process(self, frame: pl.LazyFrame) -> pa.Table | pl.DataFrame | Output:
        raise NotImplementedError


# -- configs ------------------------------------------------------------------------------
def canonical(obj: Any) -> Any:
    """A JSON-able canonical form of a config (dataclasses, tuples, paths …)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def build_config(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build a config dataclass from a dict, refusing unknown keys and wrong types."""
    if cls is None:
        if values:
            raise TypeError(f"{where} takes no options, got {sorted(values)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; known options: {sorted(fields)}"
        )
    hints = _type_hints(cls)
    clean = {}
    for key, value in values.items():
        clean[key] = _coerce(value, hints.get(key), f"{where}: option '{key}'")
    try:
        return cls(**clean)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a simple type hint; ints are accepted for floats."""
    import types
    import typing

    if hint is None or hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{where}: {value!r} does not fit {hint}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else None
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value
