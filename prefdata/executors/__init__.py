"""Executors run a map step over the shards that still need computing."""

from prefdata.executors.local import LocalExecutor

__all__ = ["LocalExecutor"]
