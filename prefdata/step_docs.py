"""``prefdata steps``: every step's kind, columns and options, read from the code itself.

Options come from the step's config dataclass: the type, the default and a help line
(field metadata ``help``, else the comment after the field in the source, else a line of
the config's docstring that starts with the field's name). Columns are what the step
declares with its default options; steps whose columns depend on an option say so.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from prefdata.steps import STEPS, step_class

MISSING = "(required)"
COMMON_HELP = {  # options many steps share, when the step says nothing more specific
    "model": "Hugging Face id, local path, or smollm2-135m-instruct (the embedded model)",
    "backend": "auto | transformers | vllm | api (auto: vLLM when installed and a GPU is present)",
    "device": "auto | cpu | cuda",
    "dtype": "auto | float32 | bfloat16 | float16",
    "batch_size": "sequences per forward pass (speed and memory only)",
    "seed": "seed of the step's random choices (recorded; same seed, same output)",
    "name": "the name in the columns this step writes",
    "model_options": "extra backend options, e.g. base_url and api_key_env for backend api",
    "trust_remote_code": "run code shipped with a Hub model (off by default)",
    "limit": "read only the first N distinct prompts",
    "n": "how many (for sample: replies per prompt)",
    "temperature": "sampling temperature (0: greedy)",
    "top_p": "nucleus sampling: smallest token set with this probability mass",
    "max_new_tokens": "longest reply, in tokens",
    "min_margin": "no pair whose score margin is below this",
    "append": "add replies to a response table (another generator or temperature)",
}


def describe_steps(names: list[str] | None = None) -> list[dict]:
    """One entry per step: name, kind, summary, reads, writes, options (or an import error)."""
    out = []
    for name in names or list(STEPS):
        try:
            cls = step_class(name)
        except ImportError as exc:
            out.append({"name": name, "error": f"cannot be imported here: {exc}"})
            continue
        out.append(describe_step(name, cls))
    return out


def describe_step(name: str, cls: type) -> dict:
    entry = {"name": name, "kind": getattr(cls, "kind", "?"), "summary": _first_line(cls.__doc__),
             "version": getattr(cls, "version", "?"), "reads": None, "writes": None, "options": []}
    config_cls = getattr(cls, "Config", None)
    if config_cls is not None and dataclasses.is_dataclass(config_cls):
        entry["options"] = options(config_cls)
    step = _default_instance(cls, config_cls)
    if step is not None:
        try:
            reads = list(step.input_columns())
            entry["reads"] = reads
            after = step.output_columns(list(reads))
            entry["writes"] = [c for c in after if c not in reads]
        except Exception:  # columns that depend on the data or on required options
            pass
    return entry


def options(config_cls: type) -> list[dict]:
    comments = _field_comments(config_cls)
    doc_help = _docstring_help(config_cls)
    module_help = _module_help(config_cls)
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:
        hints = {}
    out = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
            default = default if len(default) <= 40 else default[:37] + "..." + default[0]
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = MISSING
        text = f.metadata.get("help") or comments.get(f.name) or doc_help.get(f.name) or module_help.get(f.name) \
            or COMMON_HELP.get(f.name, "")
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default,
                    "help": _plain(text)})
    return out


def format_steps(entries: list[dict]) -> str:
    blocks = []
    for e in entries:
        if "error" in e:
            blocks.append(f"{e['name']}: {e['error']}")
            continue
        lines = [f"{e['name']} ({e['kind']} step, version {e['version']}): {_plain(e['summary'])}"]
        lines.append("  reads:   " + ((", ".join(e["reads"]) or "(none declared)") if e["reads"] is not None
                                   else "depends on its options")
                     if e["kind"] != "source" else "  reads:   a file (see its options)")
        if e["writes"] is not None:
            lines.append("  writes:  " + (", ".join(e["writes"]) or "(no new columns)"))
        else:
            lines.append("  writes:  depends on its options and input")
        if e["options"]:
            lines.append("  options:")
            width = max(len(f"{o['name']}: {o['type']} = {o['default']}") for o in e["options"])
            width = min(width, 56)
            for o in e["options"]:
                head = f"{o['name']}: {o['type']} = {o['default']}"
                lines.append(f"    {head:<{width}}  {o['help']}".rstrip())
        else:
            lines.append("  options: none")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _default_instance(cls: type, config_cls: type | None) -> Any:
    """An instance with default options, without running its checks; None when the
    config has required options."""
    try:
        config = config_cls() if config_cls is not None else None
    except TypeError:
        return None
    step = cls.__new__(cls)
    step.config = config
    return step


def _field_comments(config_cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _docstring_help(config_cls: type) -> dict[str, str]:
    out = {}
    for line in (config_cls.__doc__ or "").splitlines():
        m = re.match(r"\s*[`*]*(\w+)[`*]*\s*[:\-]\s+(.+)$", line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def _module_help(config_cls: type) -> dict[str, str]:
    """Lines of the step module's docstring that introduce an option: ``* ``name``: text``."""
    import sys

    module = sys.modules.get(config_cls.__module__)
    out = {}
    for line in ((module.__doc__ if module else "") or "").splitlines():
        m = re.match(r"\s*(?:[*-]\s+)?``(\w+)``\s*(?:\([^)]*\))?\s*[:\-—]\s+(.+)$", line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip().rstrip(";"))
    return out


def _type_name(hint: Any) -> str:
    if isinstance(hint, str):
        return hint
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        text = str(hint).replace("typing.", "")
        return re.sub(r"\bNoneType\b", "None", text)
    return getattr(hint, "__name__", str(hint))


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


def _plain(text: str) -> str:
    """Docstring text without reStructuredText markup."""
    return text.replace("``", "").replace("`", "")
