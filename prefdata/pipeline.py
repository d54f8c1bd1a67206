"""Run a plain list of steps over shards, with a cache that makes every run resumable.

Each step's output lives under ``<workdir>/<step>-<fingerprint>/``; the fingerprint
chains over the steps before it, so a changed config recomputes that step and the ones
after it, nothing before. Finished shards are skipped; a step's model is loaded only when
some shard of it still has to be computed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from prefdata import shards
from prefdata.executors.local import LocalExecutor
from prefdata.io import write_json, write_parquet
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


class Pipeline:
    """A list of steps, a workdir for the cache, and optionally an output file."""

    def __init__(self, steps: list[Step], workdir: str | Path = "work", output: str | Path | None = None,
                 shard_size: int = 64, executor=None, progress: bool = True, info: dict | None = None,
                 card: bool = True):
        if not steps or not isinstance(steps[0], Source):
            raise PipelineError("a pipeline starts with a source step, e.g. load_prompts")
        for i, step in enumerate(steps[1:], start=1):
            if not isinstance(step, (MapStep, GlobalStep)):
                raise PipelineError(f"step {i} '{step.name}' is a {step.kind} step; only the first step may read data")
        if shard_size < 1:
            raise PipelineError(f"shard_size must be >= 1, got {shard_size}")
        self.steps = steps
        self.workdir = Path(workdir)
        self.output = Path(output) if output else None
        self.shard_size = shard_size
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.info = info or {}
        self.card = card
        self.stats: list[StepStats] = []

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

    def fingerprints(self) -> list[str]:
        fps, upstream = [], ""
        for step in self.steps:
            upstream = step.fingerprint(upstream)
            fps.append(upstream)
        return fps

    def step_dirs(self, fingerprints: list[str] | None = None) -> list[Path]:
        fps = fingerprints or self.fingerprints()
        return [self.workdir / f"{s.name}-{fp}" for s, fp in zip(self.steps, fps)]

    # -- running -----------------------------------------------------------------------
    def run(self) -> pa.Table | None:
        """Run (or resume) every step; write the output file; return the final table."""
        self.check_columns()
        self.stats = []
        fps = self.fingerprints()
        dirs = self.step_dirs(fps)
        n_shards = 0
        for i, (step, step_dir, fp) in enumerate(zip(self.steps, dirs, fps)):
            start = time.perf_counter()
            stats = StepStats(step=step.name, fingerprint=fp, kind=step.kind, config=_config(step))
            if i == 0:
                n_shards = self._run_source(step, step_dir, stats)
            elif isinstance(step, MapStep):
                self._run_map(step, dirs[i - 1], step_dir, n_shards, stats)
            else:
                n_shards = self._run_global(step, dirs[i - 1], step_dir, n_shards, stats)
            stats.seconds = round(time.perf_counter() - start, 3)
            self.stats.append(stats)
        result = shards.read_shards(shards.shard_files(dirs[-1], n_shards))
        self._write_outputs(result, dirs)
        return result

    def _run_source(self, step: Source, step_dir: Path, stats: StepStats) -> int:
        marker = shards.read_marker(step_dir)
        if marker is None:
            step.setup()
            try:
                out = shards.as_output(step.read())
            finally:
                step.teardown()
            parts = shards.split_by_prompt(out.table, self.shard_size)
            for index, part in enumerate(parts):
                q = out.quarantine if index == 0 else None
                c = out.counts if index == 0 else {}
                shards.write_shard(step_dir, index, shards.Output(part, q, c))
            marker = {"step": step.name, "n_shards": len(parts), "config": _config(step)}
            shards.write_marker(step_dir, marker)
        else:
            stats.shards_cached = marker["n_shards"]
        self._collect(step_dir, marker["n_shards"], stats)
        return marker["n_shards"]

    def _run_map(self, step: MapStep, in_dir: Path, step_dir: Path, n_shards: int, stats: StepStats) -> None:
        inputs = shards.shard_files(in_dir, n_shards)
        jobs = [(i, p) for i, p in enumerate(inputs) if not shards.shard_path(step_dir, i).exists()]
        stats.shards_cached = n_shards - len(jobs)
        stats.rows_in = shards.num_rows(inputs)
        self.executor.map_shards(step, jobs, step_dir, progress=self.progress)
        shards.write_marker(step_dir, {"step": step.name, "n_shards": n_shards, "config": _config(step)})
        self._collect(step_dir, n_shards, stats)

    def _run_global(self, step: GlobalStep, in_dir: Path, step_dir: Path, n_shards: int, stats: StepStats) -> int:
        inputs = shards.shard_files(in_dir, n_shards)
        stats.rows_in = shards.num_rows(inputs)
        marker = shards.read_marker(step_dir)
        if marker is None:
            step.setup()
            try:
                out = shards.as_output(step.process(pl.scan_parquet(inputs)))
            finally:
                step.teardown()
            parts = shards.split_by_prompt(out.table, self.shard_size)
            for index, part in enumerate(parts):
                q = out.quarantine if index == 0 else None
                c = out.counts if index == 0 else {}
                shards.write_shard(step_dir, index, shards.Output(part, q, c))
            marker = {"step": step.name, "n_shards": len(parts), "config": _config(step),
                      "metadata": getattr(step, "metadata", None)}
            shards.write_marker(step_dir, marker)
        else:
            stats.shards_cached = marker["n_shards"]
        stats.metadata = marker.get("metadata")
        self._collect(step_dir, marker["n_shards"], stats)
        return marker["n_shards"]

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

    def _write_outputs(self, result: pa.Table, dirs: list[Path]) -> None:
        summary = self.summary()
        write_json(summary, self.workdir / "summary.json", redact_secrets=True)
        paths = self.output_paths()
        if paths is None:
            return
        write_parquet(result, paths["data"])
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


def _config(step: Step):
    from prefdata.step import canonical

    return canonical(step.config)


def format_summary(stats: list[StepStats]) -> str:
    head = f"{'step':<16}{'fingerprint':<18}{'rows in':>9}{'rows out':>10}{'cached':>10}{'time':>9}  notes"
    lines = [head, "-" * len(head)]
    for s in stats:
        notes = ", ".join(f"{k}={v}" for k, v in sorted(s.counts.items()) if k != "rows_read")
        lines.append(
            f"{s.step:<16}{s.fingerprint:<18}{s.rows_in:>9}{s.rows_out:>10}"
            f"{f'{s.shards_cached}/{s.shards}':>10}{s.seconds:>8.1f}s  {notes}"
        )
    return "\n".join(lines)
