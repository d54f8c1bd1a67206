"""Dataset cards and the Hub folder layout, on a real small pipeline run."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import polars as pl
import pytest
import yaml
from datasets import load_dataset

from prefdata.cards import card_for_folder, check_hub_layout
from prefdata.pipeline import Pipeline
from prefdata.step import MapStep
from prefdata.steps.build import BuildPairs
from prefdata.steps.load_prompts import LoadPrompts

SECRET = "sk-test-5f1e2d3c4b5a69788796"


@dataclass
class CannedConfig:
    note: str = ""


class CannedResponses(MapStep):
    """Three responses per prompt with a deterministic score (stands in for sample+score)."""

    name = "canned"
    Config = CannedConfig

    def input_columns(self):
        return ["prompt_id", "prompt"]

    def output_columns(self, columns):
        return columns + ["response_id", "response", "score_len"]

    def process(self, table):
        df = pl.from_arrow(table).join(pl.DataFrame({"k": [1, 2, 3]}), how="cross")
        return df.with_columns(
            response_id=pl.col("prompt_id") + pl.col("k").cast(pl.String),
            response=pl.lit("answer ") + pl.col("k").cast(pl.String),
            score_len=(pl.col("k") * pl.col("prompt_id").str.len_chars()).cast(pl.Float64),
        ).drop("k")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def outdir(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(12)))
    steps = [LoadPrompts(path=str(prompts)), CannedResponses(note=f"key={SECRET}"), BuildPairs(score="score_len")]
    recipe = {"name": "card-test", "card": {"license": "apache-2.0", "title": "Card test"},
              "steps": [{"step": "canned", "note": f"key={SECRET}"}]}
    out = tmp_path / "out"
    Pipeline(steps, workdir=tmp_path / "work", output=out, shard_size=5, progress=False,
             info={"recipe": recipe, "recipe_path": "r.yaml"}).run()
    return out


def test_output_folder_is_a_hub_dataset(outdir):
    assert (outdir / "data" / "train-00000-of-00001.parquet").is_file()
    assert check_hub_layout(outdir) == []
    ds = load_dataset(str(outdir), split="train")
    assert ds.num_rows == 12 and ds[0]["chosen"][0]["role"] == "assistant"


def test_card_yaml_parses_and_has_the_figures(outdir):
    text = (outdir / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "apache-2.0"
    assert meta["configs"][0]["data_files"][0]["path"] == ["data/train-00000-of-00001.parquet"]
    assert "# Card test" in text
    for step in ("load_prompts", "canned", "build_pairs"):
        assert f"| {step} |" in text
    assert "pairs=12" in text


def test_plots_are_valid_pngs_with_the_expected_count(outdir):
    plots = sorted(p.name for p in (outdir / "plots").glob("*.png"))
    assert plots == ["margin.png", "rows_per_step.png", "score_chosen.png", "score_rejected.png"]
    for p in (outdir / "plots").glob("*.png"):
        w, h = png_size(p)
        assert w > 100 and h > 100
    text = (outdir / "README.md").read_text()
    assert text.count("](plots/") == 4


def test_no_secret_in_card_or_summary_text(outdir):
    card = (outdir / "README.md").read_text()
    assert SECRET not in card
    assert "key=***" in card  # the recipe value was there and was scrubbed
    for summary in outdir.glob("*.json"):
        assert SECRET not in summary.read_text()


def test_card_command_rewrites_from_the_saved_summary(outdir):
    (outdir / "README.md").unlink()
    for p in (outdir / "plots").glob("*.png"):
        p.unlink()
    card_for_folder(outdir)
    assert check_hub_layout(outdir) == []
    assert len(list((outdir / "plots").glob("*.png"))) == 4


def test_layout_problems_are_reported(tmp_path):
    assert "README.md is missing" in check_hub_layout(tmp_path)[0]
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        card_for_folder(tmp_path)
