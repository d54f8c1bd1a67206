"""pipelines/methods_tour.yaml at tiny scale on the packaged SmolLM2: every method's output
checked against its formula on the run's own tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from prefdata import shards
from prefdata.length_bias import length_bias
from prefdata.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "methods_tour.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tour")
    overrides = [f"workdir={tmp / 'work'}", f"output={tmp / 'out' / 'tour.parquet'}",
                 f"load_prompts.path={ROOT / 'pipelines' / 'data' / 'quickstart_prompts.jsonl'}",
                 "load_prompts.limit=4", "sample.n=4", "sample.max_new_tokens=16",
                 "score_flr.aspects=[relevance]"]
    pipeline = Recipe.load(RECIPE, overrides).build(progress=False)
    pipeline.run()
    return pipeline


def step_table(pipeline, index):
    return shards.read_shards(sorted(pipeline.step_dirs()[index].glob("shard-*.parquet"))).to_pandas()


def test_the_ensembles_are_the_papers_formulas(tour):
    names = [s.name for s in tour.steps]
    responses = step_table(tour, names.index("build_pairs") - 1)
    z = {m: (responses[m] - responses[m].mean()) / responses[m].std(ddof=0) for m in ("score_cdr", "score_flr")}
    u = 0.0
    for m, zm in z.items():  # u = log σ(z − q_0.85 of the prompt's own responses), summed
        ref = zm.groupby(responses["prompt_id"]).transform(lambda x: np.quantile(x, 0.85))
        u = u + -np.log1p(np.exp(-(zm - ref)))
    np.testing.assert_allclose(responses["score_transformed"], u, atol=1e-9)
    a, b = (1 / (1 + np.exp(-z[m])) for m in ("score_cdr", "score_flr"))
    np.testing.assert_allclose(responses["score_harmonic"], 1 / (0.7 / a + 0.3 / b), atol=1e-9)


def test_rso_pairs_with_soft_labels_and_length_report(tour):
    out = tour.output_paths()
    pairs = pq.read_table(out["data"]).to_pandas()
    assert len(pairs) >= 3 and set(pairs["pair_strategy"]) == {"rso"}
    assert (pairs.groupby("prompt_id").size() == 1).all()  # pairs_per_prompt: 1
    np.testing.assert_allclose(pairs["score_chosen"], pairs["score_transformed_chosen"])
    np.testing.assert_allclose(pairs["label_prob"], 1 / (1 + np.exp(-pairs["margin"])), rtol=1e-12)
    assert (pairs["label_prob"] > 0.5).all() and (pairs["score_harmonic_chosen"].between(0, 1)).all()
    report = tour.stats[-1].metadata
    expected = length_bias(pl.read_parquet(out["data"]))
    assert report.keys() == expected.keys()
    assert all(report[k] == pytest.approx(expected[k], rel=1e-9) for k in expected)  # float sums: any order
    summary = json.loads(out["summary"].read_text())
    assert summary["steps"][-1]["metadata"]["length_pairs"] == len(pairs)
    card = (out["root"] / "README.md").read_text()
    assert "- Length bias: the chosen response is longer in" in card
    assert "exemplars in the last user turn, 1 drawn per prompt (seed 0); criteria replace" in card
