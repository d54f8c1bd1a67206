"""Recipes: YAML parsing, --set overrides and their strict checking."""

from __future__ import annotations

import pytest
import yaml

from prefdata.recipe import Recipe, RecipeError

RECIPE = {
    "name": "t",
    "workdir": "w",
    "output": "out/p.parquet",
    "steps": [
        {"step": "load_prompts", "path": "p.jsonl"},
        {"step": "build_pairs", "strategy": "best_vs_random"},
    ],
}


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_overrides_by_step_name_index_and_top_level(recipe_path):
    r = Recipe.load(recipe_path, ["build_pairs.seed=7", "steps.1.strategy=best_vs_worst", "workdir=/tmp/x"], limit=3)
    assert r.data["steps"][1]["seed"] == 7 and r.data["steps"][1]["strategy"] == "best_vs_worst"
    assert r.data["workdir"] == "/tmp/x"
    assert r.data["steps"][0]["limit"] == 3


@pytest.mark.parametrize("item, message", [
    ("nosuch.x=1", "no step named 'nosuch'"),
    ("bogus=1", "unknown key"),
    ("steps.9.x=1", "has 2 steps"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides_are_clear_errors(recipe_path, item, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load(recipe_path, [item])


def test_unknown_step_option_names_the_step(recipe_path):
    r = Recipe.load(recipe_path, ["build_pairs.stratgy=x"])
    with pytest.raises(RecipeError, match=r"steps\[1\] \(build_pairs\).*unknown option.*stratgy"):
        r.build()


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "shardsize": 3}))
    with pytest.raises(RecipeError, match="unknown top-level key.*shardsize"):
        Recipe.load(path)
