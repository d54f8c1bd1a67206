"""score_ensemble on literal tables, against numpy."""

import numpy as np
import polars as pl
import pytest

from prefdata.steps.ensemble import Ensemble

TABLE = {
    "prompt_id": ["a", "a", "a", "b", "b"],
    "score_rm": [1.0, 2.0, 3.0, 10.0, 14.0],
    "score_cdr": [-5.0, 0.0, 5.0, 1.0, -1.0],
    "score_judge": [4.0, None, 5.0, 2.0, float("nan")],
}


def run(table=TABLE, **kw):
    out = Ensemble(**dict(dict(members=["score_rm", "score_cdr", "score_judge"]), **kw)).process(pl.DataFrame(table).lazy())
    return out.table.to_pydict(), out.counts


def z(values, groups=None):
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    out = np.full_like(x, np.nan)
    for g in set(groups or [0] * len(x)):
        idx = np.array([k for k in range(len(x)) if (groups or [0] * len(x))[k] == g])
        sel = idx[~np.isnan(x[idx])]
        sd = x[sel].std() or 1.0
        out[sel] = (x[sel] - x[sel].mean()) / sd
    return out


def test_global_standardisation_mean_and_population_std():
    got, counts = run()
    zs = np.stack([z(TABLE[m]) for m in ("score_rm", "score_cdr", "score_judge")])
    mean = np.nanmean(zs, axis=0)
    std = np.sqrt(np.nanmean((zs - mean) ** 2, axis=0))  # population std (ddof 0)
    np.testing.assert_allclose(got["score_ensemble"], mean, atol=1e-12)
    np.testing.assert_allclose(got["score_ensemble_std"], std, atol=1e-12)
    assert got["ensemble_members"] == [3, 2, 3, 3, 2]  # a null and a NaN are skipped
    assert counts == {"ensemble_rows": 5, "ensemble_null": 0}


def test_prompt_scope_and_no_standardisation():
    groups = TABLE["prompt_id"]
    got, _ = run(standardize="prompt", members=["score_rm", "score_cdr"], name="e")
    zs = np.stack([z(TABLE["score_rm"], groups), z(TABLE["score_cdr"], groups)])
    np.testing.assert_allclose(got["score_e"], zs.mean(0), atol=1e-12)
    np.testing.assert_allclose(got["score_e_std"], zs.std(0), atol=1e-12)
    raw, _ = run(standardize="none", members=["score_rm", "score_cdr"])
    assert raw["score_ensemble"] == [-2.0, 1.0, 4.0, 5.5, 6.5]
    assert raw["score_ensemble_std"] == [3.0, 1.0, 1.0, 4.5, 7.5]


def test_min_members_and_member_std():
    got, counts = run(min_members=3)
    assert got["score_ensemble"][1] is None and got["score_ensemble_std"][4] is None
    assert counts["ensemble_null"] == 2
    table = {"score_a": [0.0, 2.0], "score_b": [1.0, 1.0], "score_a_std": [0.5, 0.5], "score_b_std": [0.0, 1.0]}
    got, _ = Ensemble(members=["score_a", "score_b"], standardize="none", member_std=True).process(
        pl.DataFrame(table).lazy()).table.to_pydict(), None
    between = np.array([0.25, 0.25])  # Var of (0, 1) and (2, 1)
    own = np.array([(0.25 + 0.0) / 2, (0.25 + 1.0) / 2])
    np.testing.assert_allclose(got["score_ensemble_std"], np.sqrt(between + own))


def test_output_replaces_stale_columns_and_bad_configs():
    once = Ensemble(members=["score_rm", "score_cdr"]).process(pl.DataFrame(TABLE).lazy()).table
    again = Ensemble(members=["score_rm", "score_cdr"]).process(pl.from_arrow(once).lazy()).table
    assert again.column_names == once.column_names
    for col in ("score_ensemble", "score_ensemble_std", "ensemble_members"):
        assert again.column(col).to_pylist() == once.column(col).to_pylist()
    with pytest.raises(ValueError, match="at least two member columns"):
        Ensemble(members=["score_rm"])
    with pytest.raises(ValueError, match="standardize must be one of"):
        Ensemble(members=["score_rm", "score_cdr"], standardize="rank")
    with pytest.raises(ValueError, match=r"column\(s\) \['score_x'\] are not in the table"):
        run(members=["score_rm", "score_x"])
