"""Executors run a map step over the shards that still need computing.

``local`` (the default) computes them one after another, a model-holding step in a worker
process that exits with the step (``in_process: true`` keeps it in this process); ``ray`` on a
Ray Data actor pool (``pip install 'prefdata[ray]'``). Both write the same shard files.
"""

from __future__ import annotations

import inspect

from prefdata.executors.local import LocalExecutor

__all__ = ["LocalExecutor", "make_executor", "EXECUTORS"]

EXECUTORS = ("local", "ray")


def make_executor(name: str = "local", **options):
    """An executor by name, with its options (a recipe's ``executor:``, ``--executor``)."""
    if name == "local":
        unknown = sorted(set(options) - {"in_process"})
        if unknown:
            raise ValueError(f"local executor: unknown option(s) {unknown}; known options: ['in_process']")
        return LocalExecutor(**options)
    if name == "ray":
        from prefdata.executors.ray import RayExecutor

        known = [p for p in inspect.signature(RayExecutor).parameters]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"ray executor: unknown option(s) {unknown}; known options: {known}")
        return RayExecutor(**options)
    raise ValueError(f"unknown executor '{name}'; choose one of {list(EXECUTORS)}")
