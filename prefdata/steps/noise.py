"""How trustworthy each comparison is: preference strength, flip probability, flip rate ε.

Wang et al. 2024, "Secrets of RLHF in Large Language Models Part II: Reward Modeling":
with an ensemble of scorers, a pair's preference strength is the mean over members of
score(chosen) − score(rejected); its spread says how sure the ensemble is, and pairs with
negative strength are likely mislabelled. Chowdhury et al. 2024, "Provably Robust DPO:
Aligning Language Models with Noisy Feedback" (ICML 2024): each label is flipped
independently with rate ε, and rDPO corrects the loss with ε (global or per pair).

Per pair (members = response-level score columns, which ``build_pairs`` carries to the
pair as ``<m>_chosen`` / ``<m>_rejected``; a member may bring ``<m>_std`` as its own
uncertainty):

* ``strength`` = mean over members of d_k = m_chosen − m_rejected;
* ``strength_std`` = population std of the d_k, plus each member's own variance when it
  has ``_std`` columns (law of total variance: √(Var_k d_k + mean_k σ_k²));
* ``flip_prob`` = P(D < 0) for the difference D of a member drawn from the ensemble —
  the share of members that disagree with the label (a tie counts half, a member with
  its own std contributes Φ(−d_k/σ_k)) when there are ``empirical_min_members`` or more
  (10, the ensemble size of Wang et al.), else the normal approximation
  Φ(−strength/strength_std).

Why compute on pairs and not on the response table: strength is a difference per member,
so it needs both sides of a pair side by side; carrying the member columns through
``build_pairs`` makes that a row-wise expression, with no join back to responses.

The dataset flip rate ε (an estimate, with its standard error, in the step's metadata,
which the dataset card reads). The mean of ``flip_prob`` is not used as the estimate: it
counts member noise on true-but-small margins as label flips and overestimates ε. The
estimator is the *confident-sign* share: ε̂ = #{strength < 0} / #{|strength| > z·se}
over pairs whose strength is at least z standard errors from zero. It assumes (the rDPO
noise model) that (1) a flip is independent of the size of the true margin and (2) the
members measure the true difference with noise symmetric around it (Gaussian, standard
error ``se`` from the members' scatter: pooled over pairs by default, or per pair).
Negating a pair's member differences then leaves the event "confident" unchanged, so the
confident pairs are an unbiased sample for the flip rate; what remains is a sign error
of at most Φ(−z)/P(confident) (≈ 0.3% at z = 3). Members must be independent of the
score that chose the label (a member that also made the label never disagrees with it),
or ε̂ is biased toward 0.

Policies for weak pairs: ``keep`` (annotate; the loss may use the dataset ε, recorded as
``loss_epsilon``), ``drop`` (quarantine pairs below ``min_strength`` and/or above
``max_flip_prob``), ``flip`` (swap chosen and rejected where strength < 0; ``flipped``
marks them; ``ches``/``rationale`` of a flipped pair are cleared, they described the other
order), ``carry`` (keep every pair; the loss should use per-pair ``flip_prob``, recorded
as ``loss_epsilon: flip_prob``). ε is estimated on the pairs as they come in, before the
policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from prefdata.pairs import to_arrow
from prefdata.step import GlobalStep, Output

POLICIES = ("keep", "drop", "flip", "carry")
COLUMNS = ("strength", "strength_std", "flip_prob", "flipped")
CLEARED_ON_FLIP = ("ches", "ln_ches", "rationale")


@dataclass
class NoiseConfig:
    members: list[str] | None = None  # response-level score columns; default: every carried score_*
    policy: str = "keep"
    min_strength: float | None = None  # drop: pairs with strength below this
    max_flip_prob: float | None = None  # drop: pairs with flip_prob above this
    empirical_min_members: int = 10
    z: float = 3.0
    se: str = "pooled"  # pooled | per_pair


class Noise(GlobalStep):
    """Adds strength, strength_std, flip_prob; estimates ε; applies a weak-pair policy."""

    name = "noise"
    Config = NoiseConfig

    def check(self) -> None:
        c = self.config
        if c.policy not in POLICIES:
            raise ValueError(f"noise: policy must be one of {POLICIES}, got '{c.policy}'")
        if c.policy == "drop" and c.min_strength is None and c.max_flip_prob is None:
            raise ValueError("noise: policy 'drop' needs min_strength and/or max_flip_prob")
        if c.policy != "drop" and (c.min_strength is not None or c.max_flip_prob is not None):
            raise ValueError("noise: min_strength/max_flip_prob only apply with policy 'drop'")
        if c.se not in ("pooled", "per_pair"):
            raise ValueError(f"noise: se must be 'pooled' or 'per_pair', got '{c.se}'")
        if c.z <= 0 or c.empirical_min_members < 1:
            raise ValueError("noise: z must be > 0 and empirical_min_members >= 1")
        if c.members is not None and not c.members:
            raise ValueError("noise: members is empty; name at least one score column")

    def input_columns(self) -> list[str]:
        cols = ["pair_id", "chosen", "rejected", "score_chosen", "score_rejected"]
        return cols + [f"{m}_{side}" for m in self.config.members or [] for side in ("chosen", "rejected")]

    def output_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c not in COLUMNS] + list(COLUMNS)

    def process(self, frame: pl.LazyFrame) -> Output:
        out, self.metadata = apply_noise(frame, self.config)
        return out


def find_members(columns: list[str]) -> list[str]:
    """Score columns carried to the pair (``<m>_chosen`` and ``<m>_rejected``), not ``_std``
    and not the pair's own ``score_chosen``/``score_rejected``."""
    names = set(columns)
    found = [c[: -len("_chosen")] for c in columns if c.startswith("score_") and c.endswith("_chosen")]
    return [m for m in found if f"{m}_rejected" in names and not m.endswith("_std") and m != "score"]


def normal_cdf(x: pl.Expr) -> pl.Expr:
    """Φ(x) by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as a polars expression."""
    u = x.abs() / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * u)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    tail = 0.5 * poly * (-(u * u)).exp()  # Φ(−|x|)
    return pl.when(x >= 0).then(1.0 - tail).otherwise(tail)


def noise_columns(schema_names: list[str], cfg: NoiseConfig) -> tuple[list[pl.Expr], list[str]]:
    """Expressions for strength, strength_std, flip_prob (and the per-pair se) on a pair frame."""
    members = list(cfg.members) if cfg.members is not None else find_members(schema_names)
    if not members:
        raise ValueError(
            "noise: no ensemble members found; build pairs from a table with score_* columns "
            "(build_pairs carries them as <col>_chosen/<col>_rejected) or set 'members'"
        )
    missing = [f"{m}_{s}" for m in members for s in ("chosen", "rejected") if f"{m}_{s}" not in schema_names]
    if missing:
        raise ValueError(f"noise: member column(s) {missing} are not in the pair table; "
                         f"available: {sorted(c for c in schema_names if c.startswith('score_'))}")
    diffs = [pl.col(f"{m}_chosen") - pl.col(f"{m}_rejected") for m in members]
    own = {m: (pl.col(f"{m}_std_chosen") ** 2 + pl.col(f"{m}_std_rejected") ** 2)
           for m in members if {f"{m}_std_chosen", f"{m}_std_rejected"} <= set(schema_names)}
    k = len(members)
    n_valid = pl.sum_horizontal([d.is_not_null().cast(pl.Int64) for d in diffs])
    strength = pl.mean_horizontal(diffs)
    between = pl.mean_horizontal([(d - strength) ** 2 for d in diffs])
    own_var = pl.sum_horizontal([own.get(m, pl.lit(0.0)) for m in members]) / k
    std = (between + own_var).sqrt()
    if k >= cfg.empirical_min_members:
        votes = []
        for m, d in zip(members, diffs):
            vote = pl.when(d.is_null()).then(None).when(d < 0).then(1.0).when(d == 0).then(0.5).otherwise(0.0)
            if m in own:
                s = own[m].sqrt()
                vote = pl.when(s > 0).then(normal_cdf(-d / s)).otherwise(vote)
            votes.append(vote)
        flip = pl.mean_horizontal(votes)
    else:
        flip = (pl.when(std > 0).then(normal_cdf(-strength / std))
                .when(strength > 0).then(0.0).when(strength < 0).then(1.0).otherwise(0.5))
    if k >= 2:  # se of the mean from the members' scatter: sample variance (ddof = 1) / n
        se = (between / (n_valid - 1).clip(lower_bound=1)).sqrt()
    else:
        se = own_var.sqrt()
    valid = n_valid > 0
    exprs = [
        pl.when(valid).then(strength).alias("strength"),
        pl.when(valid).then(std).alias("strength_std"),
        pl.when(valid).then(flip).alias("flip_prob"),
        pl.when(valid).then(se).alias("_se"),
    ]
    return exprs, members


def estimate_flip_rate(df: pl.DataFrame, z: float = 3.0, se: str = "pooled") -> dict:
    """Confident-sign estimate of ε from ``strength`` and the per-pair ``_se`` column."""
    scored = df.filter(pl.col("strength").is_not_null() & pl.col("strength").is_not_nan())
    if se == "pooled":
        noise_se = scored.select((pl.col("_se") ** 2).mean().sqrt()).item() or 0.0
        bound = pl.lit(z * noise_se)
    else:
        noise_se = None
        bound = z * pl.col("_se").fill_null(0.0)
    stats = scored.select(
        n_conf=(pl.col("strength").abs() > bound).sum(),
        n_neg=((pl.col("strength").abs() > bound) & (pl.col("strength") < 0)).sum(),
        mean_flip=pl.col("flip_prob").mean(),
    ).row(0, named=True)
    n_conf, n_neg = int(stats["n_conf"]), int(stats["n_neg"])
    eps = n_neg / n_conf if n_conf else None
    return {
        "epsilon": eps,
        "epsilon_stderr": math.sqrt(eps * (1 - eps) / n_conf) if n_conf else None,
        "epsilon_estimator": "confident_sign",
        "z": z,
        "se": se,
        "noise_se": noise_se,
        "n_pairs": scored.height,
        "n_confident": n_conf,
        "mean_flip_prob": stats["mean_flip"],
    }


def apply_noise(frame: pl.LazyFrame | pl.DataFrame, cfg: NoiseConfig) -> tuple[Output, dict]:
    lazy = frame.lazy()
    names = lazy.collect_schema().names()
    exprs, members = noise_columns(names, cfg)
    df = lazy.drop([c for c in COLUMNS if c in names]).with_columns(exprs).collect()
    meta = estimate_flip_rate(df, cfg.z, cfg.se)
    meta.update(members=members, policy=cfg.policy)
    df = df.drop("_se").with_columns(flipped=pl.lit(False))
    quarantine, counts = None, {}
    if cfg.policy == "drop":
        weak = pl.lit(False)
        reasons = pl.lit(None, dtype=pl.String)
        if cfg.max_flip_prob is not None:
            high = pl.col("flip_prob") > cfg.max_flip_prob
            weak = weak | high
            reasons = pl.when(high).then(pl.lit(f"weak pair: flip_prob > {cfg.max_flip_prob:g}")).otherwise(reasons)
        if cfg.min_strength is not None:
            low = pl.col("strength") < cfg.min_strength
            weak = weak | low
            reasons = pl.when(low).then(pl.lit(f"weak pair: strength < {cfg.min_strength:g}")).otherwise(reasons)
        no_members = pl.col("strength").is_null()
        weak = weak.fill_null(False) | no_members
        reasons = pl.when(no_members).then(pl.lit("no member scores")).otherwise(reasons)
        tagged = df.with_columns(_weak=weak, reason=reasons)
        dropped = tagged.filter(pl.col("_weak")).drop("_weak")
        df = tagged.filter(~pl.col("_weak")).drop("_weak", "reason")
        quarantine = to_arrow(dropped) if dropped.height else None
        counts = {"dropped_weak": dropped.height}
    elif cfg.policy == "flip":
        df = flip_pairs(df, pl.col("strength") < 0)
        counts = {"flipped": int(df["flipped"].sum())}
    meta.update(counts)
    meta["loss_epsilon"] = "flip_prob" if cfg.policy == "carry" else meta["epsilon"]
    return Output(to_arrow(df), quarantine=quarantine, counts=counts), meta


def flip_pairs(df: pl.DataFrame, mask: pl.Expr) -> pl.DataFrame:
    """Swap chosen and rejected (and every ``*_chosen``/``*_rejected`` column) where mask."""
    df = df.with_columns(_flip=mask.fill_null(False))
    swaps = [("chosen", "rejected"), ("chosen_id", "rejected_id"), ("score_chosen", "score_rejected")]
    swaps += [(c, c[: -len("_chosen")] + "_rejected") for c in df.columns
              if c.endswith("_chosen") and c not in ("score_chosen", "chosen_id")
              and c[: -len("_chosen")] + "_rejected" in df.columns]
    flip = pl.col("_flip")
    exprs = []
    for a, b in swaps:
        exprs += [pl.when(flip).then(pl.col(b)).otherwise(pl.col(a)).alias(a),
                  pl.when(flip).then(pl.col(a)).otherwise(pl.col(b)).alias(b)]
    df = df.with_columns(exprs)
    updates = [
        (pl.col("score_chosen") - pl.col("score_rejected")).alias("margin"),
        pl.when(flip).then(-pl.col("strength")).otherwise(pl.col("strength")).alias("strength"),
        pl.when(flip).then(1.0 - pl.col("flip_prob")).otherwise(pl.col("flip_prob")).alias("flip_prob"),
        (pl.col("flipped") | flip).alias("flipped"),
    ]
    updates += [pl.when(flip).then(None).otherwise(pl.col(c)).alias(c) for c in CLEARED_ON_FLIP if c in df.columns]
    return df.with_columns(updates).drop("_flip")
