"""``prefdata gc WORKDIR --recipe R``: remove cache folders no recipe can reach any more.

A workdir collects one ``<step>-<fingerprint>`` folder per step and configuration ever run
(and ``_prompts/<step>-<own fingerprint>`` prompt stores). The folders the given recipes
(with the same ``--set`` and ``--limit``) would use are kept; every other fingerprint
folder is removed, or only listed with its size under ``--dry-run``. Files and folders
that are not fingerprint folders (``summary.json``, anything of the user's) are never
touched.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from prefdata.prompt_store import STORE_DIR

FINGERPRINT_DIR = re.compile(r"^.+-[0-9a-f]{16}$")


def reachable(workdir: Path, recipes: list[str], overrides: list[str] = (), limit: int | None = None) -> set[Path]:
    """The fingerprint folders and prompt stores the recipes would use in ``workdir``."""
    from prefdata.recipe import Recipe

    keep: set[Path] = set()
    for path in recipes:
        recipe = Recipe.load(path, list(overrides) + [f"workdir={workdir}"], limit=limit)
        pipeline = recipe.build(progress=False)
        keep.update(pipeline.step_dirs())
        for i in range(len(pipeline.steps)):
            store = pipeline.prompt_store(i)
            if store is not None:
                keep.add(store.dir)
    return {p.resolve() for p in keep}


def candidates(workdir: Path) -> list[Path]:
    """Every fingerprint folder and prompt store in the workdir."""
    found = [p for p in workdir.iterdir() if p.is_dir() and FINGERPRINT_DIR.match(p.name)]
    store_root = workdir / STORE_DIR
    if store_root.is_dir():
        found += [p for p in store_root.iterdir() if p.is_dir() and FINGERPRINT_DIR.match(p.name)]
    return sorted(found)


def unreachable(workdir: Path, recipes: list[str], overrides: list[str] = (), limit: int | None = None) -> list[Path]:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not recipes:
        raise ValueError("gc needs at least one --recipe: the folders those recipes use are kept")
    keep = reachable(workdir, recipes, overrides, limit)
    return [p for p in candidates(workdir) if p.resolve() not in keep]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def collect(workdir: Path, recipes: list[str], overrides: list[str] = (), limit: int | None = None,
            dry_run: bool = False) -> tuple[list[tuple[Path, int]], str]:
    """Remove (or list) the unreachable folders; returns them with sizes, and a report."""
    workdir = Path(workdir)
    gone = [(p, size(p)) for p in unreachable(workdir, recipes, overrides, limit)]
    total = sum(s for _, s in gone)
    verb = "would remove" if dry_run else "removed"
    lines = []
    for path, n in gone:
        if not dry_run:
            shutil.rmtree(path)
        lines.append(f"{verb} {path.relative_to(workdir)}  ({human(n)})")
    kept = len(candidates(workdir)) if not dry_run else len(candidates(workdir)) - len(gone)
    lines.append(f"{verb} {len(gone)} folder(s), {human(total)}; {kept} folder(s) in use by the recipe(s) kept")
    return gone, "\n".join(lines)
