"""score_rm against direct forward passes of tiny sequence-classification Llamas; MC dropout."""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, LlamaForSequenceClassification

from prefdata.models import clear_cache, load_reward_model
from prefdata.steps.reward import ScoreRM

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name three rivers in Europe and say which is longest."}],
]
ROWS = [(0, "Paris."), (0, "It is Paris, on the Seine, which has been the capital for centuries."),
        (1, "The Volga."), (1, "Danube, Rhine, Volga; the Volga is longest."), (1, "")]


@pytest.fixture(scope="module")
def rms(tiny_llama_factory):
    rm = functools.partial(tiny_llama_factory, head="sequence_classification")  # tests/conftest.py
    plain, other, dropout = rm(0), rm(1), rm(2, attention_dropout=0.3)
    yield plain, other, dropout
    clear_cache()


def _table():
    return pa.table({"prompt": [PROMPTS[p] for p, _ in ROWS], "response": [r for _, r in ROWS]})


@functools.cache
def _direct(path):
    """One unpadded forward per row through the stock model class: logits[0, 0]."""
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p, r in ROWS:
        text = tok.apply_chat_template(PROMPTS[p] + [{"role": "assistant", "content": r}], tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(float(model(ids).logits[0, 0]))
    return np.array(out)


def _step(**kw):
    return ScoreRM(**dict(dict(device="cpu", dtype="float32", batch_size=2), **kw))


def test_scores_equal_a_direct_forward_pass(rms):
    plain, _, _ = rms
    step = _step(model=plain)
    out = step.process(_table())
    assert out.column_names == ["prompt", "response", "score_rm"]
    np.testing.assert_allclose(out.column("score_rm").to_numpy(), _direct(plain), atol=1e-4)
    # batching (and so padding) does not change a score
    wide = _step(model=plain, batch_size=16).process(_table())
    np.testing.assert_allclose(wide.column("score_rm").to_numpy(), out.column("score_rm").to_numpy(), atol=1e-5)


def test_several_reward_models_in_one_step(rms):
    plain, other, _ = rms
    step = _step(model=[plain, other], name=["a", "b"])
    assert step.output_columns(["prompt", "response"]) == ["prompt", "response", "score_a", "score_b"]
    out = step.process(_table())
    np.testing.assert_allclose(out.column("score_a").to_numpy(), _direct(plain), atol=1e-4)
    np.testing.assert_allclose(out.column("score_b").to_numpy(), _direct(other), atol=1e-4)


def test_mc_dropout_std_positive_with_dropout_and_zero_without(rms):
    plain, _, dropout = rms
    noisy = _step(model=dropout, mc_dropout=8, seed=3).process(_table())
    std = noisy.column("score_rm_std").to_numpy()
    assert (std > 0).all()
    # the mean of stochastic passes stays near the deterministic score
    exact = _direct(dropout)
    assert np.abs(noisy.column("score_rm").to_numpy() - exact).max() < 5 * std.max() + 1e-3
    # recomputing the shard reproduces it exactly; another seed does not
    again = _step(model=dropout, mc_dropout=8, seed=3).process(_table())
    assert again.equals(noisy)
    other = _step(model=dropout, mc_dropout=8, seed=4).process(_table())
    assert not np.allclose(other.column("score_rm").to_numpy(), noisy.column("score_rm").to_numpy())

    calm = _step(model=plain, mc_dropout=4).process(_table())
    assert (calm.column("score_rm_std").to_numpy() == 0).all()
    np.testing.assert_allclose(calm.column("score_rm").to_numpy(), _direct(plain), atol=1e-4)
    # a dropout override makes the same model stochastic, then the rates are restored
    forced = _step(model=plain, mc_dropout=4, dropout=0.2).process(_table())
    assert (forced.column("score_rm_std").to_numpy() > 0).all()
    rm = load_reward_model(plain, device="cpu", dtype="float32")
    assert rm.dropout_rate() == 0.0 and not rm.model.training


def test_empty_shard_and_bad_configs(rms):
    plain, _, _ = rms
    out = _step(model=plain, mc_dropout=2).process(_table().slice(0, 0))
    assert out.column_names == ["prompt", "response", "score_rm", "score_rm_std"] and out.num_rows == 0
    with pytest.raises(ValueError, match="'model' must name a reward model"):
        ScoreRM()
    with pytest.raises(ValueError, match="give 'name' as a list of 2"):
        ScoreRM(model=["a", "b"])
    with pytest.raises(ValueError, match="mc_dropout is the number"):
        ScoreRM(model="a", mc_dropout=1)
    with pytest.raises(ValueError, match="dropout only applies"):
        ScoreRM(model="a", dropout=0.1)
    with pytest.raises(ValueError, match="label 3 does not exist"):
        _step(model=plain, label=3).process(_table())


# -- MC dropout seeded per row: shard size, batch size, --limit ------------------------------
def _mc_run(data, workdir, sampler, rm, limit, shard_size, batch_size):
    import polars as pl

    from prefdata.executors import LocalExecutor
    from prefdata.pipeline import Pipeline
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.sample import Sample

    steps = [LoadPrompts(path=str(data), limit=limit),
             Sample(model=sampler, n=2, max_new_tokens=4, backend="transformers", device="cpu", dtype="float32"),
             _step(model=rm, mc_dropout=3, seed=7, batch_size=batch_size)]
    pipe = Pipeline(steps, workdir=workdir, shard_size=shard_size, progress=False, card=False,
                    executor=LocalExecutor(in_process=True))
    return pl.from_arrow(pipe.run()), pipe.stats[2].counts


def test_mc_dropout_rows_do_not_depend_on_shards_or_batches_and_a_larger_limit_reuses_them(
        rms, tiny_llama, tmp_path):
    import json

    dropout = rms[2]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me about {k}."}) + "\n" for k in range(6)))
    fresh, counts = _mc_run(data, tmp_path / "a", tiny_llama, dropout, 6, shard_size=5, batch_size=8)
    assert counts["prompts_computed"] == 6 and (fresh["score_rm_std"] > 0).all()
    other, _ = _mc_run(data, tmp_path / "b", tiny_llama, dropout, 6, shard_size=2, batch_size=1)
    assert other.equals(fresh)  # the same masks per row: equal to the last bit
    _, counts = _mc_run(data, tmp_path / "c", tiny_llama, dropout, 3, shard_size=2, batch_size=8)
    assert counts["prompts_computed"] == 3
    grown, counts = _mc_run(data, tmp_path / "c", tiny_llama, dropout, 6, shard_size=2, batch_size=8)
    assert counts["prompts_computed"] == 3 and counts["prompts_reused"] == 3  # only the new prompts scored
    assert grown.equals(fresh)


def test_a_rows_mc_passes_do_not_depend_on_the_other_rows(rms):
    dropout = rms[2]
    table = _table().append_column("prompt_id", pa.array(["p0", "p0", "p1", "p1", "p1"])).append_column(
        "response_id", pa.array([f"r{k}" for k in range(5)]))
    whole = _step(model=dropout, mc_dropout=4, batch_size=3).process(table)
    alone = _step(model=dropout, mc_dropout=4, batch_size=1).process(table.take([3, 1]))
    assert alone.column("score_rm").to_pylist() == whole.take([3, 1]).column("score_rm").to_pylist()
    assert alone.column("score_rm_std").to_pylist() == whole.take([3, 1]).column("score_rm_std").to_pylist()
    # the row's ids name it: another id, other masks
    renamed = table.set_column(table.schema.get_field_index("response_id"), "response_id",
                               pa.array([f"s{k}" for k in range(5)]))
    again = _step(model=dropout, mc_dropout=4, batch_size=3).process(renamed)
    assert not np.allclose(again.column("score_rm").to_numpy(), whole.column("score_rm").to_numpy())
