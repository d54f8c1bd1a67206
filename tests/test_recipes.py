"""Every recipe in pipelines/ runs at tiny scale on the packaged SmolLM2.

The recipes share one workdir, so steps with the same config (loading, sampling) are
computed once and reused by the others — the cache doing its job across recipes.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from prefdata.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
PROMPTS = PIPELINES / "data" / "quickstart_prompts.jsonl"
HH = PIPELINES / "data" / "hh_sample.jsonl"
NEEDS_SERVER = {"hybrid_routing"}  # runs against the real Argilla server in tests/argilla
NOT_PIPELINES = {"train_quickstart"}  # a training config, run in tests/train
ROUNDS = {"iterative_dpo", "sppo"}  # rounds: recipes run through prefdata.rounds in tests/test_rounds.py
TINY = {  # option overrides by step name, applied where the recipe has the step
    "sample": {"n": 3, "max_new_tokens": 16},
    "judge_rubric": {"max_new_tokens": 24, "max_attempts": 1},
    "judge_pairwise": {"max_new_tokens": 16, "max_attempts": 1},
    "rationale": {"max_new_tokens": 16, "retries": 0},
    "load_prompts": {"path": str(PROMPTS), "limit": 3},
    "import_pairs": {"path": str(HH), "limit": 3},
    "score_flr": {"aspects": "[relevance]"},
}
RECIPES = sorted(p.stem for p in PIPELINES.glob("*.yaml")
                 if p.stem not in NEEDS_SERVER | NOT_PIPELINES | ROUNDS)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes")


def tiny_overrides(path: Path, tmp: Path) -> list[str]:
    names = {s["step"] for s in yaml.safe_load(path.read_text())["steps"]}
    items = [f"workdir={tmp / 'work'}", f"output={tmp / 'out' / path.stem}.parquet"]
    for step, options in TINY.items():
        if step in names:
            items += [f"{step}.{k}={v}" for k, v in options.items()]
    return items


def test_every_recipe_is_covered():
    assert {"quickstart", "ultrafeedback", "quality_pairs", "rescore_pairs", "score_suite"} <= set(RECIPES)
    rounds = {p.stem for p in PIPELINES.glob("*.yaml") if "rounds" in yaml.safe_load(p.read_text())}
    assert rounds == ROUNDS, "a recipe with rounds: must be run in tests/test_rounds.py and listed in ROUNDS"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_at_tiny_scale(name, workdir):
    path = PIPELINES / f"{name}.yaml"
    pipeline = Recipe.load(path, tiny_overrides(path, workdir)).build(progress=False)
    expected = pipeline.check_columns()
    result = pipeline.run()
    out = pipeline.output_paths()["data"]
    assert out.is_file() and (out.parent / "README.md").is_file()
    table = pq.read_table(out)
    assert table.num_rows == result.num_rows
    assert set(expected) <= set(table.column_names) or table.num_rows == 0
    first = pipeline.stats[0]
    assert first.rows_out >= 1
    for stats in pipeline.stats[1:]:
        assert stats.rows_in > 0, f"{name}: step {stats.step} got no rows"
