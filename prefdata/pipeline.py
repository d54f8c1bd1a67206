"""Run a plain list of steps over shards, with a cache that makes every run resumable.

Each step's output lives under ``<workdir>/<step>-<fingerprint>/``; the fingerprint
chains over the steps before it (and the source's over ``shard_size``, the layout), so a
changed config recomputes that step and the ones after it, nothing before. Finished
shards are skipped; a step's model is loaded only when some shard of it still has to be
computed, and (local executor) in a worker process that exits with the step.

Map steps whose output for a prompt depends on that prompt alone also keep each prompt's
result in a prompt store (``prefdata.prompt_store``): a run with a larger ``--limit`` or
another ``shard_size`` takes the prompts it already has from there and computes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prefdata import shards
from prefdata.executors.local import LocalExecutor
from prefdata.io import step_metadata, write_json, write_parquet, write_parquet_files
from prefdata.prompt_store import PromptStore, prompt_keys, prompt_local
from prefdata.step import GlobalStep, MapStep, Source, Step

log = logging.getLogger(__name__)


class PipelineError(ValueError):
    """A pipeline that cannot run as written (wrong order, missing columns …)."""


@dataclass
class StepStats:
    step: str
    fingerprint: str
    kind: str
    rows_in: int = 0
    rows_out: int = 0
    shards: int = 0
    shards_cached: int = 0
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)
    config: dict | None = None
    metadata: dict | None = None
    label: str = ""  # the step's name, numbered when a name repeats: score_cdr[1], score_cdr[2]


class Pipeline:
    """A list of steps, a workdir for the cache, and optionally an output file.

    ``force_from``: recompute from that step index on (its cached shards and stored
    prompts are not used).
    """

    def __init__(self, steps: list[Step], workdir: str | Path = "work", output: str | Path | None = None,
                 shard_size: int = 64, executor=None, progress: bool = True, info: dict | None = None,
                 card: bool = True, force_from: int | None = None):
        if not steps or not isinstance(steps[0], Source):
            raise PipelineError("a pipeline starts with a source step, e.g. load_prompts")
        for i, step in enumerate(steps[1:], start=1):
            if not isinstance(step, (MapStep, GlobalStep)):
                raise PipelineError(f"step {i} '{step.name}' is a {step.kind} step; only the first step may read data")
        if shard_size < 1:
            raise PipelineError(f"shard_size must be >= 1, got {shard_size}")
        if force_from is not None and not 0 <= force_from < len(steps):
            raise PipelineError(f"force_from must be a step index from 0 to {len(steps) - 1}, got {force_from}")
        self.steps = steps
        self.workdir = Path(workdir)
        self.output = Path(output) if output else None
        self.shard_size = shard_size
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.info = info or {}
        self.card = card
        self.force_from = force_from
        self.stats: list[StepStats] = []
        self._parts: list[dict] | None = None

    # -- planning ----------------------------------------------------------------------
    def check_columns(self) -> list[str]:
        """Fail before any work if a step reads a column no earlier step writes."""
        columns: list[str] = []
        for i, step in enumerate(self.steps):
            missing = [c for c in step.input_columns() if c not in columns]
            if missing:
                raise PipelineError(
                    f"step {i} '{step.name}' needs column(s) {missing}, which no earlier step writes "
                    f"(available: {columns}). Add a step that writes them before '{step.name}'."
                )
            columns = step.output_columns(columns)
        return columns

    def fingerprint_parts(self) -> list[dict]:
        """What each step's fingerprint hashes (stored in its marker; ``--dry-run`` diffs it)."""
        if self._parts is None:
            parts, upstream = [], ""
            for i, step in enumerate(self.steps):
                p = step_parts(step, upstream)
                if i == 0:
                    p["layout"] = {"shard_size": self.shard_size}
                parts.append(p)
                upstream = digest(p)
            self._parts = parts
        return self._parts

    def fingerprints(self) -> list[str]:
        return [digest(p) for p in self.fingerprint_parts()]

    def labels(self) -> list[str]:
        """Step names, numbered where a name repeats (``score_cdr[1]``, ``score_cdr[2]``)."""
        names = [s.name for s in self.steps]
        seen: dict[str, int] = {}
        out = []
        for name in names:
            seen[name] = seen.get(name, 0) + 1
            out.append(f"{name}[{seen[name]}]" if names.count(name) > 1 else name)
        return out

    def step_dirs(self, fingerprints: list[str] | None = None) -> list[Path]:
        fps = fingerprints or self.fingerprints()
        return [self.workdir / f"{s.name}-{fp}" for s, fp in zip(self.steps, fps)]

    def prompt_store(self, index: int) -> PromptStore | None:
        """The prompt store of map step ``index`` (None for steps that are not prompt-local)."""
        step = self.steps[index]
        if not isinstance(step, MapStep) or not prompt_local(step):
            return None
        store = PromptStore.for_step(self.workdir, step)
        if self.force_from is not None and index >= self.force_from:
            store.reuse = False
        return store

    def plan(self) -> list[dict]:
        """What a run would do, without doing it (``prefdata run --dry-run``)."""
        from prefdata.plan import plan_pipeline

        return plan_pipeline(self)

    # -- running -----------------------------------------------------------------------
    def run(self, collect: bool = True) -> pa.Table | None:
        """Run (or resume) every step; write the output file; return the final table.

        ``collect=False`` returns None and never loads the final table: the output file is
        written shard by shard, so a run of millions of rows (an import) stays in bounded
        memory. The command line runs this way."""
        self.check_columns()
        if not self.progress:
            from prefdata.executors.worker import silence_progress_bars

            silence_progress_bars()
        self.stats = []
        parts = self.fingerprint_parts()
        fps = self.fingerprints()
        dirs = self.step_dirs(fps)
        labels = self.labels()
        if self.force_from is not None:
            for step_dir in dirs[self.force_from:]:
                if step_dir.is_dir():
                    log.info("--force: removing %s", step_dir)
                    shutil.rmtree(step_dir)
        n_shards = 0
        for i, (step, step_dir, fp) in enumerate(zip(self.steps, dirs, fps)):
            start = time.perf_counter()
            stats = StepStats(step=step.name, fingerprint=fp, kind=step.kind, config=_config(step), label=labels[i])
            marker = {"step": step.name, "fingerprint": fp, "config": _config(step), "parts": parts[i]}
            if i == 0:
                n_shards = self._run_source(step, step_dir, stats, marker)
            elif isinstance(step, MapStep):
                self._run_map(i, dirs[i - 1], step_dir, n_shards, stats, marker)
            else:
                n_shards = self._run_global(step, dirs[i - 1], step_dir, n_shards, stats, marker)
            stats.seconds = round(time.perf_counter() - start, 3)
            self.stats.append(stats)
        files = shards.shard_files(dirs[-1], n_shards)
        self._write_outputs(files, dirs)
        return shards.read_shards(files) if collect else None

    def _run_source(self, step: Source, step_dir: Path, stats: StepStats, marker: dict) -> int:
        found = shards.read_marker(step_dir)
        if found is None:
            step.setup()
            try:
                n = write_stream(step, step_dir, self.shard_size)
            finally:
                step.teardown()
            found = {**marker, "n_shards": n, "metadata": getattr(step, "metadata", None)}
            shards.write_marker(step_dir, found)
        else:
            stats.shards_cached = found["n_shards"]
        stats.metadata = found.get("metadata")
        self._collect(step_dir, found["n_shards"], stats)
        return found["n_shards"]

    def _run_map(self, i: int, in_dir: Path, step_dir: Path, n_shards: int, stats: StepStats,
                 marker: dict) -> None:
        step = self.steps[i]
        inputs = shards.shard_files(in_dir, n_shards)
        missing = [(k, p) for k, p in enumerate(inputs) if not shards.shard_path(step_dir, k).exists()]
        stats.shards_cached = n_shards - len(missing)
        stats.rows_in = shards.num_rows(inputs)
        store = self.prompt_store(i)
        jobs = missing
        if store is not None and missing:
            jobs = self._reuse_stored(step, store, missing, step_dir)
        self.executor.map_shards(step, jobs, step_dir, progress=self.progress, store=store)
        if store is not None and missing:
            store.save_index()
        shards.write_marker(step_dir, {**marker, "n_shards": n_shards})
        self._collect(step_dir, n_shards, stats)

    @staticmethod
    def _reuse_stored(step, store: PromptStore, missing: list, step_dir: Path) -> list:
        """Write the shards whose prompts are all in the store (no model); return the rest."""
        jobs = []
        for index, in_path in missing:
            table = pq.read_table(in_path)
            if table.num_rows and "prompt_id" in table.column_names:
                keys = prompt_keys(table)["key"].to_list()
                if len(store.known(keys)) == len(set(keys)):
                    shards.compute_shard(step, in_path, step_dir, index, store=store)
                    continue
            jobs.append((index, in_path))
        return jobs

    def _run_global(self, step: GlobalStep, in_dir: Path, step_dir: Path, n_shards: int, stats: StepStats,
                    marker: dict) -> int:
        inputs = shards.shard_files(in_dir, n_shards)
        stats.rows_in = shards.num_rows(inputs)
        found = shards.read_marker(step_dir)
        if found is None:
            args = (step, inputs, step_dir, self.shard_size)
            run_global = getattr(self.executor, "run_global", None)
            result = (run_global(step, compute_global, args, progress=self.progress) if run_global
                      else compute_global(*args))
            found = {**marker, **result}
            shards.write_marker(step_dir, found)
        else:
            stats.shards_cached = found["n_shards"]
        stats.metadata = found.get("metadata")
        self._collect(step_dir, found["n_shards"], stats)
        return found["n_shards"]

    def _write_resharded(self, out: shards.Output, step_dir: Path) -> int:
        return write_resharded(out, step_dir, self.shard_size)

    def _collect(self, step_dir: Path, n_shards: int, stats: StepStats) -> None:
        files = shards.shard_files(step_dir, n_shards)
        stats.shards = n_shards
        stats.rows_out = shards.num_rows(files)
        for f in files:
            for key, value in shards.shard_counts(f).items():
                if isinstance(value, (int, float)) and key != "seconds":
                    stats.counts[key] = stats.counts.get(key, 0) + value
        if stats.kind == "source":
            stats.rows_in = stats.counts.get("rows_read", stats.rows_out)

    def output_paths(self) -> dict[str, Path] | None:
        """Where the run's files go: a ``.parquet`` output is one file with siblings; any
        other output is a folder in the Hub dataset layout (``data/`` + card at the root)."""
        if self.output is None:
            return None
        if self.output.suffix == ".parquet":
            stem = self.output.stem
            return {"data": self.output, "root": self.output.parent,
                    "quarantine": self.output.with_name(f"{stem}.quarantine.parquet"),
                    "summary": self.output.with_name(f"{stem}.summary.json")}
        return {"data": self.output / "data" / "train-00000-of-00001.parquet", "root": self.output,
                "quarantine": self.output / "quarantine.parquet", "summary": self.output / "summary.json"}

    def summary(self) -> dict:
        return {"steps": [asdict(s) for s in self.stats], "info": self.info,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _write_outputs(self, files: list[Path], dirs: list[Path]) -> None:
        summary = self.summary()
        write_json(summary, self.workdir / "summary.json", redact_secrets=True)
        paths = self.output_paths()
        if paths is None:
            return
        write_parquet_files(files, paths["data"], metadata=step_metadata(summary))
        quarantine = self.quarantine(dirs)
        if quarantine is not None:
            write_parquet(quarantine, paths["quarantine"])
        else:
            paths["quarantine"].unlink(missing_ok=True)
        write_json(summary, paths["summary"], redact_secrets=True)
        if self.card:
            from prefdata.cards import write_card

            write_card(paths["root"], data_files=[paths["data"]], summary=summary)

    def quarantine(self, dirs: list[Path] | None = None) -> pa.Table | None:
        """All quarantined rows of the run, with the step that rejected them."""
        parts = []
        for step, step_dir in zip(self.steps, dirs or self.step_dirs()):
            for path in sorted(step_dir.glob("quarantine-*.parquet")):
                t = shards.read_shards([path])
                parts.append(t.append_column("step", pa.array([step.name] * t.num_rows, pa.string())))
        return pa.concat_tables(parts, promote_options="permissive") if parts else None

    def summary_text(self) -> str:
        return format_summary(self.stats)


def compute_global(step: GlobalStep, inputs: list[Path], step_dir: Path, shard_size: int) -> dict:
    """Run a global step over its input shards and write its output (a worker may call this)."""
    bind = getattr(step, "bind_output_dir", None)
    if callable(bind):  # a step whose product is a folder besides its table (train: the model)
        bind(step_dir)
    step.setup()
    try:
        out = shards.as_output(step.process(pl.scan_parquet(inputs)))
    finally:
        step.teardown()
    n = write_resharded(out, step_dir, shard_size)
    return {"n_shards": n, "metadata": getattr(step, "metadata", None)}


def write_resharded(out: shards.Output, step_dir: Path, shard_size: int) -> int:
    """Split a whole-table output into shards of whole prompts; quarantine and counts go
    with shard 0."""
    writer = shards.ShardWriter(step_dir, shard_size)
    writer.add(out)
    return writer.close()


def write_stream(source: Source, step_dir: Path, shard_size: int) -> int:
    """Write a source's batches as shards while it reads (``ShardWriter``), so its input is
    never held whole; the caller writes the marker afterwards. A run killed here leaves no
    marker, and the next run reads the source again from the start."""
    writer = shards.ShardWriter(step_dir, shard_size, adjacent=getattr(source, "adjacent_prompts", False),
                                final_schema=getattr(source, "output_schema", None))
    for piece in tqdm(source.read_batches(), desc=f"{source.name} (batches)", unit="batch", leave=False,
                      disable=None):
        writer.add(piece)
    return writer.close()


def step_parts(step: Step, upstream: str) -> dict:
    """``Step.fingerprint_parts`` (JSON-able), with a fallback for steps without it."""
    parts_of = getattr(step, "fingerprint_parts", None)
    if callable(parts_of):
        parts = dict(parts_of(upstream))
    else:
        parts = {"name": step.name, "version": step.version, "config": _config(step),
                 "extra": step.fingerprint_extra(), "models": [], "upstream": upstream}
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def digest(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _config(step: Step):
    from prefdata.step import canonical

    return canonical(step.config)


def step_notes(s: StepStats) -> str:
    """Counts, then the step's metadata (ε, thresholds …), as ``key=value``."""
    items = [(k, v) for k, v in sorted(s.counts.items()) if not (k == "rows_read" and s.kind == "source")]
    limit = (s.config or {}).get("limit") if isinstance(s.config, dict) else None
    if s.kind == "source" and limit is not None:
        items.insert(0, ("limit", limit))
    for k, v in (s.metadata or {}).items():
        if k in s.counts or isinstance(v, (dict, list)) or v is None:
            continue
        items.append((k, v))
    return ", ".join(f"{k}={_short(v)}" for k, v in items)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_summary(stats: list[StepStats]) -> str:
    width = max([16] + [len(s.label or s.step) + 2 for s in stats])
    head = f"{'step':<{width}}{'fingerprint':<18}{'rows in':>9}{'rows out':>10}{'cached':>10}{'time':>9}  notes"
    lines = [head, "-" * len(head)]
    for s in stats:
        lines.append(
            f"{s.label or s.step:<{width}}{s.fingerprint:<18}{s.rows_in:>9}{s.rows_out:>10}"
            f"{f'{s.shards_cached}/{s.shards}':>10}{s.seconds:>8.1f}s  {step_notes(s)}"
        )
    return "\n".join(lines)
