"""Run a map step over shards with Ray Data: an actor pool whose actors load the model once.

Each actor unpickles the step, calls ``setup()`` once and then ``compute_shard`` for every
shard it is handed (one shard per Ray Data block and per batch), so the shard files are
the ones the local executor writes and the fingerprints — computed by the pipeline, not
here — are the same: a run can start on one executor and resume on the other.

With no ``address`` a local Ray cluster is started with Ray's token auth off
(``RAY_AUTH_MODE=disabled`` unless the variable is set; Ray still listens on every
interface, so set ``RAY_AUTH_MODE=token`` on a machine others can reach). With an
``address`` Ray connects to that cluster, whose nodes must all see the workdir at the same
path: actors read and write shard files by path. A Ray already initialised in this
process is used as it is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

from prefdata.shards import compute_shard, shard_path

log = logging.getLogger(__name__)

MISSING = "the Ray executor needs Ray Data: pip install 'prefdata[ray]'"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{MISSING} ({exc})") from None
    return ray


class RayExecutor:
    """Map steps on a Ray actor pool; ``num_actors`` defaults to the cluster's whole CPUs."""

    name = "ray"

    def __init__(self, num_actors: int | None = None, num_cpus_per_actor: float = 0.5,
                 num_gpus_per_actor: float = 0.0, address: str | None = None, num_cpus: int | None = None):
        try:
            found = importlib.util.find_spec("ray") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ImportError(MISSING)
        whole = isinstance(num_actors, int) and not isinstance(num_actors, bool)
        if num_actors is not None and (not whole or num_actors < 1):
            raise ValueError(f"ray executor: num_actors must be a whole number >= 1, got {num_actors!r}")
        for key, value in (("num_cpus_per_actor", num_cpus_per_actor), ("num_gpus_per_actor", num_gpus_per_actor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"ray executor: {key} must be a number >= 0, got {value!r}")
        if num_cpus is not None and address is not None:
            raise ValueError("ray executor: num_cpus sizes a local cluster; leave it out when giving an address")
        self.num_actors = num_actors
        self.num_cpus_per_actor = float(num_cpus_per_actor)
        self.num_gpus_per_actor = float(num_gpus_per_actor)
        self.address = address
        self.num_cpus = num_cpus

    def __repr__(self) -> str:
        return (f"RayExecutor(num_actors={self.num_actors}, num_cpus_per_actor={self.num_cpus_per_actor}, "
                f"address={self.address!r})")

    def connect(self):
        """Initialise Ray unless this process already has; returns the ``ray`` module."""
        ray = _import_ray()
        if ray.is_initialized():
            return ray
        quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)  # Ray's own chatter only with -v
        level = logging.WARNING if quiet else logging.INFO
        if quiet:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        if self.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, logging_level=level)
        else:
            ray.init(address=self.address, logging_level=level)
        return ray

    def pool_size(self, ray, n_jobs: int) -> int:
        """How many actors (model copies) to start; refuses a pool the cluster cannot hold."""
        cpus = ray.cluster_resources().get("CPU", 0)
        size = self.num_actors or max(1, int(cpus))
        size = min(size, n_jobs)
        if size * self.num_cpus_per_actor > cpus:
            raise ValueError(
                f"ray executor: {size} actors x {self.num_cpus_per_actor} CPUs need more than the cluster's "
                f"{cpus:g} CPUs and would wait forever; lower num_actors or num_cpus_per_actor"
            )
        return size

    def map_shards(self, step, jobs: list[tuple[int, Path]], step_dir: Path, progress: bool = True,
                   store=None) -> None:
        """Compute each (index, input shard) job on the actor pool; starts nothing if there are none."""
        if not jobs:
            return
        _import_ray()
        from ray import cloudpickle

        try:
            blob = cloudpickle.dumps(step)
        except Exception as exc:
            raise ValueError(f"step '{step.name}' cannot be sent to Ray actors (it does not pickle: {exc}); "
                             "keep loaded models and open files out of the step until setup()") from None
        ray = self.connect()
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = progress  # Ray Data's own bars, per operator
        size = self.pool_size(ray, len(jobs))
        items = [{"index": int(i), "in_path": str(Path(p).resolve())} for i, p in jobs]
        step_dir = Path(step_dir).resolve()
        log.info("ray: step %s, %d shards on %d actors (%s CPUs each)", step.name, len(jobs), size,
                 self.num_cpus_per_actor)
        with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardWorker,
                fn_constructor_kwargs={"step_blob": blob, "step_dir": str(step_dir), "sys_path": list(sys.path),
                                       "store_blob": cloudpickle.dumps(store)},
                compute=ActorPoolStrategy(size=size),
                batch_size=1,
                num_cpus=self.num_cpus_per_actor,
                num_gpus=self.num_gpus_per_actor or None,
                max_restarts=0,  # a dead actor fails the step (a resume redoes its shards), no endless restarts
            )
        failure = None
        try:
            for row in dataset.iter_rows():
                if row["error"]:
                    failure = row["error"]
                    break
        except ray.exceptions.RayError as exc:  # an actor that could not start (setup failed …)
            raise RuntimeError(f"ray executor: step '{step.name}' failed: {exc}") from None
        if failure:
            raise RuntimeError(failure)
        missing = [i for i, _ in jobs if not shard_path(step_dir, i).exists()]
        if missing:
            raise RuntimeError(f"ray executor: step '{step.name}' finished without writing shard(s) {missing} "
                               f"in {step_dir}")


class ShardWorker:
    """One Ray actor: unpickles the step, loads its model once, computes shards."""

    def __init__(self, step_blob: bytes, step_dir: str, sys_path: list[str], store_blob: bytes | None = None):
        # Steps a driver imports from its own paths (a recipe's ``package.module:Class``, a test
        # module) unpickle here too: on one machine the driver's paths exist for the actors.
        sys.path.extend(p for p in sys_path if p not in sys.path)
        from ray import cloudpickle

        self.step = cloudpickle.loads(step_blob)
        self.step_dir = Path(step_dir)
        self.store = cloudpickle.loads(store_blob) if store_blob else None
        self.step.setup()

    def __call__(self, batch: dict) -> dict:
        """Compute the batch's shards; a failure comes back as a row the driver raises."""
        import traceback

        indices, errors = [], []
        for index, in_path in zip(batch["index"], batch["in_path"]):
            error = ""
            try:
                compute_shard(self.step, Path(in_path), self.step_dir, int(index), store=self.store)
            except Exception as exc:
                error = (f"step '{self.step.name}' failed on shard {int(index)} ({in_path}) under Ray: "
                         f"{type(exc).__name__}: {exc}\n\nin the Ray actor (pid {os.getpid()}):\n"
                         f"{traceback.format_exc()}")
            indices.append(int(index))
            errors.append(error)
        return {"index": indices, "error": errors}
