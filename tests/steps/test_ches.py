"""CHES / LN-CHES against a direct computation on a tiny real Llama; the quantile filter."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prefdata.models import clear_cache, load_model
from prefdata.models.hub import SMOLLM2, resolve
from prefdata.steps.ches import CHESFilter, ScoreCHES, ches_filter, ches_from_sums, CHESFilterConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(resolve(SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-ches")
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    yield str(path)
    clear_cache()


def pair_table(rows):
    """rows: (pair_id, prompt text, chosen id, chosen text, rejected id, rejected text)"""
    return pa.table({
        "pair_id": [r[0] for r in rows],
        "prompt_id": [r[1] for r in rows],
        "prompt": [[{"role": "user", "content": r[1]}] for r in rows],
        "chosen": [[{"role": "assistant", "content": r[3]}] for r in rows],
        "rejected": [[{"role": "assistant", "content": r[5]}] for r in rows],
        "chosen_id": [r[2] for r in rows],
        "rejected_id": [r[4] for r in rows],
    })


def direct_sum(model, tok, prompt: str, response: str) -> tuple[np.ndarray, int]:
    """Sum of last-layer hidden states from the last prompt token to the second-to-last
    response token (response = text + eos), one unpadded sequence, written out by hand."""
    p = list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"])
    a = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with torch.no_grad():
        hidden = model(torch.tensor([p + a]), output_hidden_states=True).hidden_states[-1][0].double()
    return hidden[len(p) - 1: len(p) + len(a) - 1].sum(0).numpy(), len(a)


def test_ches_and_ln_ches_equal_a_direct_computation(tiny):
    rows = [
        ("p1", "Name a fruit.", "c1", "An apple is a fruit.", "r1", "Carrots are vegetables, not fruit."),
        ("p2", "Name a fruit.", "c1", "An apple is a fruit.", "r2", "Banana."),  # c1 shared with p1
        ("p3", "What is 2 + 2?", "c3", "4", "r3", "4"),  # identical texts
    ]
    step = ScoreCHES(model=tiny, device="cpu", dtype="float32", batch_size=2)
    step.setup()
    out = step.process(pair_table(rows))
    lm = load_model(tiny, backend="transformers", device="cpu", dtype="float32")
    for got, (_, prompt, _, chosen, _, rejected) in zip(out.to_pylist(), rows):
        hp, tp = direct_sum(lm.model, lm.tokenizer, prompt, chosen)
        hn, tn = direct_sum(lm.model, lm.tokenizer, prompt, rejected)
        ches = hp @ hn - hp @ hp
        ln = (hp / tp) @ (hn / tn) - (hp / tp) @ (hp / tp)
        assert got["ches"] == pytest.approx(ches, rel=1e-4, abs=1e-3)
        assert got["ln_ches"] == pytest.approx(ln, rel=1e-4, abs=1e-5)
    assert out.column("ches")[2].as_py() == pytest.approx(0.0, abs=1e-6)  # same text: H+ = H-
    assert out.column("ches")[0].as_py() < 0  # different texts: <H+,H-> < ||H+||^2 here
    step.teardown()


def test_ches_from_sums_by_hand():
    ches, ln = ches_from_sums(np.array([[1.0, 2.0]]), np.array([[3.0, 0.0]]), np.array([2.0]), np.array([1.0]))
    assert ches[0] == pytest.approx(3.0 - 5.0)
    assert ln[0] == pytest.approx(0.5 * 3.0 - (0.25 + 1.0))


def scored(values):
    return pl.DataFrame({"pair_id": [f"p{i}" for i in range(len(values))], "prompt_id": ["q"] * len(values),
                         "ches": values, "ln_ches": [0.0] * len(values)})


def test_quantile_filter_removes_exactly_the_rows_above_the_quantile():
    values = [7.0, 1.0, 10.0, 4.0, 9.0, 2.0, 5.0, 3.0, 8.0, 6.0]
    out = ches_filter(scored(values), CHESFilterConfig(quantile=0.8))
    threshold = float(np.quantile(values, 0.8))  # 8.2 with linear interpolation
    assert out["metadata"]["threshold"] == pytest.approx(threshold)
    assert out["table"]["pair_id"].to_pylist() == [f"p{i}" for i, v in enumerate(values) if v <= threshold]
    assert sorted(out["quarantine"]["pair_id"].to_pylist()) == ["p2", "p4"]  # 10 and 9
    assert out["counts"] == {"dropped_high_ches": 2, "dropped_no_ches": 0}
    assert "above its 0.8-quantile" in out["quarantine"]["reason"][0].as_py()


def test_keep_lowest_with_ties_and_missing_values():
    values = [5.0, 1.0, 3.0, 3.0, None, 2.0, float("nan")]
    step = CHESFilter(keep_lowest=3)
    out = step.process(scored(values).lazy())
    assert out.table["pair_id"].to_pylist() == ["p1", "p2", "p5"]  # 1, 2 and the first 3 by pair_id
    reasons = {r["pair_id"]: r["reason"] for r in out.quarantine.to_pylist()}
    assert reasons["p4"] == "no ches" and reasons["p6"] == "no ches"
    assert reasons["p0"].startswith("ches not among the 3 lowest") and "p3" in reasons
    assert out.counts == {"dropped_high_ches": 2, "dropped_no_ches": 2}
    assert step.metadata["kept"] == 3 and step.metadata["threshold"] == 3.0


def test_filter_on_ln_ches_and_config_errors():
    df = scored([1.0, 2.0]).with_columns(ln_ches=pl.Series([5.0, -1.0]))
    out = ches_filter(df, CHESFilterConfig(column="ln_ches", keep_lowest=1))
    assert out["table"]["pair_id"].to_pylist() == ["p1"]
    with pytest.raises(ValueError, match="exactly one"):
        CHESFilter(quantile=0.9, keep_lowest=3)
    with pytest.raises(ValueError, match="exactly one"):
        CHESFilter()
    with pytest.raises(ValueError, match="column must be one of"):
        CHESFilter(column="margin", quantile=0.5)
