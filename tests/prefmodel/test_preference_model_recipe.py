"""pipelines/train_preference_model.yaml at tiny scale, then both models score new responses."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefdata.recipe import Recipe
from prefdata.steps.gpm import ScoreGPM
from prefdata.steps.reward import ScoreRM

RECIPE = Path(__file__).resolve().parents[2] / "pipelines" / "train_preference_model.yaml"
HH = RECIPE.parent / "data" / "hh_sample.jsonl"


def test_recipe_trains_bt_and_gpm_then_both_score_new_responses(tmp_path, tiny_llama):
    models = tmp_path / "models"
    pipeline = Recipe.load(RECIPE, [f"workdir={tmp_path / 'work'}", f"output={tmp_path / 'out.parquet'}",
                                    f"import_pairs.path={HH}", "import_pairs.limit=6",
                                    f"train_rm.model={tiny_llama}", f"train_rm.output={models}",
                                    "train_rm.epochs=5"]).build(progress=False)
    pipeline.run()
    pairs = pq.read_table(tmp_path / "out.parquet")
    assert pairs.num_rows == 6
    assert (models / "bt" / "config.json").is_file() and (models / "gpm" / "gpm_head.safetensors").is_file()
    meta = [s for s in pipeline.stats if s.step == "train_rm"][0].metadata  # the run summary's record
    assert set(meta) == {"bt", "gpm"} and 0.0 <= meta["gpm"]["train_accuracy"] <= 1.0

    prompt = [{"role": "user", "content": "How do I boil an egg?"}]
    new = pa.table({"prompt_id": ["q", "q", "q"], "prompt": [prompt] * 3, "response_id": ["x", "y", "z"],
                    "response": ["Put it in boiling water for nine minutes.", "No idea.", "Crack it first."]})
    bt = ScoreRM(model=str(models / "bt"), name="bt", device="cpu").process(new)
    bt = bt.table if hasattr(bt, "table") else bt
    gpm = ScoreGPM(model=str(models / "gpm"), device="cpu").process(bt).table
    assert np.isfinite(gpm.column("score_bt").to_numpy()).all()
    s = gpm.column("score_gpm").to_numpy()
    assert np.all((s > 0) & (s < 1)) and abs(s.mean() - 0.5) < 1e-6  # mean win probs of 3 average to 1/2
