"""Score responses with sequence-classification reward models, optionally with MC dropout.

Any checkpoint that ``AutoModelForSequenceClassification`` loads (a Hugging Face id or a
local path) scores each (prompt, response) in its own chat template, batched by length.
One step may hold several reward models (``model`` a list, ``name`` a list of the same
length): each writes ``score_<name>``.

With ``mc_dropout: K`` (K >= 2) each model scores every response K times with dropout on
(``dropout`` overrides the checkpoint's rates, which are often 0) and writes the mean as
``score_<name>`` and the population std as ``score_<name>_std`` — the uncertainty that
UPO uses to pick reliable pairs (Wang et al. 2024, "Self-Evolutionary Large Language
Models through Uncertainty-Enhanced Preference Optimization", which estimates it with MC
dropout; cited from memory — the issue named it as Zhou et al. 2023 "Uncertainty-Penalized
…", which we believe is instead Zhai et al. 2023, "Uncertainty-Penalized Reinforcement
Learning from Human Feedback with Diverse Reward LoRA Ensembles", an ensemble method).
MC dropout itself: Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation".

The dropout masks are drawn per row: a row's K passes run as one batch of K copies of that
row under its own seed, from (``seed``, the score name, ``prompt_id``, ``response_id``) —
the row's texts when those columns are missing. So a row's mean and std do not depend on
its shard, ``batch_size`` or the other rows, and a larger ``--limit`` reuses the prompts
already scored (``prefdata.prompt_store``). The price: MC-dropout forwards are batched
over one row's passes (K rows per forward), not across rows; the deterministic path
(no ``mc_dropout``) batches by length as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from prefdata.schema import stable_hash
from prefdata.step import MapStep

log = logging.getLogger(__name__)


@dataclass
class ScoreRMConfig:
    model: str | list[str] = ""
    name: str | list[str] = "rm"
    label: int = 0
    mc_dropout: int = 0
    dropout: float | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    max_length: int | None = None
    trust_remote_code: bool = False


class ScoreRM(MapStep):
    """Writes ``score_<name>`` (and ``score_<name>_std`` with MC dropout) per reward model."""

    name = "score_rm"
    version = "2"  # 2: MC-dropout masks seeded per row (were: per shard)
    Config = ScoreRMConfig
    loaded: list | None = None  # the loaded reward models (``models()`` names them)
    passes: list | None = None  # the same models batching K copies of a row (MC dropout)

    def check(self) -> None:
        c = self.config
        models, names = self.models_and_names()
        problems = []
        if not models or not all(isinstance(m, str) and m for m in models):
            problems.append("'model' must name a reward model (HF id or local path) or a list of them")
        if len(names) != len(models):
            problems.append(f"with {len(models)} models give 'name' as a list of {len(models)} names")
        if len(set(names)) != len(names):
            problems.append(f"names must differ, got {names}")
        if c.mc_dropout == 1 or c.mc_dropout < 0:
            problems.append(f"mc_dropout is the number of stochastic passes (>= 2, or 0 for off), got {c.mc_dropout}")
        if c.dropout is not None and not 0 <= c.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {c.dropout}")
        if c.dropout is not None and not c.mc_dropout:
            problems.append("dropout only applies with mc_dropout >= 2")
        if c.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {c.batch_size}")
        if problems:
            raise ValueError("score_rm: " + "; ".join(problems))

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        c = self.config
        return [ModelRef(m, kind="reward", backend="transformers", device=c.device, dtype=c.dtype)
                for m in self.models_and_names()[0]]

    def models_and_names(self) -> tuple[list[str], list[str]]:
        c = self.config
        models = [c.model] if isinstance(c.model, str) else list(c.model)
        names = [c.name] if isinstance(c.name, str) else list(c.name)
        return models, names

    def input_columns(self) -> list[str]:
        return ["prompt", "response"]

    def output_columns(self, columns: list[str]) -> list[str]:
        new = self.new_columns()
        return [c for c in columns if c not in new] + new

    def new_columns(self) -> list[str]:
        out = []
        for name in self.models_and_names()[1]:
            out.append(f"score_{name}")
            if self.config.mc_dropout:
                out.append(f"score_{name}_std")
        return out

    def setup(self) -> None:
        from prefdata.models import load_reward_model

        c = self.config
        self.loaded = [
            load_reward_model(m, device=c.device, dtype=c.dtype, batch_size=c.batch_size,
                              max_length=c.max_length, trust_remote_code=c.trust_remote_code)
            for m in self.models_and_names()[0]
        ]
        if c.mc_dropout:  # light copies sharing the weights, one row's K passes per forward
            self.passes = [load_reward_model(m, device=c.device, dtype=c.dtype, batch_size=c.mc_dropout,
                                             max_length=c.max_length, trust_remote_code=c.trust_remote_code)
                           for m in self.models_and_names()[0]]
            for rm in self.loaded:
                if rm.dropout_rate(c.dropout) == 0:
                    log.warning("score_rm: reward model '%s' has no dropout, so MC-dropout std is 0; "
                                "set 'dropout' (e.g. 0.1) to make the passes differ", rm.name)

    def teardown(self) -> None:
        self.loaded = self.passes = None

    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        table = table.drop_columns([col for col in self.new_columns() if col in table.column_names])
        if table.num_rows and self.loaded is None:
            self.setup()
        prompts = table.column("prompt").to_pylist()
        responses = table.column("response").to_pylist()
        names = self.models_and_names()[1]
        for k, name in enumerate(names):
            if not table.num_rows:
                mean, std = np.zeros(0), np.zeros(0)
            elif c.mc_dropout:
                runs = self._mc_passes(self.passes[k], name, table, prompts, responses)
                mean, std = runs.mean(0), runs.std(0)
            else:
                mean, std = self.loaded[k].score(prompts, responses, label=c.label), None
            table = table.append_column(f"score_{name}", pa.array(mean, pa.float64()))
            if c.mc_dropout:
                table = table.append_column(f"score_{name}_std", pa.array(std, pa.float64()))
        return table

    def _mc_passes(self, rm, name: str, table: pa.Table, prompts: list, responses: list) -> np.ndarray:
        """``[K, n]`` stochastic scores: each row's K passes are one forward of K copies of
        the row, its dropout masks drawn from the row's own seed."""
        c = self.config
        k = c.mc_dropout
        from tqdm.auto import tqdm

        from prefdata.models import progress_disabled

        runs = np.zeros((k, len(prompts)))
        rows = zip(_row_seeds(table, c.seed, name), prompts, responses)
        bar = tqdm(rows, total=len(prompts), desc=f"mc dropout {name}", leave=False,
                   disable=len(prompts) < 2 or progress_disabled())
        for i, (seed, prompt, response) in enumerate(bar):
            runs[:, i] = rm.score([prompt] * k, [response] * k, label=c.label, passes=1, seed=seed,
                                  dropout=c.dropout)[0]
        return runs


def _row_seeds(table: pa.Table, seed: int, name: str) -> list[int]:
    """One seed per row from (seed, score name, prompt_id, response_id), or the row's texts."""
    ids = ["prompt_id", "response_id"]
    cols = ids if all(c in table.column_names for c in ids) else ["prompt", "response"]
    values = zip(*(table.column(c).to_pylist() for c in cols))
    return [int(stable_hash([seed, name, *v], length=8), 16) & 0x7FFFFFFF for v in values]
