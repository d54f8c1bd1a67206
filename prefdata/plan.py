"""What a run would do, and why: ``prefdata run --dry-run``.

For each step: ``cached`` (its folder is complete), ``partly cached`` (some shards, or
prompts in the prompt store, would be reused) or ``compute``, with the reasons found by
comparing the step's fingerprint parts with the ``_SUCCESS.json`` markers of earlier runs
of a step of the same name in the workdir (config change, input change, model change,
version change, layout change); and which models would load.
"""

from __future__ import annotations

from pathlib import Path

from prefdata import shards
from prefdata.step import MapStep

SAME = object()


def plan_pipeline(pipeline) -> list[dict]:
    parts = pipeline.fingerprint_parts()
    fps = pipeline.fingerprints()
    dirs = pipeline.step_dirs(fps)
    labels = pipeline.labels()
    out = []
    recompute_upstream = False
    content_upstream = False  # an earlier step computes different rows for the same prompts
    for i, (step, step_dir, fp) in enumerate(zip(pipeline.steps, dirs, fps)):
        forced = pipeline.force_from is not None and i >= pipeline.force_from
        marker = None if forced else shards.read_marker(step_dir)
        entry = {"index": i, "step": step.name, "label": labels[i], "kind": step.kind, "fingerprint": fp,
                 "dir": str(step_dir), "reasons": [], "models": []}
        # only a map step keeps an interrupted run's shards (a source or global step writes all again)
        done = _done_shards(step_dir) if step_dir.is_dir() and not forced and isinstance(step, MapStep) else 0
        if marker is not None:
            entry["status"] = "cached"
        else:
            entry["status"] = "partly cached" if done else "compute"
            if done:
                entry["reasons"].append(f"{done} shard(s) of an interrupted run are kept")
            if forced:
                entry["reasons"].append("--force")
            else:
                entry["reasons"] += change_reasons(step_dir, parts[i], parts, i)
            stored = _stored_prompts(pipeline, i)
            if stored and not forced and not content_upstream:
                entry["status"] = "partly cached"
                entry["reasons"].append(
                    f"prompt store: {stored} prompt(s) done with this config and models; only the others compute")
            elif stored and not forced:
                entry["reasons"].append(
                    f"prompt store: {stored} prompt(s) done with this config and models, but an earlier step "
                    "changes their input, so few if any will match")
            entry["models"] = _models(step, parts[i])
        if recompute_upstream and marker is None and not entry["reasons"]:
            entry["reasons"].append("input change (an earlier step recomputes)")
        recompute_upstream = recompute_upstream or marker is None
        content_upstream = content_upstream or forced or any(_changes_content(r) for r in entry["reasons"])
        out.append(entry)
    return out


def _changes_content(reason: str) -> bool:
    """Whether a reason changes the rows of prompts already computed (a larger --limit or
    another shard_size does not)."""
    if reason.startswith("config change: "):
        return any(not c.startswith("limit ") for c in reason.removeprefix("config change: ").split("; "))
    return reason.startswith(("model change", "version change", "input change (the input files"))


def change_reasons(step_dir: Path, parts: dict, all_parts: list[dict], index: int) -> list[str]:
    """Why this fingerprint has no finished folder: diffs against the newest earlier run."""
    earlier = _earlier_markers(step_dir)
    if not earlier:
        return ["not run before in this workdir"]
    old = earlier[0].get("parts")
    if not isinstance(old, dict):
        return ["changed since the last run (its marker predates recorded fingerprint parts)"]
    reasons = []
    if old.get("version") != parts.get("version"):
        reasons.append(f"version change ({old.get('version')} -> {parts.get('version')})")
    changed = _diff(old.get("config"), parts.get("config"))
    if changed:
        reasons.append("config change: " + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
    if old.get("models") != parts.get("models"):
        reasons.append("model change: " + _model_diff(old.get("models") or [], parts.get("models") or []))
    if old.get("extra") != parts.get("extra"):
        reasons.append("input change (the input files' content)")
    if old.get("layout") != parts.get("layout"):
        reasons.append(f"layout change ({_fmt(old.get('layout'))} -> {_fmt(parts.get('layout'))})")
    if old.get("upstream") != parts.get("upstream"):
        reasons.append("input change (an earlier step's output differs)")
    return reasons or ["changed since the last run"]


def _earlier_markers(step_dir: Path) -> list[dict]:
    """Markers of other folders of the same step name, newest first."""
    name = step_dir.name.rsplit("-", 1)[0]
    found = []
    for other in step_dir.parent.glob(f"{name}-*"):
        if other == step_dir or other.name.rsplit("-", 1)[0] != name:
            continue
        marker_path = other / shards.MARKER
        if marker_path.is_file():
            marker = shards.read_marker(other)
            if isinstance(marker, dict):
                found.append((marker_path.stat().st_mtime, marker))
    return [m for _, m in sorted(found, key=lambda x: x[0], reverse=True)]


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, SAME if key not in old else None),
                         new.get(key, SAME if key not in new else None), f"{prefix}{key}.")
        return out
    if old == new:
        return []
    name = prefix.rstrip(".")
    if old is SAME:
        return [f"{name} added ({_fmt(new)})"]
    if new is SAME:
        return [f"{name} removed"]
    return [f"{name} {_fmt(old)} -> {_fmt(new)}"]


def _model_diff(old: list, new: list) -> str:
    def name(m):
        return m.get("name", "?") if isinstance(m, dict) else str(m)

    pairs = []
    for a, b in zip(old, new):
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) and isinstance(b, dict) else []
            pairs.append(f"{name(b)} ({', '.join(keys) or 'identity'} changed)")
    if len(old) != len(new):
        pairs.append(f"{len(old)} -> {len(new)} model(s)")
    return "; ".join(pairs) or "identity changed"


def _fmt(v) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _done_shards(step_dir: Path) -> int:
    return len(list(step_dir.glob("shard-*.parquet")))


def _stored_prompts(pipeline, index: int) -> int:
    step = pipeline.steps[index]
    if not isinstance(step, MapStep):
        return 0
    store = pipeline.prompt_store(index)
    if store is None or not store.dir.is_dir():
        return 0
    return len(store.index())


def _models(step, parts: dict) -> list[str]:
    """The models the step would load, resolved as the fingerprint sees them."""
    resolved = [m for m in parts.get("models") or [] if isinstance(m, dict)]
    if resolved:
        out = []
        for m in resolved:
            if m.get("kind") == "api" or m.get("backend") == "api":
                out.append(f"{m.get('name')} (called over the API, not loaded)")
            else:
                out.append(f"{m.get('name')} ({m.get('kind', 'lm')}: {m.get('backend')}, {m.get('device')}, "
                           f"{m.get('dtype')})")
        return out
    refs = getattr(step, "models", None)
    return [f"{ref.name} ({getattr(ref, 'kind', 'lm')})" for ref in (refs() if callable(refs) else [])]


def format_plan(plan: list[dict]) -> str:
    width = max([16] + [len(e["label"]) + 2 for e in plan])
    lines = [f"{'step':<{width}}{'fingerprint':<18}status", "-" * (width + 34)]
    for e in plan:
        lines.append(f"{e['label']:<{width}}{e['fingerprint']:<18}{e['status']}")
        for reason in e["reasons"]:
            lines.append(f"{'':<{width}}  - {reason}")
        for model in e["models"]:
            lines.append(f"{'':<{width}}  loads {model}")
    n = sum(e["status"] != "cached" for e in plan)
    lines.append("")
    lines.append(f"{n} of {len(plan)} step(s) would compute; nothing was run")
    return "\n".join(lines)
