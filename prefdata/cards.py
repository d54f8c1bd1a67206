"""Dataset cards: a Hub-compatible README.md with YAML metadata, figures and PNG plots.

The card is rendered from ``cards/dataset_card.md`` with the run summary (fingerprints,
counts per step, models, ε, routing and human-agreement figures). Anything that looks
like a secret (``prefdata.io.redact``) is removed before the card is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from string import Template

import polars as pl
import yaml

from prefdata.io import redact

TEMPLATE = Path(__file__).resolve().parents[1] / "cards" / "dataset_card.md"
MODEL_FIELDS = ("model", "strong", "weak", "judge", "models", "reward_models")
PLOTTED = ("score_chosen", "score_rejected", "margin", "strength", "ches", "flip_prob")


def write_card(root: str | Path, data_files: list[Path], summary: dict, template: Path | None = None) -> Path:
    """Render README.md and plots/*.png into ``root``; returns the README path."""
    root = Path(root)
    frame = pl.scan_parquet([str(p) for p in data_files])
    columns = frame.collect_schema().names()
    plots = write_plots(root / "plots", frame, columns, summary)
    text = render(root, data_files, summary, frame, columns, plots, template or TEMPLATE)
    text = redact(text)
    path = root / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def render(root, data_files, summary, frame, columns, plots, template: Path) -> str:
    info = summary.get("info") or {}
    recipe = info.get("recipe") or {}
    card = recipe.get("card") or {}
    rel = [str(Path(p).resolve().relative_to(root.resolve())) for p in data_files]
    rows = frame.select(pl.len()).collect().item()
    level = "pair" if "chosen" in columns else "list" if "responses" in columns else "response"
    values = {
        "metadata": yaml.safe_dump(metadata(card, rel, rows), sort_keys=False).strip(),
        "title": card.get("title") or recipe.get("name") or "Preference dataset",
        "description": card.get("description") or "A preference dataset built with prefdata.",
        "recipe_name": info.get("recipe_path") or recipe.get("name") or "(Python API)",
        "rows": rows, "level": level, "files": ", ".join(f"`{r}`" for r in rel),
        "step_rows": "\n".join(step_row(s) for s in summary.get("steps", [])),
        "models": ", ".join(f"`{m}`" for m in models(summary)) or "none",
        "method_notes": method_notes(summary),
        "quality": quality(frame, columns, summary),
        "human": human(frame, columns),
        "plots": "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) or "(no numeric columns to plot)",
        "recipe_yaml": yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "# built with the Python API",
        "data_files_py": json.dumps(rel if len(rel) > 1 else rel[0]),
    }
    return Template(template.read_text()).safe_substitute(values)


def metadata(card: dict, rel: list[str], rows: int) -> dict:
    size = "n<1K" if rows < 1_000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K" if rows < 100_000 else "n>100K"
    return {
        "license": card.get("license", "other"),
        "task_categories": card.get("task_categories", ["text-generation"]),
        "tags": card.get("tags", ["dpo", "preference", "prefdata"]),
        "size_categories": [size],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": rel}]}],
    }


def step_row(s: dict) -> str:
    notes = ", ".join(f"{k}={v}" for k, v in sorted((s.get("counts") or {}).items()))
    return f"| {s['step']} | `{s['fingerprint']}` | {s['rows_in']} | {s['rows_out']} | {s['seconds']:.1f}s | {notes} |"


def models(summary: dict) -> list[str]:
    found = []
    for s in summary.get("steps", []):
        for key in MODEL_FIELDS:
            value = (s.get("config") or {}).get(key)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v and v not in found:
                    found.append(v)
    return found


def method_notes(summary: dict) -> str:
    notes = []
    for s in summary.get("steps", []):
        c = s.get("config") or {}
        if s["step"] == "score_cdr" and (c.get("weak") in (None, c.get("strong"))):
            notes.append(
                f"`score_cdr` used one model (`{c.get('strong')}`): the density ratio compares it with and "
                "without the criteria system prompt (criteria on the strong side only), not a strong "
                "model over a weak one as in the CDR paper."
            )
    return "\n\n".join(notes)


def quality(frame: pl.LazyFrame, columns: list[str], summary: dict) -> str:
    lines = []
    for s in summary.get("steps", []):
        meta = s.get("metadata") or {}
        if meta.get("epsilon") is not None:
            lines.append(f"- Estimated dataset flip rate ε = {meta['epsilon']:.4f} (step `{s['step']}`).")
    for c in ("margin", "strength", "flip_prob", "ches"):
        if c in columns:
            st = frame.select(pl.col(c).mean().alias("m"), pl.col(c).median().alias("med")).collect().row(0)
            if st[0] is not None:
                lines.append(f"- `{c}`: mean {st[0]:.4g}, median {st[1]:.4g}.")
    return "\n".join(lines) or "No noise estimates in this dataset."


def human(frame: pl.LazyFrame, columns: list[str]) -> str:
    lines = []
    if "route" in columns:
        counts = frame.group_by("route").len().collect().sort("route")
        lines.append("- Routing: " + ", ".join(f"{r} = {n}" for r, n in counts.iter_rows()))
    if "label_source" in columns:
        counts = frame.group_by("label_source").len().collect().sort("label_source")
        lines.append("- Label source: " + ", ".join(f"{r} = {n}" for r, n in counts.iter_rows()))
    if "human_agrees_with_ai" in columns:
        rate = frame.select(pl.col("human_agrees_with_ai").cast(pl.Float64).mean()).collect().item()
        if rate is not None:
            lines.append(f"- Human agreement with the AI label: {rate:.1%}")
    return "\n".join(lines) or "No human labels in this dataset."


def write_plots(folder: Path, frame: pl.LazyFrame, columns: list[str], summary: dict) -> list[Path]:
    """One histogram per numeric quality column present, and per-step row counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    wanted = [c for c in PLOTTED if c in columns]
    data = frame.select(wanted).collect() if wanted else None
    paths = []
    for c in wanted:
        values = data[c].drop_nulls().drop_nans().to_numpy()
        if len(values) == 0:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(values, bins=min(40, max(5, len(values) // 4)), color="#4477aa")
        ax.set_title(f"{c} (n={len(values)})")
        ax.set_xlabel(c)
        ax.set_ylabel("count")
        paths.append(_save(fig, folder / f"{c}.png"))
    steps = summary.get("steps", [])
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar([s["step"] for s in steps], [s["rows_out"] for s in steps], color="#66aa55")
        ax.set_title("rows out per step")
        ax.tick_params(axis="x", rotation=30)
        paths.append(_save(fig, folder / "rows_per_step.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def card_for_folder(root: str | Path) -> Path:
    """(Re)write the card of an output folder from the run summary saved beside the data."""
    root = Path(root)
    if (root / "summary.json").is_file():
        summary_path, data = root / "summary.json", sorted((root / "data").glob("*.parquet"))
    else:
        found = sorted(root.glob("*.summary.json"))
        if not found:
            raise FileNotFoundError(f"{root}: no summary.json or <name>.summary.json here; is it a prefdata output folder?")
        summary_path = found[0]
        data = [root / (summary_path.name[: -len(".summary.json")] + ".parquet")]
    missing = [str(p) for p in data if not p.is_file()]
    if not data or missing:
        raise FileNotFoundError(f"{root}: the data file(s) of {summary_path.name} are missing: {missing or 'data/*.parquet'}")
    return write_card(root, data, json.loads(summary_path.read_text()))


def check_hub_layout(root: str | Path) -> list[str]:
    """Problems that would stop ``root`` from working as a Hub dataset folder (empty = fine)."""
    root = Path(root)
    readme = root / "README.md"
    if not readme.is_file():
        return [f"{readme} is missing (run 'prefdata card {root}')"]
    text = readme.read_text()
    if not text.startswith("---\n") or text.count("\n---\n") < 1:
        return [f"{readme} has no YAML front matter"]
    meta = yaml.safe_load(text.split("---\n")[1])
    problems = []
    for config in meta.get("configs", []):
        for spec in config.get("data_files", []):
            for rel in spec["path"] if isinstance(spec["path"], list) else [spec["path"]]:
                if not list(root.glob(rel)):
                    problems.append(f"config '{config['config_name']}' points at {rel}, which is not in {root}")
    if not meta.get("configs"):
        problems.append(f"{readme} declares no configs")
    return problems


def push_to_hub(root: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an output folder as a Hub dataset; the token comes from HF_TOKEN only."""
    problems = check_hub_layout(root)
    if problems:
        raise ValueError("not a valid dataset folder: " + "; ".join(problems))
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RuntimeError("set HF_TOKEN in the environment to push to the Hugging Face Hub")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(root), repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"
