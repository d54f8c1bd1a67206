"""Score responses with a General Preference Model, and count intransitive preferences.

``score_gpm``: one preference embedding per response (N backbone passes for N responses,
prompts shared), the N×N win-probability matrix P[a, b] = σ(s(a ≻ b)/τ) per prompt, and
per response its general preference score — the mean win probability against the
prompt's other responses — as ``score_<name>``, so ``build_pairs`` can pair by it.
``<name>_win_probs`` holds the response's row of P aligned with ``<name>_opponents``
(response ids), and ``<name>_cyclic_triples`` the prompt's count of a ≻ b ≻ c ≻ a triples;
the run summary counts prompts with at least one cycle. Zhang et al. 2024, "General
Preference Modeling with Preference Representations for Aligning Language Models".

``intransitivity``: the same count from a pairwise judge's both-order verdicts on a pair
table (``<judge>_verdict`` from ``judge_pairwise``), as a ``cyclic_triples`` column.

``train_rm``: head-only BT and GPM models trained on the pipeline's pair table (the
recipe pipelines/train_preference_model.yaml), for ``score_rm`` and ``score_gpm`` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.step import GlobalStep, MapStep, Output


@dataclass
class ScoreGPMConfig:
    model: str = ""            # a folder written by `prefdata train-rm --objective gpm`
    name: str = "gpm"
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 16


class ScoreGPM(MapStep):
    """Writes ``score_<name>``, ``<name>_win_probs``, ``<name>_opponents``, ``<name>_cyclic_triples``."""

    name = "score_gpm"
    Config = ScoreGPMConfig
    loaded = None

    def check(self) -> None:
        from prefdata.prefmodel.io import HEAD_FILE, META_FILE, read_meta

        folder = Path(self.config.model)
        meta = read_meta(folder) if folder.is_dir() else None
        if meta is None or meta.get("kind") != "gpm":
            raise ValueError(f"score_gpm: 'model' must be a GPM folder ({META_FILE} with kind 'gpm' and "
                             f"{HEAD_FILE}) written by prefdata train-rm --objective gpm; got '{self.config.model}'")
        if self.config.batch_size < 1:
            raise ValueError(f"score_gpm: batch_size must be at least 1, got {self.config.batch_size}")

    def _meta(self) -> dict:
        from prefdata.prefmodel.io import read_meta

        return read_meta(self.config.model) or {}

    def models(self) -> list:
        from prefdata.models.identity import ModelRef
        from prefdata.prefmodel.io import backbone_path

        c = self.config
        return [ModelRef(backbone_path(Path(c.model), self._meta()), backend="transformers", device=c.device,
                         dtype=c.dtype)]

    def fingerprint_extra(self):
        from prefdata.models.identity import file_sha256
        from prefdata.prefmodel.io import HEAD_FILE

        return {"head": file_sha256(Path(self.config.model) / HEAD_FILE),
                "meta": {k: v for k, v in self._meta().items() if k not in ("eval_accuracy",)}}

    def input_columns(self) -> list[str]:
        return ["prompt_id", "prompt", "response"]

    def new_columns(self) -> list[str]:
        n = self.config.name
        return [f"score_{n}", f"{n}_win_probs", f"{n}_opponents", f"{n}_cyclic_triples"]

    def output_columns(self, columns: list[str]) -> list[str]:
        new = self.new_columns()
        return [c for c in columns if c not in new] + new

    def setup(self) -> None:
        from prefdata.models.transformers_backend import resolve_device
        from prefdata.prefmodel.io import load_gpm

        c = self.config
        self.loaded = load_gpm(c.model, device=resolve_device(c.device), batch_size=c.batch_size, dtype=c.dtype)

    def teardown(self) -> None:
        self.loaded = None

    def process(self, table: pa.Table) -> Output:
        import torch

        from prefdata.prefmodel.intransitivity import summary, triples_from_probabilities
        from prefdata.prefmodel.io import probability_matrix

        n = self.config.name
        table = table.drop_columns([c for c in self.new_columns() if c in table.column_names])
        rows = table.num_rows
        score, probs, opponents, triples = np.full(rows, np.nan), [None] * rows, [None] * rows, np.zeros(rows, np.int64)
        pids = table.column("prompt_id").to_pylist()
        ids = (table.column("response_id").to_pylist() if "response_id" in table.column_names
               else [str(i) for i in range(rows)])
        per_prompt = {}
        if rows:
            if self.loaded is None:
                self.setup()
            v, lam = self.loaded.embed(table.column("prompt").to_pylist(), table.column("response").to_pylist())
            groups: dict = {}
            for i, pid in enumerate(pids):
                groups.setdefault(pid, []).append(i)
            for pid, members in groups.items():
                idx = torch.tensor(members)
                P = probability_matrix(v[idx], lam[members[0]], self.loaded.tau).double().cpu().numpy()
                t = triples_from_probabilities(P)
                per_prompt[pid] = t
                for k, i in enumerate(members):
                    others = [j for j in range(len(members)) if j != k]
                    score[i] = P[k, others].mean() if others else np.nan
                    probs[i] = P[k].tolist()
                    opponents[i] = [ids[j] for j in members]
                    triples[i] = t
        out = (table.append_column(f"score_{n}", pa.array(score, pa.float64(), from_pandas=True))
               .append_column(f"{n}_win_probs", pa.array(probs, pa.list_(pa.float64())))
               .append_column(f"{n}_opponents", pa.array(opponents, pa.list_(pa.string())))
               .append_column(f"{n}_cyclic_triples", pa.array(triples, pa.int64())))
        counts = summary(pl.DataFrame({"cyclic_triples": list(per_prompt.values())},
                                      schema={"cyclic_triples": pl.Int64}), n)
        return Output(out, counts=counts)


@dataclass
class IntransitivityConfig:
    verdict: str = ""          # a pairwise judge's verdict column, e.g. judge_verdict
    name: str = "judge"


class Intransitivity(GlobalStep):
    """Adds ``cyclic_triples`` (per prompt, from agreed both-order verdicts) to a pair table."""

    name = "intransitivity"
    Config = IntransitivityConfig

    def check(self) -> None:
        if not self.config.verdict:
            raise ValueError("intransitivity: set 'verdict' to a pairwise judge's verdict column "
                             "(judge_pairwise on pairs writes <name>_verdict)")

    def input_columns(self) -> list[str]:
        return ["prompt_id", "chosen_id", "rejected_id", self.config.verdict]

    def output_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c != "cyclic_triples"] + ["cyclic_triples"]

    def process(self, frame: pl.LazyFrame) -> Output:
        from prefdata.prefmodel.intransitivity import from_verdicts, summary

        df = frame.collect()
        df = df.drop([c for c in ("cyclic_triples",) if c in df.columns])
        per_prompt = from_verdicts(df, self.config.verdict)
        out = df.join(per_prompt, on="prompt_id", how="left")
        self.metadata = {"verdict": self.config.verdict, **summary(per_prompt, self.config.name)}
        return Output(out.to_arrow(), counts=summary(per_prompt, self.config.name))



@dataclass
class TrainRMConfig:
    model: str = "smollm2-135m-instruct"   # the backbone whose features the heads read
    objectives: list[str] | None = None    # any of bt, gpm (default: both)
    output: str | None = None              # folder for the models; default: the step's own folder
    dim: int = 8
    gate: bool = True
    normalize: bool = True
    epochs: float = 20.0
    batch_size: int = 1024
    lr: float | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"


class TrainRM(GlobalStep):
    """Train head-only BT and/or GPM models on the pair table; the table passes through.

    Models go to ``<output>/<objective>`` (``score_rm`` reads ``bt``, ``score_gpm`` reads
    ``gpm``); eval accuracy on prompts held out of training is the step's metadata. For
    ``full`` fine-tuning use ``prefdata train-rm``.
    """

    name = "train_rm"
    Config = TrainRMConfig
    out_dir: Path | None = None
    metadata: dict | None = None

    def objectives(self) -> list[str]:
        return list(self.config.objectives or ["bt", "gpm"])

    def check(self) -> None:
        bad = [o for o in self.objectives() if o not in ("bt", "gpm")]
        if bad:
            raise ValueError(f"train_rm: objectives must be bt and/or gpm, got {bad}")
        if self.config.dim < 2 or self.config.dim % 2:
            raise ValueError(f"train_rm: dim (the GPM embedding dimension 2k) must be even, got {self.config.dim}")

    def models(self) -> list:
        from prefdata.models.identity import ModelRef

        return [ModelRef(self.config.model, backend="transformers", device=self.config.device, dtype="float32")]

    def input_columns(self) -> list[str]:
        return ["prompt", "chosen", "rejected"]

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(columns)

    def bind_output_dir(self, step_dir: Path) -> None:
        self.out_dir = Path(step_dir)

    def process(self, frame: pl.LazyFrame) -> pa.Table:
        from prefdata.io import write_parquet
        from prefdata.prefmodel.train import PrefModelConfig, train

        c = self.config
        root = Path(c.output) if c.output else self.out_dir
        if root is None:
            raise ValueError("train_rm: no folder for the models: set 'output'")
        table = frame.collect().to_arrow()
        data = write_parquet(table, root / "data" / "pairs.parquet")
        self.metadata = {}
        for objective in self.objectives():
            cfg = PrefModelConfig(data=str(data), model=c.model, output=str(root / objective), objective=objective,
                                  dim=c.dim, gate=c.gate, normalize=c.normalize, epochs=c.epochs,
                                  batch_size=c.batch_size, lr=c.lr, eval_fraction=c.eval_fraction, seed=c.seed,
                                  device=c.device, feature_cache=str(root / "features"), progress=False)
            s = train(cfg)
            self.metadata[objective] = {"folder": str(root / objective), "eval_accuracy": s["eval_accuracy"],
                                        "train_accuracy": s["train_accuracy"], "eval_pairs": s["eval_pairs"]}
        return table
