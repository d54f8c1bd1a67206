"""noise: strength / flip_prob by hand, ε recovered from synthetic labels, weak-pair policies."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata.pipeline import Pipeline
from prefdata.step import MapStep, Source
from prefdata.steps.build import BuildPairs
from prefdata.steps.noise import Noise, apply_noise, NoiseConfig


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def pairs(members: dict[str, list[tuple]], extra: dict | None = None) -> pl.DataFrame:
    """members: name -> [(chosen, rejected), ...]; minimal pair columns around them."""
    n = len(next(iter(members.values())))
    cols = {
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt_id": [f"q{i}" for i in range(n)],
        "chosen": [[{"role": "assistant", "content": f"c{i}"}] for i in range(n)],
        "rejected": [[{"role": "assistant", "content": f"r{i}"}] for i in range(n)],
        "chosen_id": [f"c{i}" for i in range(n)],
        "rejected_id": [f"r{i}" for i in range(n)],
        "score_chosen": [1.0] * n,
        "score_rejected": [0.0] * n,
        "margin": [1.0] * n,
    }
    for name, values in members.items():
        cols[f"{name}_chosen"] = [v[0] for v in values]
        cols[f"{name}_rejected"] = [v[1] for v in values]
    cols.update(extra or {})
    return pl.DataFrame(cols)


def run(df: pl.DataFrame, **kw):
    out, meta = apply_noise(df.lazy(), NoiseConfig(**kw))
    return pl.from_arrow(out.table), out, meta


def test_strength_std_and_flip_prob_by_hand():
    df = pairs({
        "score_a": [(2.0, 1.0), (3.0, 1.0), (0.0, 1.0), (2.0, 1.0)],
        "score_b": [(1.0, 2.0), (3.0, 1.0), (0.0, 1.0), (None, 0.0)],
        "score_c": [(3.0, 0.0), (3.0, 1.0), (0.0, 1.0), (3.0, 0.0)],
    })
    got, _, _ = run(df)
    # pair 0: d = (1, -1, 3): mean 1, population std sqrt(8/3), P(D < 0) = Phi(-1 / sqrt(8/3))
    assert got["strength"].to_list() == pytest.approx([1.0, 2.0, -1.0, 2.0])
    assert got["strength_std"].to_list() == pytest.approx([math.sqrt(8 / 3), 0.0, 0.0, 1.0])
    assert got["flip_prob"].to_list() == pytest.approx(
        [phi(-1 / math.sqrt(8 / 3)), 0.0, 1.0, phi(-2.0)], abs=2e-7)
    # with enough members the share of disagreeing members is used (a tie counts half)
    df = pairs({"score_a": [(2.0, 1.0), (1.0, 1.0)], "score_b": [(1.0, 2.0), (2.0, 1.0)],
                "score_c": [(3.0, 0.0), (2.0, 1.0)]})
    got, _, _ = run(df, empirical_min_members=3)
    assert got["flip_prob"].to_list() == pytest.approx([1 / 3, 1 / 6])


def test_a_scorer_with_its_own_uncertainty():
    two = pairs({"score_rm": [(2.0, 0.0)], "score_rm_std": [(0.3, 0.4)], "score_j": [(0.0, 2.0)]})
    got, _, meta = run(two)
    assert meta["members"] == ["score_rm", "score_j"]  # the _std columns are not a member
    assert got["strength"][0] == pytest.approx(0.0)
    assert got["strength_std"][0] == pytest.approx(math.sqrt(4.0 + 0.25 / 2))  # between + mean own variance


def test_default_members_leave_out_the_label_score_and_score_original():
    # score_cdr chose the label (its values are score_chosen/score_rejected); score_original is the
    # imported human label. Neither can disagree with the label, so neither is a member.
    df = pairs({"score_cdr": [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)],
                "score_original": [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)],
                "score_a": [(0.0, 2.0), (2.0, 1.0), (3.0, 1.0)],
                "score_b": [(0.0, 1.0), (2.0, 0.0), (3.0, 0.5)]})
    got, _, meta = run(df)
    assert meta["members"] == ["score_a", "score_b"] and meta["label_columns"] == ["score_cdr", "score_original"]
    assert got["strength"].to_list() == pytest.approx([-1.5, 1.5, 2.25])


@pytest.mark.parametrize("members", [{}, {"score_rm": [(2.0, 1.0), (0.0, 1.0)]}])
def test_fewer_than_two_independent_members_is_an_error_naming_the_columns(members):
    df = pairs({"score_cdr": [(1.0, 0.0), (1.0, 0.0)], **members})
    with pytest.raises(ValueError) as err:
        run(df)
    text = str(err.value)
    assert f"found {len(members)}" in text and "'score_cdr'" in text   # what is there
    assert "Add a scorer step before build_pairs" in text               # how to fix it
    with pytest.raises(ValueError, match="at least two are needed"):
        run(df, members=["score_cdr"])


def lean(members: dict[str, tuple]) -> pl.DataFrame:
    """Only the columns the estimator reads, fast enough for hundreds of datasets; the score
    that chose the label is carried beside the members, as build_pairs carries it."""
    n = len(next(iter(members.values()))[0])
    cols = {"score_chosen": np.ones(n), "score_rejected": np.zeros(n),
            "score_label_chosen": np.ones(n), "score_label_rejected": np.zeros(n)}
    for name, (c, r) in members.items():
        cols[f"{name}_chosen"], cols[f"{name}_rejected"] = c, r
    return pl.DataFrame(cols)


def synthetic_members(eps, n, k, rng, noise=0.5):
    m = rng.exponential(1.0, n)
    sign = np.where(rng.random(n) < eps, -1.0, 1.0)
    return {f"score_m{j}": (sign * m + rng.normal(0.0, noise, n), np.zeros(n)) for j in range(k)}


@pytest.mark.parametrize("k,se", [(2, "pooled"), (3, "pooled"), (4, "per_pair")])
def test_two_standard_errors_cover_the_true_flip_rate_in_90_percent_of_datasets(k, se):
    rng = np.random.default_rng(42)
    hits, widths = 0, []
    for _ in range(200):
        _, meta = apply_noise(lean(synthetic_members(0.2, 300, k, rng)), NoiseConfig(se=se))
        hits += abs(meta["epsilon"] - 0.2) <= 2 * meta["epsilon_stderr"]
        widths.append(meta["epsilon_stderr"])
    assert hits >= 180, f"covered {hits}/200"
    assert np.median(widths) < 0.2          # and the error bar still says something


def test_the_error_bar_widens_with_fewer_members():
    rng = np.random.default_rng(3)
    members = synthetic_members(0.2, 2000, 8, rng)
    few = {k: v for k, v in list(members.items())[:2]}
    _, meta8 = apply_noise(lean(members), NoiseConfig(se="per_pair"))
    _, meta2 = apply_noise(lean(few), NoiseConfig(se="per_pair"))
    # with 2 members the per-pair noise estimate has 1 degree of freedom: a t(1) bound
    assert meta2["n_confident"] < meta8["n_confident"] / 4
    assert meta2["epsilon_stderr"] > 2 * meta8["epsilon_stderr"]
    # none confident: no estimate rather than 0 ± 0
    flat = lean({"score_a": (np.array([0.1, -0.1]), np.zeros(2)), "score_b": (np.array([-0.1, 0.1]), np.zeros(2))})
    _, meta = apply_noise(flat, NoiseConfig())
    assert meta["n_confident"] == 0 and meta["epsilon"] is None and meta["epsilon_stderr"] is None


def synthetic(eps: float, n: int = 20000, k: int = 3, noise: float = 0.5, seed: int = 0) -> pl.DataFrame:
    """The rDPO noise model: true margins m > 0, each label flipped with prob eps
    independently of m, members measure the labelled difference with N(0, noise^2) error."""
    rng = np.random.default_rng(seed)
    m = rng.exponential(1.0, n)
    sign = np.where(rng.random(n) < eps, -1.0, 1.0)
    base = rng.normal(size=n)
    members = {}
    for j in range(k):
        d = sign * m + rng.normal(0.0, noise, n)
        members[f"score_m{j}"] = list(zip(base + d, base))
    return pairs(members)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.35])
def test_flip_rate_is_recovered_within_two_points(eps):
    _, _, meta = run(synthetic(eps))
    assert meta["epsilon"] == pytest.approx(eps, abs=0.02)
    assert meta["n_confident"] > 5000 and meta["epsilon_stderr"] < 0.01
    # the naive estimate (mean flip_prob) counts member noise on small true margins as flips
    assert meta["mean_flip_prob"] - eps > 0.03


def test_flip_rate_with_per_pair_standard_errors():
    _, _, meta = run(synthetic(0.15, k=10, seed=1), se="per_pair")
    assert meta["epsilon"] == pytest.approx(0.15, abs=0.02) and meta["se"] == "per_pair"


def test_keep_and_carry_annotate_every_pair_and_record_the_loss_epsilon():
    df = synthetic(0.2, n=500)
    kept, out, meta = run(df)
    assert kept.height == 500 and out.quarantine is None
    assert {"strength", "strength_std", "flip_prob", "flipped"} <= set(kept.columns)
    assert meta["loss_epsilon"] == meta["epsilon"] and meta["policy"] == "keep"
    _, _, meta = run(df, policy="carry")
    assert meta["loss_epsilon"] == "flip_prob"


def test_drop_quarantines_weak_pairs_with_reasons():
    df = pairs({"score_a": [(2.0, 1.0), (1.0, 2.0), (1.2, 1.0), (None, 1.0)],
                "score_b": [(2.0, 1.0), (1.0, 2.0), (1.2, 1.0), (None, 1.0)]})
    kept, out, meta = run(df, policy="drop", min_strength=0.5)
    assert kept["pair_id"].to_list() == ["p0"]
    q = {r["pair_id"]: r["reason"] for r in out.quarantine.to_pylist()}
    assert q == {"p1": "weak pair: strength < 0.5", "p2": "weak pair: strength < 0.5", "p3": "no member scores"}
    assert out.counts["dropped_weak"] == 3 and meta["dropped_weak"] == 3
    kept, out, _ = run(df, policy="drop", max_flip_prob=0.5)
    assert kept["pair_id"].to_list() == ["p0", "p2"]


def test_flip_swaps_every_side_and_keeps_the_pair_id():
    df = pairs({"score_a": [(2.0, 1.0), (0.0, 3.0)], "score_b": [(2.0, 1.0), (1.0, 2.0)]},
               extra={"ches": [0.1, 0.2], "rationale": ["why", "why not"]})
    got, out, meta = run(df, policy="flip")
    ok, flipped = got.row(0, named=True), got.row(1, named=True)
    assert ok["flipped"] is False and ok["chosen_id"] == "c0" and ok["ches"] == 0.1
    assert flipped["flipped"] is True and flipped["pair_id"] == "p1"
    assert (flipped["chosen_id"], flipped["rejected_id"]) == ("r1", "c1")
    assert flipped["chosen"][0]["content"] == "r1" and flipped["rejected"][0]["content"] == "c1"
    assert (flipped["score_chosen"], flipped["score_rejected"], flipped["margin"]) == (0.0, 1.0, -1.0)
    assert (flipped["score_a_chosen"], flipped["score_a_rejected"]) == (3.0, 0.0)
    assert flipped["strength"] == pytest.approx(2.0) and flipped["flip_prob"] == pytest.approx(phi(-2.0), abs=1e-6)
    assert flipped["ches"] is None and flipped["rationale"] is None
    assert out.counts == {"flipped": 1} and meta["flipped"] == 1


def test_noise_after_build_pairs_and_as_a_step():
    responses = pa.table({
        "prompt_id": ["a", "a", "a"], "prompt": [[{"role": "user", "content": "q"}]] * 3,
        "response_id": ["a1", "a2", "a3"], "response": ["x", "y", "z"],
        "score_cdr": [3.0, 2.0, 1.0], "score_rm": [0.0, 1.0, 2.0], "score_judge": [5.0, 4.0, 1.0],
    })
    built = BuildPairs(strategy="all_pairs").process(responses).table
    step = Noise(members=["score_rm", "score_judge"], policy="flip")
    out = step.process(pl.from_arrow(built).lazy())
    got = {(r["chosen_id"], r["rejected_id"]): r for r in out.table.to_pylist()}
    # a1 vs a3: rm says -2, judge +4 -> strength 1; a1 vs a2: rm -1, judge +1 -> 0, not flipped
    assert got[("a1", "a3")]["strength"] == pytest.approx(1.0)
    assert got[("a1", "a2")]["flipped"] is False
    assert step.metadata["members"] == ["score_rm", "score_judge"] and "epsilon" in step.metadata
    with pytest.raises(ValueError, match="not in the pair table"):
        Noise(members=["score_missing", "score_rm"]).process(pl.from_arrow(built).lazy())


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="needs min_strength"):
        Noise(policy="drop")
    with pytest.raises(ValueError, match="policy must be one of"):
        Noise(policy="ignore")
    with pytest.raises(ValueError, match="only apply with policy 'drop'"):
        Noise(policy="keep", min_strength=0.1)
    with pytest.raises(ValueError, match="at least two ensemble members"):
        run(pairs({"margin_x": [(1.0, 0.0)]}))


class ReadPairs(Source):
    """A source that reads a pair parquet as it is (the test's own: no import step needed)."""

    name = "read_pairs"

    @dataclass
    class Config:
        path: str = ""

    def output_columns(self, columns):
        return pq.read_schema(self.config.path).names

    def read(self):
        return pq.read_table(self.config.path)


class Keep(MapStep):
    """A map step after noise: ε must still reach the output file."""

    name = "keep"
    Config = None

    def output_columns(self, columns):
        return columns + ["after"]

    def process(self, table):
        return table.append_column("after", pa.array([1] * table.num_rows))


def test_epsilon_travels_to_the_parquet_metadata_the_summary_and_the_card(tmp_path):
    df = lean(synthetic_members(0.2, 400, 3, np.random.default_rng(0)))
    ids = pl.int_range(pl.len()).cast(pl.String)
    df = df.with_columns(pair_id="p" + ids, prompt_id="q" + ids, chosen="c" + ids, rejected="r" + ids)
    src = tmp_path / "pairs.parquet"
    df.write_parquet(src)
    out = tmp_path / "out" / "pairs.parquet"
    pipe = Pipeline([ReadPairs(path=str(src)), Noise(), Keep()], workdir=tmp_path / "work", output=out,
                    shard_size=100, progress=False)
    pipe.run()
    meta = json.loads(pq.read_schema(out).metadata[b"prefdata_step:noise"])
    assert meta["epsilon"] == pytest.approx(0.2, abs=0.08) and 0 < meta["epsilon_stderr"] < 0.05
    assert meta["n_confident"] > 50 and meta["members"] == ["score_m0", "score_m1", "score_m2"]
    summary = json.loads((tmp_path / "out" / "pairs.summary.json").read_text())
    noted = [s["metadata"] for s in summary["steps"] if s["step"] == "noise"][0]
    assert noted["epsilon"] == meta["epsilon"] and noted["epsilon_stderr"] == meta["epsilon_stderr"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"ε = {meta['epsilon']:.4f} ± {meta['epsilon_stderr']:.4f}" in card
    assert f"from {meta['n_confident']} confident pairs" in card
