"""train-rm end to end on a real tiny Llama and real parquet files: saved BT model through
score_rm, GPM folder through load_gpm, full-mode kill and resume, bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prefdata.prefmodel import io
from prefdata.prefmodel.features import cached_features
from prefdata.prefmodel.train import PrefModelConfig, train
from prefdata.train.data import DataError

def test_bt_head_only_saves_a_reward_model_that_score_rm_reads(tmp_path, make_pairs, tiny_llama):
    from prefdata.steps.reward import ScoreRM

    data = make_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "bt"
    summary = train(PrefModelConfig(data=data, model=tiny_llama, output=str(out), objective="bt",
                                    epochs=20, batch_size=8, progress=False))
    assert summary["feature_cache"] == "miss" and summary["steps"] == 40
    meta = json.loads((out / "prefmodel.json").read_text())
    assert meta["kind"] == "bt"
    # the head's rewards on the cached features ...
    table = pq.read_table(data).to_pydict()
    convs = table["prompt"][:4]
    texts = [m[-1]["content"] for m in table["chosen"][:4]]
    feats, info = cached_features(tiny_llama, convs, texts, tmp_path / "f")
    from safetensors.torch import load_file
    w = load_file(str(out / "model.safetensors"))["score.weight"]
    want = (feats.response @ w.T).squeeze(-1).double().numpy()
    # ... equal what score_rm computes from the saved folder
    step = ScoreRM(model=str(out), name="bt", device="cpu", dtype="float32")
    responses = pa.table({"prompt": convs, "response": texts})
    got = step.process(responses)
    got = (got.table if hasattr(got, "table") else got).column("score_bt").to_numpy()
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gpm_head_only_folder_loads_and_scores(tmp_path, make_pairs, tiny_llama):
    data = make_pairs(tmp_path / "pairs.parquet")
    out = tmp_path / "gpm"
    cfg = PrefModelConfig(data=data, model=tiny_llama, output=str(out), objective="gpm", dim=4,
                          epochs=20, batch_size=8, progress=False)
    s1 = train(cfg)
    s2 = train(cfg)  # second run: features from the cache
    assert (s1["feature_cache"], s2["feature_cache"]) == ("miss", "hit")
    gpm = io.load_gpm(out)
    conv = [{"role": "user", "content": "Say something about apple 0."}]
    P = gpm.win_probs(conv, ["A long careful answer about apple.", "no 0", "no 1"]).numpy()
    np.testing.assert_allclose(P + P.T, np.ones((3, 3)), atol=1e-6)
    np.testing.assert_allclose(np.diag(P), 0.5, atol=1e-6)
    assert P[0, 1] > 0.5  # trained: the long answer wins on a training prompt

    # a head file that does not belong to the backbone: other hidden size
    meta = json.loads((out / "prefmodel.json").read_text())
    from safetensors.torch import save_file
    save_file({"value.weight": torch.zeros(4, 32), "gate.weight": torch.zeros(2, 32)}, str(out / io.HEAD_FILE))
    with pytest.raises(ValueError, match=r"gpm_head.safetensors.*'value.weight'.*hidden size 32.*64"):
        io.load_gpm(out)
    save_file({"value.weight": torch.zeros(3, 64)}, str(out / io.HEAD_FILE))
    with pytest.raises(ValueError, match=r"gpm_head.safetensors.*odd"):
        io.load_gpm(out)
    meta["backbone_identity"] = "0" * 16
    (out / "prefmodel.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"prefmodel.json.*'backbone_identity'"):
        io.load_gpm(out)


def test_full_training_kill_and_resume_gives_the_same_next_step_loss(tmp_path, make_pairs, tiny_llama):
    data = make_pairs(tmp_path / "pairs.parquet")

    def cfg(out):
        return PrefModelConfig(data=data, model=tiny_llama, output=str(out), objective="gpm", mode="full",
                               dim=4, max_steps=4, batch_size=4, lr=1e-3, save_every=1, progress=False)

    straight = []
    train(cfg(tmp_path / "a"), on_step=straight.append)
    killed = []
    train(cfg(tmp_path / "b"), stop_after=2, on_step=killed.append)
    resumed = []
    train(cfg(tmp_path / "b"), resume=True, on_step=resumed.append)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in killed] == [r["loss"] for r in straight[:2]]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[2:]]
    assert straight[0]["loss"] != straight[3]["loss"]
    # the final folder is a loadable GPM with the fine-tuned backbone inside
    assert json.loads((tmp_path / "b" / "prefmodel.json").read_text())["backbone"] == "."
    assert io.load_gpm(tmp_path / "b").head.dim == 4
    # resuming with other settings is refused, naming the setting
    other = cfg(tmp_path / "b")
    other.tau = 0.5
    with pytest.raises(ValueError, match="setting tau changed"):
        train(other, resume=True)


@pytest.mark.parametrize("problem,match", [
    ("no_rejected", r"pairs.parquet: missing column\(s\) \['rejected'\]"),
    ("empty_text", r"pairs.parquet, row 3: 'rejected' is empty"),
])
def test_bad_pair_tables_are_named(tmp_path, make_pairs, problem, match):
    path = tmp_path / "pairs.parquet"
    make_pairs(path)
    t = pq.read_table(path)
    if problem == "no_rejected":
        t = t.drop_columns(["rejected"])
    else:
        rej = t.column("rejected").to_pylist()
        rej[3] = [{"role": "assistant", "content": "  "}]
        t = t.set_column(t.schema.get_field_index("rejected"), "rejected", pa.array(rej))
    pq.write_table(t, path)
    with pytest.raises(DataError, match=match):
        train(PrefModelConfig(data=str(path), model="unused", output=str(tmp_path / "o"), objective="bt"))


def test_odd_dim_config_is_refused(tmp_path, make_pairs):
    with pytest.raises(ValueError, match="dim .*even.* got 5"):
        train(PrefModelConfig(data="x.parquet", output=str(tmp_path), objective="gpm", dim=5))


def test_read_pairs_respects_label_source_and_margin(tmp_path, make_pairs):
    from prefdata.prefmodel.data import read_pairs

    path = make_pairs(tmp_path / "pairs.parquet", extra={"label_source": ["ai", "human"] * 8,
                                                         "margin": [float(i) for i in range(16)]})
    p = read_pairs(path, margin_column="margin", label_source="human")
    assert len(p) == 8 and p.margin.tolist() == [float(i) for i in range(1, 16, 2)]
    assert p.label_source == ["human"] * 8
    # each distinct (prompt, response) is one item: 8 prompts x (2 chosen texts + 2 rejected) over both labels
    assert len(read_pairs(path).texts) == 8 * 4
    with pytest.raises(DataError, match=r"pairs.parquet: margin_column 'gap' is not a column"):
        read_pairs(path, margin_column="gap")
    with pytest.raises(DataError, match=r"no pair has label_source == 'robot'"):
        read_pairs(path, label_source="robot")
