"""Dataset cards: a Hub-compatible README.md with YAML metadata, figures and PNG plots.

The card is rendered from ``cards/dataset_card.md`` with the run summary (fingerprints,
counts per step, models, ε, routing and human-agreement figures) — or, for a folder that
holds only parquet data (a pulled or exported file), from the data alone. The YAML header
carries what the Hub indexes (license, language, pretty name, who made the labels, task,
size). The recipe's ``card:`` mapping sets ``title``, ``description``, ``license`` (with
``license_name``/``license_link`` for ``other``), ``language``, ``task_categories``,
``tags`` and ``annotations_creators``. Nothing machine-specific is published: absolute
paths are shown relative to the working directory or by their last part, and anything
that looks like a secret (``prefdata.io.redact``) is removed before the card is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from string import Template

import polars as pl
import yaml

from prefdata.card_plots import write_plots
from prefdata.card_sections import (CREATORS, caveats, human, model_mentions, pair_score, provenance,
                                     quality)
from prefdata.io import redact, write_text
from prefdata.prefmodel.intransitivity import card_lines as intransitivity_lines

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[1] / "cards" / "dataset_card.md"
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
CARD_KEYS = {"title", "description", "license", "license_name", "license_link", "language", "task_categories",
             "tags", "annotations_creators"}
ABS_PATH = re.compile(r"(?<![\w:/.~-])~?/[\w.+@-]+(?:/[\w.+@-]+)+/?")


def write_card(root: str | Path, data_files: list[Path], summary: dict, template: Path | None = None) -> Path:
    """Render README.md and plots/*.png into ``root``; returns the README path."""
    root = Path(root)
    frame = pl.scan_parquet([str(p) for p in data_files])
    columns = frame.collect_schema().names()
    score = pair_score(frame, columns, summary)
    plots = write_plots(root / "plots", frame, columns, summary, score)
    text = render(root, data_files, summary, frame, columns, plots, template or TEMPLATE, score)
    return write_text(scrub_paths(redact(text)), root / "README.md")


def render(root, data_files, summary, frame, columns, plots, template: Path, score: str | None = None) -> str:
    info = summary.get("info") or {}
    recipe = show_paths(info.get("recipe") or {})
    card = recipe.get("card") or {}
    rel = [Path(p).resolve().relative_to(root.resolve()).as_posix() for p in data_files]
    rows = frame.select(pl.len()).collect().item()
    level = "pair" if "chosen" in columns else "list" if "responses" in columns else "response"
    title = card.get("title") or recipe.get("name") or (root.resolve().name if summary else Path(rel[0]).stem)
    values = {
        "metadata": yaml.safe_dump(metadata(card, rel, rows, title, frame, columns), sort_keys=False,
                                   allow_unicode=True).strip(),
        "title": title,
        "description": card.get("description") or "A preference dataset built with prefdata.",
        "built_from": built_from(summary, info),
        "rows": rows, "level": level, "files": ", ".join(f"`{r}`" for r in rel),
        "provenance": provenance(summary),
        "models": ", ".join(model_mentions(summary)) or "not recorded",
        "caveats": "\n".join(f"- {c}" for c in caveats(summary)) or "None recorded.",
        "quality": "\n".join([quality(frame, columns, summary, data_files, score), *intransitivity_lines(summary)]),
        "human": human(frame, columns),
        "license_text": license_text(card, summary),
        "plots": "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) or "(no numeric columns to plot)",
        "recipe": recipe_block(recipe, summary),
        "data_files_py": json.dumps(rel if len(rel) > 1 else rel[0]),
        "format_note": format_note(frame, columns, level),
    }
    return Template(template.read_text()).safe_substitute(values)


# -- YAML header ------------------------------------------------------------------------


def metadata(card: dict, rel: list[str], rows: int, title: str, frame: pl.LazyFrame, columns: list[str]) -> dict:
    """The Hub's card fields, in the order the Hub's own cards use."""
    unknown = sorted(set(card) - CARD_KEYS)
    if unknown:
        log.warning("card: unknown key(s) %s in the recipe's card: mapping are ignored; known: %s",
                    unknown, sorted(CARD_KEYS))
    meta = {"pretty_name": title, **license_fields(card)}
    meta["language"] = _as_list(card.get("language", ["en"]))
    meta["annotations_creators"] = _as_list(card.get("annotations_creators") or annotation_creators(frame, columns))
    meta["task_categories"] = _as_list(card.get("task_categories", ["text-generation"]))
    meta["tags"] = _as_list(card.get("tags", ["dpo", "preference", "prefdata"]))
    meta["size_categories"] = [size_category(rows)]
    meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": rel}]}]
    return meta


def license_fields(card: dict) -> dict:
    """``license`` as given; ``unknown`` when the recipe states none. A license the Hub does
    not list is ``other`` with a name and a link (``LICENSE`` in the repo unless given)."""
    license_id = card.get("license") or "unknown"
    if license_id != "other":
        return {"license": license_id}
    name, link = card.get("license_name"), card.get("license_link")
    if not name or not link:
        log.warning("card: license 'other' needs card.license_name and card.license_link (a URL or a "
                    "LICENSE file in the dataset repo); using %s", {"name": name or "other", "link": link or "LICENSE"})
    return {"license": "other", "license_name": name or "other", "license_link": link or "LICENSE"}


def license_text(card: dict, summary: dict) -> str:
    license_id = card.get("license")
    models = model_mentions(summary, detail=False)
    tail = (" The responses were generated by " + ", ".join(models) + "; their licenses and terms of use "
            "may also apply.") if models else ""
    if not license_id:
        return ("The dataset author has not stated a license (`license: unknown`). Set one in the recipe's "
                "`card:` mapping, e.g. `card: {license: apache-2.0}`." + tail)
    if license_id == "other":
        return f"{card.get('license_name') or 'A custom license'}: see {card.get('license_link') or 'LICENSE'}." + tail
    return f"`{license_id}`." + tail


def annotation_creators(frame: pl.LazyFrame, columns: list[str]) -> list[str]:
    """From the ``label_source`` values present: ai → machine-generated, human →
    expert-generated, original (an imported dataset's own label) → found."""
    if "label_source" in columns:
        found = frame.select(pl.col("label_source").drop_nulls().unique()).collect().to_series().to_list()
        creators = sorted({CREATORS.get(v, "other") for v in found})
        return creators or ["no-annotation"]
    if any(c.startswith("score_") for c in columns):
        return ["machine-generated"]
    return ["no-annotation"]


def size_category(rows: int) -> str:
    return next((name for limit, name in SIZES if rows < limit), "n>1B")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# -- provenance line, recipe, format ----------------------------------------------------------


def built_from(summary: dict, info: dict) -> str:
    if not summary:
        return ("; this card describes the data alone: no run summary was found beside it, so the steps, "
                "models and settings that made it are not recorded here")
    if info.get("recipe_path"):
        return f" from the recipe `{show_paths(info['recipe_path'])}`"
    return " with the Python API"


def recipe_block(recipe: dict, summary: dict) -> str:
    if recipe:
        return "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).strip() + "\n```"
    if summary:
        return "Built with the Python API (no recipe file); the step settings are in `summary.json`."
    return "Not recorded."


def format_note(frame: pl.LazyFrame, columns: list[str], level: str) -> str:
    if level == "list":
        return "Each row is a ranked list of responses to one prompt (`responses`, best first)."
    if level == "response":
        return "Each row is one response to a prompt, with its scores; pairs are not built yet."
    chosen = frame.collect_schema()["chosen"]
    if chosen == pl.String:
        return ("The pair columns follow TRL's standard preference format (`prompt`, `chosen`, `rejected` "
                "as strings).")
    return ("The pair columns follow TRL's conversational preference format (`prompt`, `chosen`,\n"
            "`rejected` as message lists), so `trl.DPOTrainer` and `prefdata train` read them as they are.")


# -- no machine paths ---------------------------------------------------------------------------


def show_paths(value):
    """Absolute paths in a recipe or value, as a reader may see them: relative to the working
    directory when under it, else their last part."""
    if isinstance(value, dict):
        return {k: show_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [show_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~/")):
        path = Path(value).expanduser()
        try:
            return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return path.name or value
    return value


def scrub_paths(text: str) -> str:
    """Any absolute path still in the text (a count, a note, a URL-less message) → its last part."""
    return ABS_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name, text)


# -- folders -----------------------------------------------------------------------------------


def card_for_folder(path: str | Path) -> Path:
    """(Re)write the card of an output folder or of one parquet file in its folder: from the
    run summary saved beside the data, or from the data alone when there is none."""
    root, data, summary_path = _locate(Path(path))
    missing = [str(p) for p in data if not p.is_file()]
    if not data or missing:
        raise FileNotFoundError(f"{root}: the data file(s) of {summary_path} are missing: "
                                f"{missing or 'data/*.parquet'}; re-run the recipe to write them")
    summary = json.loads(summary_path.read_text()) if summary_path else {}
    return write_card(root, data, summary)


def _locate(path: Path) -> tuple[Path, list[Path], Path | None]:
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: not a parquet file; give an output folder or a .parquet file")
        summary = path.with_name(f"{path.stem}.summary.json")
        return path.parent, [path], summary if summary.is_file() else None
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; give an output folder or a .parquet file")
    if (path / "summary.json").is_file():
        return path, sorted((path / "data").glob("*.parquet")), path / "summary.json"
    found = sorted(path.glob("*.summary.json"))
    if len(found) > 1:
        raise ValueError(f"{path} holds the summaries of several runs ({', '.join(p.name for p in found)}); "
                         f"give the parquet file to describe, e.g. 'prefdata card "
                         f"{path / found[0].name[: -len('.summary.json')]}.parquet'")
    if found:
        return path, [path / (found[0].name[: -len(".summary.json")] + ".parquet")], found[0]
    return path, data_alone(path), None


def data_alone(root: Path) -> list[Path]:
    """The parquet data of a folder without a run summary (quarantine files are not data)."""
    files = sorted((root / "data").glob("*.parquet")) or sorted(root.glob("*.parquet"))
    files = [p for p in files if not p.name.endswith(".quarantine.parquet") and p.name != "quarantine.parquet"]
    if not files:
        raise FileNotFoundError(f"{root}: no summary.json, <name>.summary.json or parquet data here; give a "
                                "prefdata output folder, or a folder or file with the parquet data to describe")
    schemas = {p: pl.read_parquet_schema(p) for p in files}
    if len({tuple(s.items()) for s in schemas.values()}) > 1:
        raise ValueError(f"{root}: the parquet files {[p.name for p in files]} have different columns; give the "
                         f"one to describe, e.g. 'prefdata card {files[-1]}'")
    return files


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
    summaries = ["summary.json", "*.summary.json"]
    api.upload_folder(folder_path=str(root), repo_id=repo_id, repo_type="dataset", ignore_patterns=summaries)
    for path in [p for pattern in summaries for p in Path(root).glob(pattern)]:
        api.upload_file(path_or_fileobj=public_summary(path).encode(), path_in_repo=path.name, repo_id=repo_id,
                        repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"


def public_summary(path: str | Path) -> str:
    """A run summary as it may be published: the machine's absolute paths (workdir, output,
    input files, local models) shown as in the card, secrets already redacted."""
    summary = show_paths(json.loads(Path(path).read_text()))
    return scrub_paths(redact(json.dumps(summary, indent=2)))
