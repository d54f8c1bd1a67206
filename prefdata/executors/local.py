"""The default executor: one shard after another, a model-holding step in its own process.

A step that holds a model computes its shards in a worker process that exits when the
step ends (``prefdata.executors.worker``), so a recipe with a sampler, two CDR models and
a reward model never has more than one step's models in memory. Steps without models,
and steps whose shards are all cached, start no process. ``in_process=True`` (recipe
``executor: {name: local, in_process: true}``, ``prefdata run --in-process`` or
``PREFDATA_IN_PROCESS=1``) keeps everything in this process; the model cache is then
emptied after each step.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from prefdata.executors.worker import in_process_default, run_in_worker
from prefdata.shards import compute_shard


def holds_model(step) -> bool:
    """Whether the step loads a model in ``setup`` (``Step.holds_model``)."""
    value = getattr(step, "holds_model", None)
    if value is not None:
        return bool(value)
    models = getattr(step, "models", None)  # older Step without the property
    if callable(models):
        return bool(models())
    from prefdata.step import Step

    return type(step).setup is not Step.setup and type(step).__module__.startswith("prefdata.steps.")


def release_models() -> None:
    """Empty the process-wide model cache (only if a model module was ever imported)."""
    models = sys.modules.get("prefdata.models")
    if models is not None:
        models.clear_cache()


class LocalExecutor:
    name = "local"

    def __init__(self, in_process: bool | None = None):
        if in_process is not None and not isinstance(in_process, bool):
            raise ValueError(f"local executor: in_process must be true or false, got {in_process!r}")
        self.in_process = in_process_default() if in_process is None else in_process

    def __repr__(self) -> str:
        return f"LocalExecutor(in_process={self.in_process})"

    def isolates(self, step) -> bool:
        """Whether ``step`` runs in a worker process under this executor."""
        return not self.in_process and holds_model(step)

    def map_shards(self, step, jobs: list[tuple[int, Path]], step_dir: Path, progress: bool = True,
                   store=None) -> None:
        """Compute each (index, input shard) job; loads the step's model only if there are jobs."""
        if not jobs:
            return
        if self.isolates(step):
            run_in_worker(step.name, map_jobs, (step, jobs, step_dir, progress, store), progress=progress)
        else:
            try:
                map_jobs(step, jobs, step_dir, progress, store)
            finally:
                release_models()

    def run_global(self, step, fn, args: tuple, progress: bool = True):
        """Run a global step's ``fn(*args)``: in a worker when the step holds a model."""
        if self.isolates(step):
            return run_in_worker(step.name, fn, args, progress=progress)
        try:
            return fn(*args)
        finally:
            release_models()


def map_jobs(step, jobs: list[tuple[int, Path]], step_dir: Path, progress: bool = True, store=None) -> None:
    """Set the step up once, compute every job, tear it down (in whichever process runs this)."""
    step.setup()
    try:
        for index, in_path in tqdm(jobs, desc=step.name, unit="shard", disable=not progress):
            compute_shard(step, in_path, step_dir, index, store=store)
    finally:
        step.teardown()
