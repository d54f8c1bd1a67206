"""score_gpm on a real tiny-Llama GPM folder, and the intransitivity counts."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from prefdata.prefmodel import io
from prefdata.prefmodel.intransitivity import card_lines, cyclic_triples, from_verdicts, summary
from prefdata.prefmodel.train import PrefModelConfig, train
from prefdata.steps.gpm import Intransitivity, ScoreGPM



@pytest.fixture(scope="module")
def gpm_folder(tmp_path_factory, tiny_llama, make_pairs):
    tmp = tmp_path_factory.mktemp("gpm")
    data = make_pairs(tmp / "pairs.parquet")
    train(PrefModelConfig(data=data, model=tiny_llama, output=str(tmp / "gpm"), objective="gpm", dim=6,
                          epochs=10, batch_size=8, progress=False))
    return str(tmp / "gpm")


def responses_table():
    p1 = [{"role": "user", "content": "Say something about apple 0."}]
    p2 = [{"role": "user", "content": "Say something about river 1."}]
    texts = ["A long careful answer about apple.", "no 0", "maybe", "A long careful answer about river.", "no 1"]
    return pa.table({"prompt_id": ["a", "a", "a", "b", "b"], "prompt": [p1, p1, p1, p2, p2],
                     "response_id": [f"r{i}" for i in range(5)], "response": texts})


def test_score_gpm_columns_are_the_matrix_and_mean_win_prob(gpm_folder):
    step = ScoreGPM(model=gpm_folder, device="cpu")
    calls = []
    step.setup()
    real = step.loaded.lm.hidden_states
    step.loaded.lm.hidden_states = lambda c, r: calls.append(len(r)) or real(c, r)  # a spy: counts passes
    out = step.process(responses_table())
    t = out.table.to_pydict()
    assert calls == [5]  # one embedding per response: linear in N, not N² pairs
    P = np.array(t["gpm_win_probs"][0])
    assert t["gpm_opponents"][0] == ["r0", "r1", "r2"] and len(t["gpm_win_probs"][3]) == 2
    assert t["score_gpm"][0] == pytest.approx((P[1] + P[2]) / 2, rel=1e-9)
    rows = np.array(t["gpm_win_probs"][:3])
    np.testing.assert_allclose(rows + rows.T, 1.0, atol=1e-6)
    # the same numbers as the documented loader
    gpm = io.load_gpm(gpm_folder)
    want = gpm.win_probs(responses_table()["prompt"][0].as_py(), t["response"][:3]).numpy()
    np.testing.assert_allclose(rows, want, atol=1e-5)
    assert t["score_gpm"][3] == pytest.approx(t["gpm_win_probs"][3][1], rel=1e-9)
    assert out.counts["gpm_prompts"] == 2
    assert out.counts["gpm_cyclic_triples"] == t["gpm_cyclic_triples"][0] + 0 * t["gpm_cyclic_triples"][3]


def test_score_gpm_refuses_a_folder_that_is_not_a_gpm(tmp_path):
    with pytest.raises(ValueError, match="score_gpm: 'model' must be a GPM folder"):
        ScoreGPM(model=str(tmp_path), device="cpu").check()


def test_cyclic_triples_counts():
    cycle = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], bool)
    chain = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], bool)
    assert cyclic_triples(cycle) == 1 and cyclic_triples(chain) == 0
    # regular tournament on 5 nodes (i beats i+1, i+2): C(5,3) - 5*C(2,2) = 5 cycles
    B = np.zeros((5, 5), bool)
    for i in range(5):
        B[i, (i + 1) % 5] = B[i, (i + 2) % 5] = True
    assert cyclic_triples(B) == 5


def test_from_verdicts_counts_only_agreed_orders():
    pairs = pl.DataFrame({
        "prompt_id": ["p", "p", "p", "q", "q", "q"],
        "chosen_id": ["a", "b", "c", "x", "y", "z"],
        "rejected_id": ["b", "c", "a", "y", "z", "x"],
        "judge_verdict": ["chosen", "chosen", "chosen", "chosen", "chosen", "tie"],
    })
    per = from_verdicts(pairs, "judge_verdict")
    assert dict(zip(per["prompt_id"], per["cyclic_triples"])) == {"p": 1, "q": 0}
    s = summary(per, "judge")
    assert s == {"judge_prompts": 2, "judge_prompts_with_cycle": 1, "judge_cyclic_triples": 1}
    step = Intransitivity(verdict="judge_verdict")
    out = step.process(pairs.lazy())
    assert out.table.column("cyclic_triples").to_pylist() == [1, 1, 1, 0, 0, 0]
    assert out.counts["judge_prompts_with_cycle"] == 1
    line = card_lines({"steps": [{"step": "intransitivity", "counts": s}]})[0]
    assert "1 of 2 prompts (50.0%)" in line
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['nope'\]"):
        from_verdicts(pairs, "nope")


def test_dataset_card_reports_intransitivity(tmp_path):
    from prefdata.cards import write_card

    data = tmp_path / "pairs.parquet"
    pl.DataFrame({"prompt_id": ["p"], "chosen": [[{"role": "assistant", "content": "a"}]],
                  "rejected": [[{"role": "assistant", "content": "b"}]]}).write_parquet(data)
    summary = {"steps": [{"step": "score_gpm", "label": "score_gpm", "kind": "map", "rows_in": 9, "rows_out": 9,
                          "fingerprint": "abc", "seconds": 1.0, "shards": 1, "shards_cached": 0,
                          "counts": {"gpm_prompts": 4, "gpm_prompts_with_cycle": 1, "gpm_cyclic_triples": 2}}]}
    text = write_card(tmp_path, [data], summary).read_text()
    assert "Intransitivity (`gpm`, step `score_gpm`): 1 of 4 prompts (25.0%) have at least one cyclic triple" in text
    assert "2 cyclic triples in all" in text
