"""On-policy rounds: one recipe that samples with the current policy, trains, and repeats.

```yaml
rounds:
  count: 2                    # K rounds (>= 1)
  policy: smollm2-135m-instruct   # round 0's policy
  prompts: fresh              # fresh: round k takes the k-th slice of the pool; same: every round the same
  prompts_per_round: 16       # null: all (same) or the pool split evenly (fresh)
  reference: previous         # the trainer's reference: previous (round k−1's policy) | initial
  early_stopping: {metric: win_rate_vs_previous, patience: 1, mode: max}   # optional
eval_prompts: pipelines/data/heldout.jsonl   # or load_prompts options {path: ..., limit: 8}
#   eval_prompts: {path: ..., judge: {model: ..., backend: api, ...}}   # a pairwise judge (optional)
```

Round k is the recipe expanded into a plain pipeline: every option whose value is
``policy`` becomes the folder of the model round k−1 trained (round 0: ``rounds.policy``),
and a ``round_prompts`` step after the source picks the round's prompts. The step
fingerprints hash that folder by content (``prefdata.models.identity``), so each round is
cached and resumed like any step — a killed run continues from the last finished shard or
trainer checkpoint — and all rounds share one workdir.

After each round's training the new policy is compared on ``eval_prompts`` (never trained
on; an overlap is an error before any work) with the previous policy and with round 0:
responses from the recipe's ``sample`` options, scored by the recipe's first scorer (any
``policy`` in the scorer's options means round 0's model, so every round is judged by the
same scorer). Win rate = share of (prompt, sample index) where the new response scores
higher (ties ½). With a pairwise judge (``eval_prompts: {judge: {...}}``, else the recipe's
``judge_pairwise`` step) the two responses of each (prompt, sample index) are also judged
in both orders (A/B, then B/A): a win counts 1, a tie or orders that disagree ½
(``judge_win_rate_vs_*``, with the share of comparisons whose orders agreed). The report
also holds mean response length and the trainer's chosen/rejected log-prob change; it goes
to ``<workdir>/rounds.jsonl`` and a table.
Iterative DPO as in Xiong et al., "Iterative Preference Learning from Human Feedback:
Bridging Theory and Practice for RLHF under KL-Constraint", ICML 2024 (RLHFlow).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import polars as pl
import pyarrow as pa

from prefdata.step import GlobalStep, Source, build_config

log = logging.getLogger(__name__)

PLACEHOLDER = "policy"
METRICS = ("win_rate_vs_previous", "win_rate_vs_round0", "judge_win_rate_vs_previous", "judge_win_rate_vs_round0",
           "mean_response_chars", "eval_chosen_logp_change", "eval_rejected_logp_change", "eval_margin",
           "eval_reward_accuracy")


class RoundsError(ValueError):
    pass


@dataclass
class RoundsConfig:
    count: int = 2
    policy: str = "smollm2-135m-instruct"
    prompts: Literal["fresh", "same"] = "fresh"
    prompts_per_round: int | None = None
    reference: Literal["previous", "initial"] = "previous"
    early_stopping: dict | None = None  # {metric, patience, mode}


@dataclass
class RoundPromptsConfig:
    start: int = 0
    count: int | None = None


class RoundPrompts(GlobalStep):
    """The prompts of one round: rows [start, start + count) of the pool, in pool order."""

    name: ClassVar[str] = "round_prompts"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = RoundPromptsConfig

    def input_columns(self) -> list[str]:
        return ["prompt_id"]

    def process(self, frame: pl.LazyFrame) -> pa.Table:
        c = self.config
        return frame.slice(c.start, c.count).collect().to_arrow()


@dataclass
class EvalComparisonsConfig:
    path: str = ""


class EvalComparisons(Source):
    """Two policies' held-out responses side by side, for a pairwise judge (``on:
    responses``): each (prompt, sample index) is one group (``prompt_id``) of two rows, the
    new policy's (``side: new``) and the other's. The file is named by its content."""

    name: ClassVar[str] = "eval_comparisons"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = EvalComparisonsConfig

    def fingerprint_extra(self) -> dict:
        from prefdata.readers import file_sha256

        return {"sha256": file_sha256(Path(self.config.path))}

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(COMPARISON_COLUMNS)

    def read(self) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.config.path)


COMPARISON_COLUMNS = ("prompt_id", "eval_prompt_id", "sample_index", "side", "prompt", "response", "response_id")


# -- configuration and checks (before any work) ---------------------------------------------
def rounds_config(data: dict, where: str) -> RoundsConfig:
    spec = data.get("rounds")
    if not isinstance(spec, dict):
        raise RoundsError(f"{where}: rounds: must be a mapping, e.g. {{count: 2, policy: smollm2-135m-instruct}}")
    try:
        cfg = build_config(RoundsConfig, spec, where=f"{where}: rounds")
    except (TypeError, ValueError) as exc:
        raise RoundsError(str(exc)) from None
    if cfg.count < 1:
        raise RoundsError(f"{where}: rounds: count must be >= 1, got {cfg.count}")
    if cfg.prompts_per_round is not None and cfg.prompts_per_round < 1:
        raise RoundsError(f"{where}: rounds: prompts_per_round must be >= 1, got {cfg.prompts_per_round}")
    if cfg.policy == PLACEHOLDER:
        raise RoundsError(f"{where}: rounds: policy names round 0's model (a Hub id or a folder), not 'policy'")
    if cfg.early_stopping is not None:
        early_stopping(cfg.early_stopping, where)
    return cfg


def early_stopping(spec: dict, where: str) -> tuple[str, int, str]:
    unknown = sorted(set(spec) - {"metric", "patience", "mode"})
    metric, patience, mode = spec.get("metric"), spec.get("patience", 1), spec.get("mode", "max")
    if unknown or metric not in METRICS or not isinstance(patience, int) or patience < 1 or mode not in ("max", "min"):
        raise RoundsError(f"{where}: rounds: early_stopping: expected {{metric, patience, mode}} with metric one of "
                          f"{list(METRICS)}, patience >= 1 and mode max|min; got {spec}")
    return metric, patience, mode


def check_steps(data: dict, where: str) -> tuple[int, int]:
    """Indices of the (single) sample and train steps; errors name step and setting."""
    steps = data["steps"]
    trains = [i for i, s in enumerate(steps) if s["step"] == "train"]
    if len(trains) != 1:
        raise RoundsError(f"{where}: a recipe with rounds: needs exactly one train step (it has {len(trains)})")
    t = trains[0]
    if steps[t].get("model") != PLACEHOLDER:
        raise RoundsError(f"{where}: steps[{t}] (train): model must be 'policy' in a recipe with rounds "
                          f"(round k trains the policy of round k−1); got {steps[t].get('model')!r}")
    if "reference" in steps[t]:
        raise RoundsError(f"{where}: steps[{t}] (train): reference is set by rounds: reference (previous | initial)")
    samples = [i for i, s in enumerate(steps) if s["step"] == "sample"]
    if not samples:
        raise RoundsError(f"{where}: a recipe with rounds: needs a sample step (model: policy)")
    if t != len(steps) - 1:
        raise RoundsError(f"{where}: steps[{t}] (train) must be the last step of a recipe with rounds")
    return samples[0], t


# -- expansion ------------------------------------------------------------------------------
def substitute(value, model: str):
    if value == PLACEHOLDER:
        return model
    if isinstance(value, list):
        return [substitute(v, model) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, model) for k, v in value.items()}
    return value


def round_data(data: dict, cfg: RoundsConfig, k: int, policy: str) -> dict:
    """The recipe of round k as a plain recipe (no rounds, no placeholder)."""
    out = {key: copy.deepcopy(v) for key, v in data.items() if key not in ("rounds", "eval_prompts")}
    out["steps"] = [{key: substitute(v, policy) if key != "step" else v for key, v in s.items()} for s in data["steps"]]
    train = out["steps"][-1]
    if cfg.reference == "initial" and k > 0:
        train["reference"] = cfg.policy
    return out


def prompt_slice(cfg: RoundsConfig, k: int, pool: int) -> tuple[int, int | None]:
    if cfg.prompts == "same":
        return 0, cfg.prompts_per_round
    per = cfg.prompts_per_round or pool // cfg.count
    return k * per, per


# -- running --------------------------------------------------------------------------------
@dataclass
class RoundsRun:
    """Runs (or resumes) the rounds of a recipe; ``run()`` returns the report rows."""

    recipe_path: str
    data: dict
    executor_name: str | None = None
    in_process: bool = False
    progress: bool = True
    report: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.where = f"recipe {self.recipe_path}"
        self.cfg = rounds_config(self.data, self.where)
        self.sample_index, self.train_index = check_steps(self.data, self.where)
        self.workdir = Path(self.data.get("workdir", f"work/{self.data.get('name', 'pipeline')}"))

    def pipeline(self, data: dict):
        from prefdata.executors.local import LocalExecutor
        from prefdata.recipe import Recipe, RecipeError

        try:
            pipeline = Recipe(self.recipe_path, data).build(progress=self.progress, executor_name=self.executor_name)
        except RecipeError as exc:
            raise RoundsError(str(exc)) from None
        if self.in_process and isinstance(pipeline.executor, LocalExecutor):
            pipeline.executor.in_process = True
        return pipeline

    def check(self) -> None:
        """Everything that can be known before the first sample: steps build, columns chain,
        the pool is large enough, eval prompts do not overlap training prompts."""
        first = self.pipeline(self.round_recipe(0, self.cfg.policy))
        first.check_columns()
        pool = read_prompt_ids(first.steps[0])
        if self.cfg.prompts == "fresh":
            per = self.cfg.prompts_per_round or len(pool) // self.cfg.count
            if per * self.cfg.count > len(pool) or per < 1:
                raise RoundsError(f"{self.where}: rounds: prompts: fresh needs count x prompts_per_round = "
                                  f"{self.cfg.count} x {per} prompts; the pool holds {len(pool)}. Lower "
                                  "prompts_per_round, add prompts, or use prompts: same")
        used = set()
        for k in range(self.cfg.count):
            start, count = prompt_slice(self.cfg, k, len(pool))
            chunk = pool[start:None if count is None else start + count]
            if not chunk:
                raise RoundsError(f"{self.where}: rounds: round {k} has no prompts: the pool holds {len(pool)}, "
                                  f"prompts: {self.cfg.prompts}, prompts_per_round: {self.cfg.prompts_per_round}")
            used.update(chunk)
        if "eval_prompts" in self.data:
            from prefdata.steps.load_prompts import LoadPrompts

            if self.scorer_spec() is None and self.judge_spec() is None:
                raise RoundsError(f"{self.where}: eval_prompts: nothing compares the policies: add a scorer "
                                  "(score_* or judge_rubric step) after the sample step, a judge_pairwise step, "
                                  "or eval_prompts: {judge: {...judge_pairwise options}}")
            if self.judge_spec() is not None:
                from prefdata.steps.judge import JudgePairwise

                try:
                    JudgePairwise(**self.judge_spec())
                except (TypeError, ValueError, ImportError) as exc:
                    raise RoundsError(f"{self.where}: eval_prompts: judge: {exc}") from None
            held_out = read_prompt_ids(LoadPrompts(**self.eval_options()))
            overlap = used & set(held_out)
            if overlap:
                raise RoundsError(f"{self.where}: eval_prompts: {len(overlap)} held-out prompt(s) are also training "
                                  "prompts of some round; held-out prompts must never be trained on — remove them "
                                  "from one of the files")

    def eval_options(self) -> dict:
        """The load_prompts options of the held-out prompts (without ``judge``)."""
        spec = self.data["eval_prompts"]
        return {"path": spec} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "judge"}

    def round_recipe(self, k: int, policy: str) -> dict:
        return round_data(self.data, self.cfg, k, policy)

    def build_round(self, k: int, policy: str):
        pipeline = self.pipeline(self.round_recipe(k, policy))
        pool_steps = pipeline.steps
        start, count = prompt_slice(self.cfg, k, self.pool_size)
        if not (self.cfg.prompts == "same" and count is None):
            pool_steps.insert(1, RoundPrompts(start=start, count=count))
        _kill_sample_hook(pipeline, k)
        return pipeline

    def run(self) -> list[dict]:
        self.check()
        self.pool_size = len(read_prompt_ids(self.pipeline(self.round_recipe(0, self.cfg.policy)).steps[0]))
        current = self.cfg.policy  # what 'policy' means in the next round
        self.report = []
        best = None
        for k in range(self.cfg.count):
            os.environ["PREFDATA_ROUND"] = str(k)  # read by the kill-and-resume test hook only
            t0 = time.perf_counter()
            pipeline = self.build_round(k, current)
            pipeline.card = False  # written once, with the rounds report, after the last round
            pipeline.run()
            from prefdata.steps.train import model_dir

            model = str(model_dir(pipeline.step_dirs()[-1]))  # relative with a relative workdir: movable
            prompts = pipeline.stats[1 if pipeline.steps[1].name == RoundPrompts.name else 0]
            row = {"round": k, "policy_in": current, "policy_out": model, "train_prompts": prompts.rows_out,
                   "seconds": {s.label or s.step: s.seconds for s in pipeline.stats},
                   **(pipeline.stats[-1].metadata or {})}
            if "eval_prompts" in self.data:
                t1 = time.perf_counter()
                row.update(self.evaluate(model, current))
                row["seconds"]["eval"] = round(time.perf_counter() - t1, 3)
            row["seconds"]["round"] = round(time.perf_counter() - t0, 3)
            self.report.append(row)
            write_report(self.report, self.workdir / "rounds.jsonl")
            best, stop = self.early_stop(best, k)
            # with early stopping, 'policy' is the best model so far by the metric
            current = model if best is None else self.report[best[0]]["policy_out"]
            if stop:
                log.info("early stopping after round %d: no better %s for %s round(s)", k,
                         self.cfg.early_stopping["metric"], self.cfg.early_stopping.get("patience", 1))
                break
        os.environ.pop("PREFDATA_ROUND", None)
        if best is not None:
            for row in self.report:
                row["best"] = row["round"] == best[0]
        t0 = time.perf_counter()
        plots = update_card(pipeline, self.report)
        write_plots(self.report, self.workdir, rendered=plots)
        self.report[-1]["seconds"]["card"] = round(time.perf_counter() - t0, 3)
        write_report(self.report, self.workdir / "rounds.jsonl")
        self.final_policy = current
        return self.report

    def early_stop(self, best, k: int):
        """(best round, value), and whether to stop: no improvement for ``patience`` rounds."""
        if self.cfg.early_stopping is None:
            return best, False
        metric, patience, mode = early_stopping(self.cfg.early_stopping, self.where)
        value = self.report[-1].get(metric)
        if value is None:
            raise RoundsError(f"{self.where}: rounds: early_stopping: metric {metric} is not in the round report "
                              "(win rates need eval_prompts:)")
        better = best is None or (value > best[1] if mode == "max" else value < best[1])
        if better:
            return (k, value), False
        return best, k - best[0] >= patience

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, new: str, previous: str) -> dict:
        first = self.cfg.policy
        tables = {name: self.eval_responses(model) for name, model in
                  (("new", new), ("previous", previous), ("round0", first))}
        out = {"mean_response_chars": mean_chars(tables["new"]),
               "mean_response_chars_previous": mean_chars(tables["previous"])}
        if self.scorer_spec() is not None:
            score = self.score_column
            out.update({"win_rate_vs_previous": win_rate(tables["new"], tables["previous"], score),
                        "win_rate_vs_round0": win_rate(tables["new"], tables["round0"], score),
                        "eval_score": score})
        if self.judge_spec() is not None:
            for name in ("previous", "round0"):
                judged = self.judge_win_rate(tables["new"], tables[name])
                out.update({f"judge_{k}_vs_{name}": v for k, v in judged.items()})
            out["eval_judge"] = self.judge_spec()["model"]
        return out

    def eval_responses(self, model: str) -> pl.DataFrame:
        """The eval prompts' responses from ``model``, scored by the recipe's first scorer."""
        steps = self.data["steps"]
        sample = {**substitute(steps[self.sample_index], model)}
        scorer = self.scorer_spec()
        data = {key: v for key, v in self.data.items() if key not in ("rounds", "eval_prompts", "output")}
        data["steps"] = [{"step": "load_prompts", **self.eval_options()}, sample]
        if scorer is not None:
            data["steps"].append(substitute(scorer, self.cfg.policy))
        pipeline = self.pipeline(data)
        if scorer is not None:
            self.score_column = score_column(pipeline)
        return pl.from_arrow(pipeline.run())

    def scorer_spec(self) -> dict | None:
        """The first step after sample that writes a comparable score_<name> per response (a
        scorer or the rubric judge; not judge_pairwise, whose scores are relative)."""
        for spec in self.data["steps"][self.sample_index + 1:]:
            if spec["step"].startswith(("score_", "judge_")) and spec["step"] != "judge_pairwise":
                return spec
        return None

    def judge_spec(self) -> dict | None:
        """The pairwise judge's options: ``eval_prompts: {judge: ...}``, else the recipe's
        judge_pairwise step; a ``policy`` in them is round 0's model, as for the scorer."""
        spec = self.data.get("eval_prompts")
        judge = spec.get("judge") if isinstance(spec, dict) else None
        if judge is None:
            judge = next((s for s in self.data["steps"] if s["step"] == "judge_pairwise"), None)
        if judge is None:
            return None
        if not isinstance(judge, dict):
            raise RoundsError(f"{self.where}: eval_prompts: judge: must be a mapping of judge_pairwise options, "
                              f"e.g. {{model: smollm2-135m-instruct}}; got {judge!r}")
        options = {k: v for k, v in substitute(judge, self.cfg.policy).items() if k != "step"}
        return {"model": "smollm2-135m-instruct", **options, "on": "responses"}

    def judge_win_rate(self, new: pl.DataFrame, old: pl.DataFrame) -> dict:
        """The pairwise judge on each (prompt, sample index): the new policy's response vs the
        other's, asked in both orders; cached in the workdir like any step."""
        from prefdata.io import write_parquet
        from prefdata.schema import stable_hash

        table = comparisons(new, old)
        path = self.workdir / "rounds_eval" / f"comparisons-{stable_hash(table.to_pylist())}.parquet"
        if not path.exists():
            write_parquet(table, path)
        data = {key: v for key, v in self.data.items() if key not in ("rounds", "eval_prompts", "output")}
        data["steps"] = [{"step": "load_prompts", **self.eval_options()}, {"step": "judge_pairwise",
                                                                           **self.judge_spec()}]
        pipeline = self.pipeline(data)
        pipeline.steps[0] = EvalComparisons(path=str(path))
        name = pipeline.steps[1].config.name
        judged = pl.from_arrow(pipeline.run()).filter(pl.col("side") == "new")
        return judge_rates(judged, name)


def score_column(pipeline) -> str:
    columns = pipeline.check_columns()
    found = [c for c in columns if c.startswith("score_") and not c.endswith("_std")]
    if not found:
        raise RoundsError("eval_prompts: the scorer writes no score_<name> column")
    return found[0]


def comparisons(new: pl.DataFrame, old: pl.DataFrame) -> pa.Table:
    """Rows for ``EvalComparisons``: per (prompt, sample index) the new response, then the old."""
    from prefdata.schema import stable_hash

    keys = ["prompt_id", "sample_index"]
    cols = [*keys, "prompt", "response", "response_id"]
    both = new.select(cols).join(old.select(*keys, pl.col("response").alias("old_response"),
                                            pl.col("response_id").alias("old_response_id")), on=keys)
    both = both.sort(keys)
    group = [stable_hash([p, i]) for p, i in zip(both["prompt_id"].to_list(), both["sample_index"].to_list())]
    def side(name: str, response: str, rid: str) -> pl.DataFrame:
        return both.select(pl.Series("prompt_id", group), pl.col("prompt_id").alias("eval_prompt_id"),
                           "sample_index", pl.lit(name).alias("side"), "prompt", pl.col(response).alias("response"),
                           pl.col(rid).alias("response_id")).with_row_index("row")

    rows = pl.concat([side("new", "response", "response_id"), side("old", "old_response", "old_response_id")])
    return rows.sort("row", "side", descending=[False, False]).drop("row").select(COMPARISON_COLUMNS).to_arrow()


def judge_rates(judged: pl.DataFrame, name: str) -> dict:
    """The new responses' rows after the judge: win rate (score_<name>: 1, ½ or 0 for one
    comparison in two orders), the share whose orders agreed, and the comparisons missing."""
    score = pl.col(f"score_{name}")
    done = judged.filter(score.is_not_null() & score.is_not_nan())
    return {"win_rate": float(done[f"score_{name}"].mean()) if done.height else None,
            "agreement": float(done[f"{name}_agreement"].mean()) if done.height else None,
            "missing": judged.height - done.height}


def read_prompt_ids(source) -> list[str]:
    """A source step's prompt ids in pool order (no model is loaded)."""
    from prefdata.shards import as_output

    table = as_output(source.read()).table
    return table.column("prompt_id").to_pylist()


def win_rate(new: pl.DataFrame, old: pl.DataFrame, score: str) -> float | None:
    """Share of (prompt, sample index) where ``new`` scores above ``old``; ties count ½."""
    keys = ["prompt_id", "sample_index"]
    joined = new.select(*keys, pl.col(score).alias("a")).join(old.select(*keys, pl.col(score).alias("b")), on=keys)
    joined = joined.drop_nulls()
    if joined.height == 0:
        return None
    wins = ((pl.col("a") > pl.col("b")).cast(pl.Float64) + 0.5 * (pl.col("a") == pl.col("b")).cast(pl.Float64))
    return float(joined.select(wins.mean()).item())


def mean_chars(table: pl.DataFrame) -> float:
    return float(table.select(pl.col("response").str.len_chars().mean()).item())


def write_report(rows: list[dict], path: Path) -> None:
    from prefdata.io import write_text

    write_text("".join(json.dumps(r) + "\n" for r in rows), path)


def format_report(rows: list[dict]) -> str:
    cols = [("round", "round", "{}"), ("win_rate_vs_previous", "win vs prev", "{:.3f}"),
            ("win_rate_vs_round0", "win vs r0", "{:.3f}")]
    if any("judge_win_rate_vs_previous" in r for r in rows):
        cols += [("judge_win_rate_vs_previous", "judge vs prev", "{:.3f}"),
                 ("judge_win_rate_vs_round0", "judge vs r0", "{:.3f}")]
    cols += [("mean_response_chars", "resp chars", "{:.1f}"),
            ("eval_chosen_logp_change", "Δ chosen logp", "{:+.3f}"),
            ("eval_rejected_logp_change", "Δ rejected logp", "{:+.3f}"), ("train_steps", "train steps", "{}")]
    head = "".join(f"{title:>16}" for _, title, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append(f"{'-' if v is None else fmt.format(v):>16}")
        lines.append("".join(cells) + ("  (best)" if r.get("best") else ""))
    return "\n".join(lines)


def write_plots(rows: list[dict], folder: Path, rendered: Path | None = None) -> list[Path]:
    """One PNG per metric over rounds (``<folder>/rounds_<metric>.png``), copied from the
    card's ``rendered`` plots folder when it has them (matplotlib is the slow part)."""
    import shutil

    from prefdata.card_plots import ROUND_METRICS, rounds_figures, save

    names = [f"rounds_{m}" for m in ROUND_METRICS if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if rendered is not None and all((rendered / f"{n}.png").is_file() for n in names):
        out = []
        for n in names:
            shutil.copyfile(rendered / f"{n}.png", folder / f".{n}.png.tmp")
            out.append((folder / f".{n}.png.tmp").replace(folder / f"{n}.png"))
        return out
    return [save(fig, folder / f"{name}.png") for name, fig in rounds_figures(rows).items()]


def update_card(pipeline, rows: list[dict]) -> Path | None:
    """The last round's output card, with the rounds report and its plots; its plots
    folder, or None without an output. A card whose inputs (the data file, the report
    without timings, the card code) are those it was made from is left as it is."""
    from prefdata.cards import write_card
    from prefdata.io import write_json, write_text

    paths = pipeline.output_paths()
    if paths is None or not paths["summary"].exists():
        return None
    summary = json.loads(paths["summary"].read_text())
    summary["rounds"] = rows
    write_json(summary, paths["summary"], redact_secrets=True)
    stamp, digest = paths["root"] / ".rounds-card.json", card_digest(paths["data"], summary)
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest
            and (paths["root"] / "README.md").is_file()):
        write_card(paths["root"], data_files=[paths["data"]], summary=summary)
        write_text(json.dumps({"digest": digest}), stamp)
    return paths["root"] / "plots"


def card_digest(data: Path, summary: dict) -> str:
    """What the card shows: the data's bytes, the run summary and rounds report without
    wall times or cache hits, and the code that renders it."""
    import hashlib

    import prefdata.card_plots
    import prefdata.card_sections
    import prefdata.cards
    from prefdata.models.identity import file_sha256

    h = hashlib.sha256(file_sha256(data).encode())
    volatile = ("seconds", "shards_cached", "finished")
    stable = {"info": summary.get("info"),
              "steps": [{k: v for k, v in s.items() if k not in volatile} for s in summary.get("steps", [])],
              "rounds": [{k: v for k, v in r.items() if k not in volatile} for r in summary.get("rounds", [])]}
    h.update(json.dumps(stable, sort_keys=True, default=str).encode())
    for module in (prefdata.cards, prefdata.card_plots, prefdata.card_sections):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


# -- kill-and-resume tests ------------------------------------------------------------------
class _KillBeforeShard:
    """``process`` of a sample step that SIGKILLs this process group when it is called for
    shard number ``shards`` (0-based): that many shards are written, none more."""

    def __init__(self, process, shards: int):
        self.process, self.shards, self.calls = process, shards, 0

    def __call__(self, table):
        if self.calls == self.shards:
            import signal

            os.killpg(os.getpgid(0), signal.SIGKILL)
        self.calls += 1
        return self.process(table)


def _kill_sample_hook(pipeline, k: int) -> None:
    """Tests only: ``PREFDATA_TEST_KILL_SAMPLE=<round>:<shards>`` kills the run (``kill -9``
    of its process group) in that round's sampling once that many shards are written — a
    kill at a known point, whatever the machine's load (a kill from outside, timed by
    polling for shard files, could land after the last shard)."""
    spec = os.environ.get("PREFDATA_TEST_KILL_SAMPLE")
    if not spec or spec.partition(":")[0] != str(k):
        return
    from prefdata.executors.local import LocalExecutor

    if not (isinstance(pipeline.executor, LocalExecutor) and pipeline.executor.in_process):
        raise RoundsError("PREFDATA_TEST_KILL_SAMPLE needs the local executor in process (--in-process)")
    step = next(s for s in pipeline.steps if s.name == "sample")
    step.process = _KillBeforeShard(step.process, int(spec.partition(":")[2]))


# -- command line ---------------------------------------------------------------------------
def wants_rounds(path: str) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # the recipe loader reports it
        return False
    return isinstance(data, dict) and ("rounds" in data or "eval_prompts" in data)


def cmd_rounds(args) -> int:
    """``prefdata run`` for a recipe with ``rounds:``."""
    from prefdata.recipe import Recipe

    recipe = Recipe.from_args(args)
    if "rounds" not in recipe.data:
        raise RoundsError(f"recipe {args.recipe}: eval_prompts: needs a rounds: block")
    if args.force:
        raise RoundsError("--force is not supported with rounds: yet; delete the step folders in the workdir instead")
    run = RoundsRun(recipe.path, recipe.data, executor_name=args.executor, in_process=args.in_process,
                    progress=not args.no_progress)
    if args.dry_run:
        run.check()
        from prefdata.plan import format_plan

        run.pool_size = len(read_prompt_ids(run.pipeline(run.round_recipe(0, run.cfg.policy)).steps[0]))
        print("round 0 (later rounds depend on the model round 0 trains):")
        print(format_plan(run.build_round(0, run.cfg.policy).plan()))
        return 0
    rows = run.run()
    print(format_report(rows))
    print(f"rounds report in {run.workdir / 'rounds.jsonl'}; final policy {run.final_policy}")
    return 0

