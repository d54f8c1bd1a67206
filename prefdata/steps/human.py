"""Recipe steps for the human loop: push routed pairs to Argilla, pull human labels back.

Both are global steps over a pair table; the Argilla server and key come from
``ARGILLA_API_URL`` / ``ARGILLA_API_KEY`` (or a running ``prefdata argilla serve``), never
from the recipe, so no key lands in a fingerprint or a marker file.

``argilla_push`` passes the table through unchanged (the push is idempotent, so a cached
step is safe). ``argilla_pull`` fingerprints the human labels it fetches: a re-run pulls
again and recomputes the merge, and what follows, exactly when annotations changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from prefdata.step import GlobalStep, Output


@dataclass
class ArgillaPushConfig:
    dataset: str = "prefdata-pairs"
    workspace: str = "prefdata"
    batch_size: int = 200
    seed: int = 0
    show_ai_suggestion: bool = False  # blind by default; see prefdata.argilla.push
    min_submitted: int = 1
    only_routed: bool = True


@dataclass
class ArgillaPullConfig:
    dataset: str = "prefdata-pairs"
    workspace: str = "prefdata"
    policy: Literal["majority", "first", "keep_all"] = "majority"
    unanswered: Literal["keep_ai", "exclude"] = "keep_ai"
    ties: Literal["exclude", "keep_ai"] = "exclude"


class ArgillaPush(GlobalStep):
    """Push the pairs routed to humans (all pairs without a ``route`` column) to Argilla."""

    name = "argilla_push"
    Config = ArgillaPushConfig

    def check(self) -> None:
        from prefdata.argilla import MAX_BATCH, require_sdk

        require_sdk()
        if not 1 <= self.config.batch_size <= MAX_BATCH:
            raise ValueError(f"argilla_push: batch_size must be between 1 and {MAX_BATCH}")
        if self.config.min_submitted < 1:
            raise ValueError("argilla_push: min_submitted must be >= 1")

    def input_columns(self) -> list[str]:
        return ["pair_id", "prompt", "chosen", "rejected"]

    def process(self, frame: pl.LazyFrame) -> Output:
        from prefdata.argilla import PushConfig, push

        table = frame.collect().to_arrow()
        result = push(table, PushConfig(**vars(self.config)))
        return Output(table, None, {"pushed": result.created, "already_in_argilla": result.already_present})


class ArgillaPull(GlobalStep):
    """Merge submitted human labels into the pairs, with provenance (see ``prefdata.argilla``)."""

    name = "argilla_pull"
    Config = ArgillaPullConfig

    def __init__(self, config=None, **kwargs):
        self._annotations = None
        super().__init__(config, **kwargs)

    def check(self) -> None:
        from prefdata.argilla import require_sdk

        require_sdk()
        if self.config.unanswered not in ("keep_ai", "exclude") or self.config.ties not in ("exclude", "keep_ai"):
            raise ValueError("argilla_pull: unanswered must be keep_ai or exclude; ties must be exclude or keep_ai")
        if self.config.policy not in ("majority", "first", "keep_all"):
            raise ValueError(f"argilla_pull: policy must be majority, first or keep_all, got '{self.config.policy}'")

    def input_columns(self) -> list[str]:
        return ["pair_id", "chosen", "rejected"]

    def output_columns(self, columns: list[str]) -> list[str]:
        from prefdata.argilla import PROVENANCE

        extra = [c for c in ("label_source", *PROVENANCE) if c not in columns]
        return list(columns) + extra

    def annotations(self):
        """The human labels, fetched once per step object; None while the dataset does not exist."""
        from prefdata.argilla import DatasetConfig, DatasetMissing, fetch_annotations

        if self._annotations is None:
            try:
                self._annotations = fetch_annotations(DatasetConfig(self.config.dataset, self.config.workspace))
            except DatasetMissing:
                return None  # a first run: argilla_push creates it before this step runs
        return self._annotations

    def fingerprint_extra(self):
        from prefdata.argilla import annotations_fingerprint

        annotations = self.annotations()
        return "no-dataset-yet" if annotations is None else annotations_fingerprint(annotations)

    def process(self, frame: pl.LazyFrame) -> Output:
        from prefdata.argilla import MergeConfig, merge

        annotations = self.annotations()
        if annotations is None:
            from prefdata.argilla import DatasetMissing

            raise DatasetMissing(f"argilla_pull: no dataset '{self.config.workspace}/{self.config.dataset}'; "
                                 "put an argilla_push step with the same dataset before this one")
        cfg = MergeConfig(policy=self.config.policy, unanswered=self.config.unanswered, ties=self.config.ties)
        return merge(frame.collect().to_arrow(), annotations, cfg)
