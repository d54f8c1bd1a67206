"""The column contract (DESIGN.md) as Arrow types, plus the ids that tie tables together.

Pair tables follow TRL's conversational preference format: ``prompt``, ``chosen`` and
``rejected`` are lists of ``{role, content}`` messages, so TRL loads them unchanged.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

ROLES = ("system", "user", "assistant", "tool")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

SAMPLING = pa.struct(
    [
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("max_new_tokens", pa.int64()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),  # a reply is cut before the first of these ([]: none)
        ("min_new_tokens", pa.int64()),
    ]
)

PROMPT = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("source", pa.string()),
    ]
)

RESPONSE = pa.schema(
    list(PROMPT)
    + [
        ("response_id", pa.string()),
        ("response", pa.string()),
        ("generator", pa.string()),
        ("sample_index", pa.int64()),
        ("sampling", SAMPLING),
    ]
)

# Written by ``sample`` beside the response columns (imported responses have none):
# ``stop`` (eos or a stop string ended the reply) or ``length`` (cut at max_new_tokens).
FINISH_REASON = pa.field("finish_reason", pa.string())

PAIR = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("margin", pa.float64()),
        ("pair_strategy", pa.string()),
        ("label_source", pa.string()),
    ]
)

# Pair-level columns later steps add (noise, CHES, rationales); optional.
PAIR_OPTIONAL = pa.schema(
    [
        ("strength", pa.float64()),
        ("flip_prob", pa.float64()),
        ("ches", pa.float64()),
        ("rationale", pa.string()),
    ]
)

LIST = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("responses", MESSAGES),
        ("scores", pa.list_(pa.float64())),
    ]
)

QUARANTINE_REASON = "reason"


def stable_hash(obj, length: int = 16) -> str:
    """A hash of a JSON-able object that is the same on every machine and run."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def prompt_id(messages: list[dict]) -> str:
    """Stable id of a conversation: the hash of its (role, content) sequence."""
    return stable_hash([[m["role"], m["content"]] for m in messages])


def response_id(prompt_id_: str, generator: str, text: str, sample_index: int) -> str:
    return stable_hash([prompt_id_, generator, sample_index, text])


def pair_id(chosen_id: str, rejected_id: str) -> str:
    return stable_hash([chosen_id, rejected_id])


def score_column(name: str) -> str:
    return f"score_{name}"


def missing_columns(schema_or_names, required) -> list[str]:
    names = set(schema_or_names.names if hasattr(schema_or_names, "names") else schema_or_names)
    return [c for c in required if c not in names]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast the contract's columns to their Arrow types; extra columns are kept as they are."""
    for f in schema:
        if f.name in table.column_names:
            i = table.column_names.index(f.name)
            if not table.schema.field(i).type.equals(f.type):
                table = table.set_column(i, f.name, table.column(i).cast(f.type))
    return table
