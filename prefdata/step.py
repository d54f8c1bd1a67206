"""Steps: a config dataclass, declared columns, and one method that maps a table to a table.

Two kinds, after datatrove and distilabel:

* ``MapStep`` works on one shard of prompts at a time (all responses of a prompt live in
  the same shard). It may hold a model, loaded once in ``setup()`` — and only when some
  shard of the step still has to be computed.
* ``GlobalStep`` needs the whole table; it gets a polars ``LazyFrame`` over all shards.

A ``Source`` step produces the first table from outside data (files).

The fingerprint of a step is a hash of its name, version, canonical config, the resolved
identity of every model it names (``models()``: Hub commit or content hash, backend, device
kind and dtype resolved) and the fingerprint of the step before it, so changing one step —
or the weights behind a model name — recomputes it and what follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

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


# Config fields of a model-holding step that ``models()`` carries, resolved, into the fingerprint.
MODEL_SETTINGS = ("backend", "device", "dtype")


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

    # -- models and fingerprints --------------------------------------------------------
    def models(self) -> list:
        """The models this step runs, as ``ModelRef``s (config values, unresolved)."""
        return []

    @property
    def holds_model(self) -> bool:
        """True when the step loads weights in this process (an API model does not)."""
        return any(not ref.is_api for ref in self.models())

    def model_identities(self) -> list[dict]:
        """The resolved identity of each model (memoised per process where safe)."""
        from prefdata.models.identity import resolve_identity

        out = []
        for ref in self.models():
            try:
                out.append(resolve_identity(ref))
            except ValueError as exc:
                raise ValueError(f"step '{self.name}': {exc}") from None
        return out

    def fingerprint_parts(self, upstream: str = "") -> dict:
        """Everything the fingerprint hashes, for dry-run reasons and debugging.

        The config's model settings (``MODEL_SETTINGS``) enter through the resolved model
        identities only, so ``device: auto`` and ``device: cpu`` are one computation on a
        CPU machine, and the same ``auto`` is another one on a GPU machine.
        """
        models = self.model_identities()
        config = canonical(self.config)
        if models and isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in MODEL_SETTINGS}
        return {
            "name": self.name,
            "version": self.version,
            "config": config,
            "extra": canonical(self.fingerprint_extra()),
            "models": models,
            "upstream": upstream,
        }

    def fingerprint(self, upstream: str = "") -> str:
        return _digest(self.fingerprint_parts(upstream))

    def own_fingerprint(self) -> str:
        """The fingerprint without the upstream chain: same step, same models, same config."""
        parts = self.fingerprint_parts("")
        parts.pop("upstream")
        return _digest(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class Source(Step):
    """Produces the first table of a pipeline from outside data.

    A source defines ``read`` (the whole table at once) or ``read_batches`` (the table in
    pieces, in order, each a table or an ``Output`` whose counts are added up); either one
    gives the other. The runner writes shards from ``read_batches`` as they come, so a
    source that reads its file in batches never holds the whole input. The shards are
    those of the concatenated pieces: rows in stream order, or with ``adjacent_prompts``
    each prompt's rows together where its first row was; ``output_schema`` may reorder the
    columns of the pieces' unified schema (a column that only later pieces have).
    """

    kind: ClassVar[str] = "source"
    adjacent_prompts: ClassVar[bool] = False

    def read(self) -> pa.Table | Output:
        """The whole output at once (tests, small inputs): the batches, collected."""
        if type(self).read_batches is Source.read_batches:
            raise NotImplementedError(f"source '{self.name}' defines neither read() nor read_batches()")
        from prefdata.shards import collect

        return collect(self.read_batches(), self.adjacent_prompts, self.output_schema)

    def read_batches(self) -> Iterator[pa.Table | Output]:
        """The output in pieces, in order (default: ``read()`` as one piece)."""
        if type(self).read is Source.read:
            raise NotImplementedError(f"source '{self.name}' defines neither read() nor read_batches()")
        yield self.read()

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The output's schema, given the unified schema of all pieces (default: that one)."""
        return schema


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


def _digest(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    """Resolved annotations of a config dataclass; an unresolvable one is an error, never
    a silent "no type checking" (string annotations are evaluated in the module of the
    class that declares the field)."""
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # resolve field by field below, to name the one that fails
        pass
    hints = {}
    for klass in reversed(cls.__mro__):
        own = klass.__dict__.get("__annotations__", {})
        module = sys.modules.get(klass.__module__)
        globalns = dict(vars(module)) if module else {}
        localns = {klass.__name__: klass, cls.__name__: cls}
        for name, annotation in own.items():
            try:
                hints[name] = _evaluate(annotation, globalns, localns)
            except Exception as exc:
                raise TypeError(
                    f"config {cls.__qualname__} (module {klass.__module__}): the type of field "
                    f"'{name}' ({annotation!r}) cannot be resolved ({type(exc).__name__}: {exc}), so "
                    "its values cannot be checked; import or define that name at module level "
                    "(not only under TYPE_CHECKING or inside a function)"
                ) from None
    return hints


def _evaluate(annotation: Any, globalns: dict, localns: dict) -> Any:
    """A string annotation (``from __future__ import annotations``) evaluated as
    ``get_type_hints`` would, with the class itself in scope."""
    if isinstance(annotation, str):
        return eval(annotation, globalns, localns)  # noqa: S307 - source-code annotations, not user input
    return annotation


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
                errors.append(str(exc).removeprefix(f"{where}: "))
        raise TypeError(f"{where}: {value!r} does not fit {_type_name(hint)} ({'; '.join(errors)})")
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


def _type_name(hint: Any) -> str:
    """``str | list[str] | None`` rather than ``typing.Union[str, list[str], NoneType]``."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")
