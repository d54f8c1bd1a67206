"""The bundled trainer as a pipeline step: its input table is the training data, its
folder holds the trained model.

A global step: it writes the whole input table once (``<step dir>/data/train.parquet``),
trains on it with ``prefdata.train`` (every ``TrainConfig`` field is an option, except
``data`` and ``output``) into ``<step dir>/model`` and passes the table through unchanged.
The step's fingerprint covers the trainer settings, the data (through the upstream chain)
and the identity of the base and reference models (content hash of a local folder), so a
policy trained in round k — a folder whose content hash differs from every other — makes
round k+1's steps new computations, and a killed run resumes: the trainer always starts
with ``resume``, continuing from the last checkpoint of this step's own run folder.

``iterations: true`` trains Curry-DPO's iterations in order (the ``curriculum`` step's
``iteration`` column): iteration i starts from iteration i−1's model and uses it as the
reference. Pattnaik et al., "Curry-DPO: Enhancing Alignment using Curriculum Learning &
Ranked Preferences", 2024.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import polars as pl
import pyarrow as pa

from prefdata.step import GlobalStep
from prefdata.train.config import TrainConfig, check

log = logging.getLogger(__name__)

WIN_PROB_LOSSES = ("sppo", "gpo")  # as prefdata.train.losses.WIN_PROB_LOSSES (not imported: torch)
# The column each of those losses takes as P(y > pi_t | x): SPPO a win_rates estimate, GPO the
# General Preference Model's general preference score (score_gpm).
TARGET_COLUMN = {"sppo": "win_prob", "gpo": "score_gpm"}
LIST_ONLY = ("pro",)
NOT_OPTIONS = ("data", "output")


@dataclass
class TrainStepConfig(TrainConfig):
    """``TrainConfig`` (see ``prefdata train --help``); ``data``/``output`` are the step's own."""

    model: str = "smollm2-135m-instruct"
    progress: bool = False
    iterations: bool = False  # Curry-DPO: one run per curriculum iteration, each from the previous


class Train(GlobalStep):
    """Train a policy on the table (pairs or ranked lists); the model is ``<step dir>/model``."""

    name: ClassVar[str] = "train"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = TrainStepConfig
    out_dir: Path | None = None
    metadata: dict | None = None

    def check(self) -> None:
        c = self.config
        for key in NOT_OPTIONS:
            if getattr(c, key) != getattr(TrainStepConfig, key):
                raise ValueError(f"train: option '{key}' is set by the pipeline (the input table and the step's "
                                 "folder); remove it")
        check(dataclasses.replace(trainer_config(c), data="<input table>"))

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        refs = [ModelRef(c.model, device=c.device)]
        if c.reference not in (None, c.model):
            refs.append(ModelRef(c.reference, device=c.device))
        return refs

    def input_columns(self) -> list[str]:
        if self.config.loss in LIST_ONLY:
            return ["prompt", "responses", "scores"]
        if self.config.loss in WIN_PROB_LOSSES:
            return ["prompt"]  # pairs or lists; check_win_prob checks where the win probabilities come from
        return ["prompt", "chosen", "rejected"]

    def bind_output_dir(self, step_dir: Path) -> None:
        """The pipeline tells a step with a folder product where its folder is."""
        self.out_dir = Path(step_dir)

    def process(self, frame: pl.LazyFrame) -> pa.Table:
        from prefdata.io import write_parquet

        if self.out_dir is None:
            raise RuntimeError("train: the pipeline did not give the step its folder (bind_output_dir)")
        table = frame.collect().to_arrow()
        data = write_parquet(table, self.out_dir / "data" / "train.parquet")
        cfg = dataclasses.replace(trainer_config(self.config), data=str(data), output=str(self.out_dir / "model"))
        if self.config.iterations:
            self.metadata = train_iterations(cfg, table, self.out_dir)
        else:
            self.metadata = run_trainer(cfg)
        return table


def trainer_config(c: TrainStepConfig) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(TrainConfig)})


def model_dir(step_dir: str | Path) -> Path:
    """Where a train step's model lives, given its step folder."""
    return Path(step_dir) / "model"


def run_trainer(cfg: TrainConfig) -> dict:
    """Train (resuming this folder's run when it has checkpoints); the last eval metrics."""
    from prefdata.train.trainer import train

    summary = train(cfg, resume=True, on_step=_kill_hook())
    selected = {k: summary[k] for k in ("early_stopped", "best_step", "best_value") if k in summary}
    return {"train_steps": summary.get("step"), **selected,
            **last_eval(Path(cfg.output), summary.get("best_step"))}


def train_iterations(cfg: TrainConfig, table: pa.Table, out_dir: Path) -> dict:
    """Curry-DPO: iteration i trains from iteration i−1's model, which is also its reference."""
    from prefdata.io import write_parquet

    if "iteration" not in table.column_names:
        raise ValueError("train: iterations: true needs the 'iteration' column (the curriculum step writes it)")
    frame = pl.from_arrow(table)
    model, reference, meta = cfg.model, cfg.reference, {}
    iterations = sorted(frame["iteration"].unique().to_list())
    for it in iterations:
        part = frame.filter(pl.col("iteration") == it).to_arrow()
        data = write_parquet(part, out_dir / "data" / f"iteration-{it}.parquet")
        final = out_dir / "model" if it == iterations[-1] else out_dir / f"iteration-{it}"
        step_cfg = dataclasses.replace(cfg, data=str(data), output=str(final), model=model, reference=reference)
        meta = run_trainer(step_cfg)
        model = reference = str(final)
    return {**meta, "iterations": len(iterations)}


def last_eval(run_dir: Path, step: int | None = None) -> dict:
    """The trainer's last eval record (with early stopping: the selected step's), chosen and
    rejected log-probs and their change since step 0."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        return {}
    from prefdata.train.trainer import read_log

    evals = [r for r in read_log(path) if "eval/loss" in r]
    if step is not None:
        evals = [r for r in evals if r["step"] == step] or evals
    if not evals:
        return {}
    keys = ("eval/loss", "eval/reward_accuracy", "eval/margin", "eval/chosen_logp", "eval/rejected_logp",
            "eval/chosen_logp_change", "eval/rejected_logp_change")
    return {k.replace("eval/", "eval_"): evals[-1][k] for k in keys if k in evals[-1]}


def check_win_prob(steps: list, where: str = "recipe") -> None:
    """Before any work: a ``train`` step whose loss reads win probabilities needs an earlier
    ``win_rates`` step and a build step that ranks by ``score: win_prob``."""
    written: set[str] = set()
    columns: list[str] = []
    builder = None
    for i, step in enumerate(steps):
        if step.name == "train" and step.config.loss in WIN_PROB_LOSSES:
            loss = step.config.loss
            target = TARGET_COLUMN[loss]
            adder = ("add a win_rates step after the scorer" if target == "win_prob"
                     else "add a score_gpm step with a trained General Preference Model")
            if target not in written:
                raise ValueError(f"{where}: steps[{i}] (train): loss: {loss} reads each response's {target}, but no "
                                 f"earlier step writes a {target} column; {adder}, "
                                 f"then build pairs or lists with score: {target}")
            if builder is None or getattr(builder.config, "score", None) != target:
                name = builder.name if builder is not None else "build_pairs"
                raise ValueError(f"{where}: steps[{i}] (train): loss: {loss} needs the {target} values as the "
                                 f"pairs' scores; set score: {target} in the {name} step before it")
        if step.name in ("build_pairs", "build_lists"):
            builder = step
        try:
            columns = step.output_columns(columns)
        except Exception:  # a step that needs a real column list; the pipeline reports it
            columns = list(columns)
        written |= set(columns)


def _kill_hook():
    """Tests of kill-and-resume: ``PREFDATA_TEST_KILL_TRAIN=<round>:<step>`` SIGKILLs this
    process group (the run and its workers, as ``kill -9`` of a session would) when training
    of that round reaches that step, right after the previous step's checkpoint."""
    spec = os.environ.get("PREFDATA_TEST_KILL_TRAIN")
    if not spec:
        return None
    want_round, _, want_step = spec.partition(":")
    if os.environ.get("PREFDATA_ROUND", "0") != want_round:
        return None

    def on_step(record: dict) -> None:
        if record["step"] == int(want_step):
            os.killpg(os.getpgid(0), signal.SIGKILL)

    return on_step
