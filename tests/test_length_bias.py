"""The length-bias report on literal pair tables, against numpy."""

import numpy as np
import polars as pl
import pytest

from prefdata.length_bias import length_bias, length_bias_lines
from prefdata.steps.length_report import LengthBias

CHOSEN = ["a long answer here", "short", "same!", "xx"]
REJECTED = ["tiny", "much longer answer", "same?", "y"]
MARGIN = [2.0, 0.5, 1.0, 3.0]


def pairs(conversational=True):
    wrap = (lambda t: [{"role": "assistant", "content": t}]) if conversational else (lambda t: t)
    return pl.DataFrame({"chosen": [wrap(t) for t in CHOSEN], "rejected": [wrap(t) for t in REJECTED],
                         "margin": MARGIN})


@pytest.mark.parametrize("conversational", [True, False])
def test_report_matches_numpy(conversational):
    got = length_bias(pairs(conversational))
    diff = np.array([len(c) - len(r) for c, r in zip(CHOSEN, REJECTED)], float)
    assert got["length_pairs"] == 4
    assert got["chosen_longer_share"] == pytest.approx(np.mean(diff > 0))  # 2 of 4
    assert got["same_length_share"] == pytest.approx(0.25)
    assert got["length_diff_mean"] == pytest.approx(diff.mean())
    assert got["length_margin_corr"] == pytest.approx(np.corrcoef(diff, MARGIN)[0, 1])


def test_card_lines_step_metadata_and_non_pair_tables():
    lines = length_bias_lines(pairs().lazy(), ["chosen", "rejected", "margin"])
    assert lines[0].startswith("- Length bias: the chosen response is longer in 50.0% of 4 pairs")
    assert "correlation of the length difference with the margin: +0." in lines[0]
    assert length_bias_lines(pairs().lazy(), ["prompt", "response"]) == []
    step = LengthBias()
    out = step.process(pairs().lazy())
    assert out.table.num_rows == 4 and out.table.column_names == ["chosen", "rejected", "margin"]
    assert step.metadata == length_bias(pairs())
    no_margin = length_bias(pairs().drop("margin"))
    assert no_margin["length_margin_corr"] is None and no_margin["length_pairs"] == 4
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected'"):
        length_bias(pl.DataFrame({"response": ["a"]}))


def test_card_has_the_length_bias_report_and_the_cdr_choices(tmp_path):
    from prefdata.cards import write_card

    data = tmp_path / "pairs.parquet"
    pairs().write_parquet(data)
    steps = [{"step": "score_cdr", "config": {"strong": "m", "weak": "w", "exemplar_placement": "user",
                                              "truncate": "keep_start"},
              "fingerprint": "0" * 16, "rows_in": 4, "rows_out": 4, "seconds": 0.0, "kind": "map"}]
    text = write_card(tmp_path, [data], {"steps": steps, "info": {}}).read_text()
    assert "- Length bias: the chosen response is longer in 50.0% of 4 pairs" in text
    assert ("`score_cdr`: exemplars in the last user turn; criteria are put before a prompt's own system message; "
            "prompts cut to their last 1024 and responses to their first 1024 tokens") in text
