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


# -- Wang et al. 2024: u = log σ(r − r_ref(x)), combined by sum ---------------------------------
def _logsigmoid(d):
    return -np.log1p(np.exp(-d))


def test_logsigmoid_centered_on_prompt_quantile_is_the_papers_formula():
    got, _ = run(members=["score_rm", "score_cdr"], standardize="none", transform="logsigmoid_centered",
                 reference="quantile:0.85", combine="sum", name="t")
    expected = np.zeros(5)
    for m in ("score_rm", "score_cdr"):
        r = np.array(TABLE[m])
        ref = np.array([np.quantile(r[[k for k in range(5) if TABLE["prompt_id"][k] == p]], 0.85)
                        for p in TABLE["prompt_id"]])  # the prompt's own responses, linear interpolation
        expected += _logsigmoid(r - ref)
    np.testing.assert_allclose(got["score_t"], expected, atol=1e-12)
    assert max(got["score_t"]) < 0  # log σ(.) < 0: a sum of log-probabilities of "good enough"


def test_logsigmoid_centered_on_reference_columns_standardised_like_the_member():
    table = dict(TABLE, ref_rm=[2.0, 2.0, 2.0, 12.0, 12.0], ref_cdr=[0.0, 0.0, 0.0, 5.0, 5.0])
    ref = {"score_rm": "ref_rm", "score_cdr": "ref_cdr"}
    raw, _ = run(table, members=["score_rm", "score_cdr"], standardize="none", transform="logsigmoid_centered",
                 reference=ref, combine="sum")
    expected = sum(_logsigmoid(np.array(TABLE[m]) - np.array(table[c])) for m, c in ref.items())
    np.testing.assert_allclose(raw["score_ensemble"], expected, atol=1e-12)
    glob, _ = run(table, members=["score_rm", "score_cdr"], transform="logsigmoid_centered", reference=ref,
                  combine="mean")
    parts = []
    for m, c in ref.items():
        x, r = np.array(TABLE[m]), np.array(table[c])
        parts.append(_logsigmoid((x - x.mean()) / x.std() - (r - x.mean()) / x.std()))
    np.testing.assert_allclose(glob["score_ensemble"], np.mean(parts, axis=0), atol=1e-12)
    # far beyond the reference the transform saturates at 0; far below it stays finite and linear
    big, _ = run({"prompt_id": ["a", "a"], "score_a": [1e4, -1e4], "score_b": [0.0, 0.0], "r": [0.0, 0.0],
                  "s": [0.0, 0.0]}, members=["score_a", "score_b"], standardize="none",
                 transform="logsigmoid_centered", reference={"score_a": "r", "score_b": "s"}, combine="sum")
    np.testing.assert_allclose(big["score_ensemble"], [_logsigmoid(0.0), -1e4 + _logsigmoid(0.0)], rtol=1e-12)


# -- λ-Harmonic: H = 1 / (λ/a + (1 − λ)/b) -------------------------------------------------------
POSITIVE = {"prompt_id": ["a", "a", "b", "b"], "score_h": [0.2, 0.9, 0.5, 1.0], "score_s": [0.8, 0.1, 0.5, 0.25],
            "score_t": [0.3, 0.6, 0.9, 0.4]}


def test_lambda_harmonic_is_the_weighted_harmonic_mean():
    lam = 0.3
    got, _ = run(POSITIVE, members=["score_h", "score_s"], standardize="none", combine="harmonic",
                 harmonic_lambda=lam, name="hm")
    a, b = np.array(POSITIVE["score_h"]), np.array(POSITIVE["score_s"])
    np.testing.assert_allclose(got["score_hm"], 1.0 / (lam / a + (1 - lam) / b), rtol=1e-12)
    w = [0.5, 0.2, 0.3]
    three, _ = run(POSITIVE, members=["score_h", "score_s", "score_t"], standardize="none", combine="harmonic",
                   weights=w)
    v = np.stack([POSITIVE[m] for m in ("score_h", "score_s", "score_t")])
    np.testing.assert_allclose(three["score_ensemble"], 1.0 / (np.array(w)[:, None] / v).sum(0), rtol=1e-12)
    # harmonic <= arithmetic: a response poor on one aspect cannot buy it back on another
    assert all(h <= (lam * x + (1 - lam) * y) + 1e-12 for h, x, y in zip(got["score_hm"], a, b))


def test_lambda_harmonic_with_cosine_rescale_is_the_rpo_reference_reward():
    """github.com/andrew-miao/RPO evaluation_metrics.py: cosine similarities s mapped by (s + 1)/2,
    then 1 / (λ / image_sim + (1 − λ) / text_sim), λ on the first (image-similarity) member."""
    cos = {"prompt_id": ["a", "a", "b"], "score_img": [0.62, -0.1, 1.0], "score_txt": [0.31, 0.28, -1.0]}
    lam = 0.3  # the reference's default reward_lambda
    got, _ = run(cos, members=["score_img", "score_txt"], standardize="none", combine="harmonic",
                 rescale="cosine", harmonic_lambda=lam)
    a, b = ((np.array(cos[m]) + 1) / 2 for m in ("score_img", "score_txt"))
    with np.errstate(divide="ignore"):
        expected = np.nan_to_num(1.0 / (lam / a + (1 - lam) / b), nan=0.0)
    np.testing.assert_allclose(got["score_ensemble"][:2], expected[:2], rtol=1e-12)
    assert got["score_ensemble"][:2] == pytest.approx([1 / (0.3 / 0.81 + 0.7 / 0.655), 1 / (0.3 / 0.45 + 0.7 / 0.64)])
    assert got["score_ensemble"][2] == 0.0  # a text similarity of -1 maps to 0: H = 0 (the limit)
    with pytest.raises(ValueError, match=r"score_ensemble: rescale cosine needs scores in \[-1, 1\].*"
                                         r"score_rm: 4 value\(s\), first at row 1"):
        run(members=["score_rm", "score_cdr"], standardize="none", combine="harmonic", rescale="cosine",
            harmonic_lambda=0.5)
    with pytest.raises(ValueError, match="rescale cosine .* needs standardize: none"):
        Ensemble(members=["score_a", "score_b"], combine="harmonic", rescale="cosine", harmonic_lambda=0.5)


def test_harmonic_rescaling_minmax_and_sigmoid():
    got, _ = run(members=["score_rm", "score_cdr"], standardize="prompt", combine="harmonic", rescale="minmax",
                 harmonic_lambda=0.5)
    def minmax(values):
        x, out = np.array(values), np.zeros(5)
        for p in ("a", "b"):
            idx = [k for k in range(5) if TABLE["prompt_id"][k] == p]
            out[idx] = (x[idx] - x[idx].min()) / (x[idx].max() - x[idx].min())
        return out
    a, b = minmax(TABLE["score_rm"]), minmax(TABLE["score_cdr"])
    with np.errstate(divide="ignore"):
        expected = np.nan_to_num(1.0 / (0.5 / a + 0.5 / b), nan=0.0)  # a member at 0 gives 0 (the limit)
    np.testing.assert_allclose(got["score_ensemble"], expected, atol=1e-12)
    assert got["score_ensemble"][0] == 0.0
    sig, _ = run(members=["score_rm", "score_cdr"], combine="harmonic", rescale="sigmoid", harmonic_lambda=0.25)
    za, zb = 1 / (1 + np.exp(-z(TABLE["score_rm"]))), 1 / (1 + np.exp(-z(TABLE["score_cdr"])))
    np.testing.assert_allclose(sig["score_ensemble"], 1.0 / (0.25 / za + 0.75 / zb), rtol=1e-12)


def test_bad_harmonic_and_transform_options_name_step_and_option():
    for lam in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"score_ensemble: .*'harmonic_lambda' must be in \(0, 1\)"):
            Ensemble(members=["score_a", "score_b"], combine="harmonic", rescale="sigmoid", harmonic_lambda=lam)
    with pytest.raises(ValueError, match=r"'weights' must each be in \(0, 1\) and sum to 1"):
        Ensemble(members=["score_a", "score_b"], combine="harmonic", rescale="sigmoid", weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="rescale none needs standardize none"):
        Ensemble(members=["score_a", "score_b"], combine="harmonic")
    with pytest.raises(ValueError, match=r"score_ensemble: combine harmonic with rescale none needs scores > 0, "
                                         r"but score_cdr: 3 value\(s\), first at row 0"):
        run(members=["score_rm", "score_cdr"], standardize="none", combine="harmonic")
    with pytest.raises(ValueError, match="needs option 'reference'"):
        Ensemble(members=["score_a", "score_b"], transform="logsigmoid_centered")
    with pytest.raises(ValueError, match="one column .* cannot be the reference of every member"):
        Ensemble(members=["score_a", "score_b"], transform="logsigmoid_centered", reference="ref")
    with pytest.raises(ValueError, match=r"'quantile:1.5' is not 'quantile:<q>' with q in \[0, 1\]"):
        Ensemble(members=["score_a", "score_b"], transform="logsigmoid_centered", reference="quantile:1.5")
    with pytest.raises(ValueError, match=r"column\(s\) \['ref_rm'\] are not in the table.*option 'reference'"):
        run(members=["score_rm", "score_cdr"], transform="logsigmoid_centered",
            reference={"score_rm": "ref_rm", "score_cdr": "quantile:0.5"})
    with pytest.raises(ValueError, match="only apply to combine: harmonic"):
        Ensemble(members=["score_a", "score_b"], harmonic_lambda=0.5)


def test_prompt_quantile_reference_after_global_standardisation():
    # the quantile is taken of the globally standardised values, not re-standardised per prompt
    got, _ = run(members=["score_rm", "score_cdr"], transform="logsigmoid_centered", reference="quantile:0.85",
                 combine="sum", name="t")
    expected = np.zeros(5)
    groups = np.array(TABLE["prompt_id"])
    for m in ("score_rm", "score_cdr"):
        zm = z(TABLE[m])
        ref = np.array([np.quantile(zm[groups == p], 0.85) for p in groups])
        expected += _logsigmoid(zm - ref)
    np.testing.assert_allclose(got["score_t"], expected, atol=1e-12)
