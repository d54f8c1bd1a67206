"""Dataset cards and the Hub folder layout, on a real small pipeline run."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import struct
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_dataset

from prefdata.card_plots import pair_figures, response_figures, score_figure, step_labels, steps_figure
from prefdata.cards import card_for_folder, check_hub_layout, public_summary, size_category, write_card
from prefdata.pipeline import Pipeline
from prefdata.step import MapStep
from prefdata.steps.build import BuildPairs
from prefdata.steps.load_prompts import LoadPrompts

SECRET = "sk-test-5f1e2d3c4b5a69788796"
DATA = "data/train-00000-of-00001.parquet"
# written order, deliberately not alphabetical
RECIPE_KEYS = ["name", "workdir", "output", "shard_size", "card", "steps"]


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


def front_matter(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def run_pipeline(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(12)))
    out, work = tmp_path / "out", tmp_path / "work"
    recipe = {"name": "card-test", "workdir": str(work), "output": str(out), "shard_size": 5,
              "card": {"license": "apache-2.0", "title": "Card test"},
              "steps": [{"step": "load_prompts", "path": str(prompts)},
                        {"step": "canned", "note": f"key={SECRET}"}, {"step": "build_pairs", "score": "score_len"}]}
    for _ in range(2):  # the second run is served from the cache
        steps = [LoadPrompts(path=str(prompts)), CannedResponses(note=f"key={SECRET}"), BuildPairs(score="score_len")]
        Pipeline(steps, workdir=work, output=out, shard_size=5, progress=False,
                 info={"recipe": copy.deepcopy(recipe), "recipe_path": str(tmp_path / "r.yaml")}).run()
    return out


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    old = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MY_SERVICE_API_KEY", SECRET)
            yield run_pipeline(tmp_path_factory.mktemp("card"))
    finally:
        os.umask(old)


@pytest.fixture
def copy_of(outdir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(outdir, target)
    return target


def test_output_folder_is_a_hub_dataset(outdir):
    assert (outdir / DATA).is_file()
    assert check_hub_layout(outdir) == []
    ds = load_dataset(str(outdir), split="train")
    assert ds.num_rows == 12 and ds[0]["chosen"][0]["role"] == "assistant"


def test_card_yaml_has_every_hub_field(outdir):
    meta = front_matter(outdir / "README.md")
    assert list(meta) == ["pretty_name", "license", "language", "annotations_creators", "task_categories",
                          "tags", "size_categories", "configs"]
    assert meta["pretty_name"] == "Card test"
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["language"] == ["en"]
    assert meta["annotations_creators"] == ["machine-generated"]  # label_source = ai on every pair
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["configs"][0]["data_files"][0]["path"] == [DATA]
    text = (outdir / "README.md").read_text()
    assert "# Card test" in text
    for step in ("load_prompts", "canned", "build_pairs"):
        assert f"| {step} |" in text
    assert "pairs=12" in text


def test_license_other_has_name_and_link_and_unset_license_is_unknown(copy_of, caplog):
    summary = json.loads((copy_of / "summary.json").read_text())
    summary["info"]["recipe"]["card"] = {"license": "other", "license_name": "my-terms-1.0",
                                         "license_link": "https://example.org/terms", "language": ["fr", "en"],
                                         "task_categories": ["text-generation", "text-classification"]}
    meta = front_matter(write_card(copy_of, [copy_of / DATA], summary))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == \
        ("other", "my-terms-1.0", "https://example.org/terms")
    assert meta["language"] == ["fr", "en"]
    assert meta["task_categories"] == ["text-generation", "text-classification"]
    summary["info"]["recipe"]["card"] = {"licence": "mit"}  # a typo is named, not silently dropped
    path = write_card(copy_of, [copy_of / DATA], summary)
    assert "unknown key(s) ['licence']" in caplog.text
    assert front_matter(path)["license"] == "unknown"
    assert "has not stated a license" in section(path.read_text(), "License")


@pytest.mark.parametrize("rows, expected", [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"),
                                            (99_999, "10K<n<100K"), (100_000, "100K<n<1M"),
                                            (2_500_000, "1M<n<10M")])
def test_size_categories_are_the_hub_ones(rows, expected):
    assert size_category(rows) == expected


def test_no_machine_path_in_the_card(outdir):
    text = (outdir / "README.md").read_text()
    root = str(outdir.parent)
    assert root not in text
    assert "/tmp" not in text and str(outdir) not in text
    recipe = yaml.safe_load(section(text, "Recipe").split("```yaml\n")[1].split("```")[0])
    assert recipe["workdir"] == "work" and recipe["output"] == "out"  # basenames, not the machine's paths
    assert recipe["steps"][0]["path"] == "p.jsonl"
    assert "from the recipe `r.yaml`" in text


def test_published_summary_has_no_machine_path(outdir):
    saved = (outdir / "summary.json").read_text()
    assert str(outdir) in saved  # the local copy keeps the real paths, for resuming and debugging
    public = public_summary(outdir / "summary.json")
    assert str(outdir.parent) not in public and "/tmp" not in public
    recipe = json.loads(public)["info"]["recipe"]
    assert (recipe["workdir"], recipe["output"], recipe["steps"][0]["path"]) == ("work", "out", "p.jsonl")


def test_recipe_keys_keep_their_written_order_when_the_card_is_rewritten(copy_of):
    (copy_of / "README.md").unlink()
    card_for_folder(copy_of)  # re-reads summary.json
    text = (copy_of / "README.md").read_text()
    recipe = yaml.safe_load(section(text, "Recipe").split("```yaml\n")[1].split("```")[0])
    assert list(recipe) == RECIPE_KEYS
    assert list(recipe["steps"][2]) == ["step", "score"]


def test_step_table_has_a_cached_column_explained(outdir):
    text = (outdir / "README.md").read_text()
    table = section(text, "How it was made")
    assert "| step | fingerprint | rows in | rows out | cached | time | notes |" in table
    row = next(line for line in table.splitlines() if line.startswith("| build_pairs |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "3/3"  # the second run took all three shards from the cache
    assert "*cached*" in table and "about 0 s" in table


def test_each_caveat_once_and_epsilon_with_its_error(copy_of):
    summary = json.loads((copy_of / "summary.json").read_text())
    cdr = {"step": "score_cdr", "fingerprint": "f" * 16, "kind": "map", "rows_in": 36, "rows_out": 36,
           "shards": 3, "shards_cached": 0, "seconds": 1.0, "counts": {}, "metadata": None,
           "config": {"strong": "smollm2-135m-instruct", "weak": None, "name": "cdr", "reduction": "sum"}}
    noise_new = {**cdr, "step": "noise", "kind": "global", "config": {},
                 "metadata": {"epsilon": 0.1, "epsilon_stderr": 0.05, "n_confident": 40, "n_pairs": 60}}
    noise_old = {**noise_new, "metadata": {"epsilon": 0.25, "epsilon_se": 0.02, "n_conf": 8, "n_pairs": 12}}
    summary["steps"][2:2] = [copy.deepcopy(cdr) for _ in range(3)] + [noise_new, noise_old]
    text = write_card(copy_of, [copy_of / DATA], summary).read_text()
    assert text.count("used one model") == 1
    assert "`score_cdr[1]`, `score_cdr[2]` and `score_cdr[3]` used one model" in text
    assert text.count("the CDR reference code puts few-shot exemplars") == 1  # the same choices, one note
    assert "`score_cdr[1]`, `score_cdr[2]` and `score_cdr[3]`: exemplars in the system message" in text
    quality = section(text, "Noise and quality")
    assert "ε = 0.1000 ± 0.0500 (standard error), from 40 confident pairs of 60 (step `noise[1]`)" in quality
    assert "ε = 0.2500 ± 0.0200 (standard error), from 8 confident pairs of 12 — few" in quality


def test_models_are_hub_links_or_basenames(copy_of):
    summary = json.loads((copy_of / "summary.json").read_text())
    local = copy_of / "checkpoints" / "my-rm"
    local.mkdir(parents=True)
    summary["steps"][1]["config"] = {"model": "smollm2-135m-instruct", "reward_models": ["org/rm-7b", str(local)]}
    text = write_card(copy_of, [copy_of / DATA], summary).read_text()
    models = text.split("Models: ", 1)[1].split("\n", 1)[0]
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in models
    assert "[org/rm-7b](https://huggingface.co/org/rm-7b)" in models
    assert "`my-rm` (a local model folder)" in models
    assert str(copy_of) not in text


def test_output_files_have_normal_permissions(outdir):
    files = [outdir / "README.md", outdir / "summary.json", outdir / DATA, *(outdir / "plots").glob("*.png")]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_plots_are_valid_pngs_with_the_expected_count(outdir):
    plots = sorted(p.name for p in (outdir / "plots").glob("*.png"))
    assert plots == ["margin.png", "rows_per_step.png", "scores.png"]
    for p in (outdir / "plots").glob("*.png"):
        w, h = png_size(p)
        assert w > 100 and h > 100
    assert (outdir / "README.md").read_text().count("](plots/") == 3


def test_chosen_and_rejected_share_one_axis_and_the_same_bins():
    chosen, rejected = np.array([5.0, 6.5, 7.0, 9.0]), np.array([-3.0, 0.5, 1.0, 2.0])
    fig = score_figure(chosen, rejected, "score_cdr (nats)")
    ax, = fig.axes
    chosen_bars, rejected_bars = ax.containers[:2]
    edges = [sorted({round(p.get_x(), 9) for p in bars}) for bars in (chosen_bars, rejected_bars)]
    assert edges[0] == edges[1]
    lo, hi = ax.get_xlim()
    assert lo <= -3.0 and hi >= 9.0
    assert ax.get_xlabel() == "score_cdr (nats)" and ax.get_ylabel() == "pairs"
    assert all(float(t).is_integer() for t in ax.get_yticks())


def test_plots_name_the_score_and_its_unit(outdir):
    frame = pl.scan_parquet(outdir / DATA)
    summary = {"steps": [{"step": "score_cdr", "config": {"name": "len", "reduction": "mean"}}]}
    figures = pair_figures(frame, frame.collect_schema().names(), summary, "score_len")
    assert set(figures) == {"scores", "margin"}
    assert figures["scores"].axes[0].get_xlabel() == "score_len (nats/token)"
    assert "score_len (nats/token)" in figures["margin"].axes[0].get_xlabel()
    for fig in figures.values():
        assert all(float(t).is_integer() for t in fig.axes[0].get_yticks())


def test_flip_probability_is_shown_on_its_whole_range(outdir):
    frame = pl.scan_parquet(outdir / DATA).with_columns(flip_prob=pl.lit(0.3))
    fig = pair_figures(frame, frame.collect_schema().names(), {}, None)["flip_prob"]
    assert fig.axes[0].get_xlim() == (0.0, 1.0)


def test_failed_scores_are_left_out_of_the_plots():
    frame = pl.LazyFrame({"score_rm": [1.0, None, float("nan"), float("-inf"), 2.5]})
    fig = response_figures(frame, ["score_rm"], {})["score_rm"]
    assert fig.axes[0].get_title() == "score_rm (n=2)" and fig.axes[0].get_xlabel() == "score_rm (reward)"


def test_one_bar_per_step_even_when_names_repeat():
    steps = [{"step": "load_prompts"}, {"step": "score_cdr"}, {"step": "score_cdr"}, {"step": "build_pairs"}]
    labels = step_labels(steps)
    assert labels == ["load_prompts", "score_cdr[1]", "score_cdr[2]", "build_pairs"]
    fig = steps_figure(labels, [3, 12, 12, 3])
    ax, = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert len(ax.containers[0]) == 4
    assert ax.get_ylabel() == "rows out"
    assert all(float(t).is_integer() for t in ax.get_yticks())


def test_no_secret_in_card_or_summary_text(outdir):
    card = (outdir / "README.md").read_text()
    assert SECRET not in card
    assert "key=***" in card  # the recipe value was there and was scrubbed
    for summary in outdir.glob("*.json"):
        assert SECRET not in summary.read_text()


def test_card_command_rewrites_from_the_saved_summary(copy_of):
    (copy_of / "README.md").unlink()
    for p in (copy_of / "plots").glob("*.png"):
        p.unlink()
    card_for_folder(copy_of)
    assert check_hub_layout(copy_of) == []
    assert len(list((copy_of / "plots").glob("*.png"))) == 3


def test_card_from_the_data_alone(outdir, tmp_path):
    """A folder with a pulled parquet and no summary: the card describes the data."""
    pairs = pl.read_parquet(outdir / DATA)
    human = pairs.with_columns(label_source=pl.when(pl.int_range(pl.len()) < 4).then(pl.lit("human"))
                               .otherwise(pl.lit("ai")))
    folder = tmp_path / "pulled"
    folder.mkdir()
    table = human.to_arrow()
    noise = {"epsilon": 0.125, "epsilon_stderr": 0.0312, "n_confident": 48, "n_pairs": 60}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"prefdata_step:noise": json.dumps(noise).encode()})
    pq.write_table(table, folder / "pairs_human.parquet")
    pl.DataFrame({"reason": ["bad"]}).write_parquet(folder / "pairs_human.quarantine.parquet")
    readme = card_for_folder(folder)
    meta = front_matter(readme)
    assert meta["annotations_creators"] == ["expert-generated", "machine-generated"]
    assert meta["pretty_name"] == "pairs_human"
    assert meta["configs"][0]["data_files"][0]["path"] == ["pairs_human.parquet"]
    assert check_hub_layout(folder) == []
    text = readme.read_text()
    assert "this card describes the data alone" in text and "human = 4 (expert-generated)" in text
    assert "Pairs were chosen by `score_len`" in text  # found in the data: score_len_* equals score_*
    assert "ε = 0.1250 ± 0.0312 (standard error), from 48 confident pairs of 60 (file metadata" in text
    assert sorted(p.name for p in (folder / "plots").glob("*.png")) == ["margin.png", "scores.png"]


def test_card_of_one_file_among_files_of_different_schemas(outdir, tmp_path):
    pairs = pl.read_parquet(outdir / DATA)
    pairs.write_parquet(tmp_path / "pairs.parquet")
    pairs.with_columns(label_source=pl.lit("original")).drop("margin").write_parquet(tmp_path / "imported.parquet")
    with pytest.raises(ValueError, match="different columns.*give the one to describe"):
        card_for_folder(tmp_path)
    meta = front_matter(card_for_folder(tmp_path / "imported.parquet"))
    assert meta["annotations_creators"] == ["found"]
    assert meta["configs"][0]["data_files"][0]["path"] == ["imported.parquet"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not a parquet file"):
        card_for_folder(tmp_path / "notes.txt")


def test_response_table_card_counts_truncated_responses(tmp_path):
    responses = pl.DataFrame({"prompt_id": ["a", "a", "b", "b"], "prompt": ["p", "p", "q", "q"],
                              "response_id": ["a1", "a2", "b1", "b2"], "response": ["x", "y If you", "z", "w"],
                              "finish_reason": ["stop", "length", "stop", "stop"],
                              "score_judge": [1.0, 3.0, 5.0, 4.0]})
    responses.write_parquet(tmp_path / "responses.parquet")
    readme = card_for_folder(tmp_path)
    assert front_matter(readme)["annotations_creators"] == ["machine-generated"]  # scores, no pairs yet
    text = readme.read_text()
    assert "Truncated: 1 of 4 responses were cut at the token limit (`finish_reason = length`)" in text
    assert "Each row is one response" in text
    assert [p.name for p in (tmp_path / "plots").glob("*.png")] == ["score_judge.png"]


def test_layout_problems_are_reported(tmp_path):
    assert "README.md is missing" in check_hub_layout(tmp_path)[0]
    with pytest.raises(FileNotFoundError, match="no summary.json, <name>.summary.json or parquet data"):
        card_for_folder(tmp_path)
