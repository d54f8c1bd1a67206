"""The default executor: one shard after another, in this process."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from prefdata.shards import compute_shard


class LocalExecutor:
    name = "local"

    def map_shards(self, step, jobs: list[tuple[int, Path]], step_dir: Path, progress: bool = True) -> None:
        """Compute each (index, input shard) job; loads the step's model only if there are jobs."""
        if not jobs:
            return
        step.setup()
        try:
            for index, in_path in tqdm(jobs, desc=step.name, unit="shard", disable=not progress):
                compute_shard(step, in_path, step_dir, index)
        finally:
            step.teardown()
