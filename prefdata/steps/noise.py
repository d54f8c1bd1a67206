"""How trustworthy each comparison is: preference strength, flip probability, flip rate ε.

Wang et al. 2024, "Secrets of RLHF in Large Language Models Part II: Reward Modeling":
with an ensemble of scorers, a pair's preference strength is the mean over members of
score(chosen) − score(rejected); its spread says how sure the ensemble is, and pairs with
negative strength are likely mislabelled. Chowdhury et al. 2024, "Provably Robust DPO:
Aligning Language Models with Noisy Feedback" (ICML 2024): each label is flipped
independently with rate ε, and rDPO corrects the loss with ε (global or per pair).

Per pair (members = response-level score columns, which ``build_pairs`` carries to the
pair as ``<m>_chosen`` / ``<m>_rejected``; a member may bring ``<m>_std`` as its own
uncertainty). By default the members are every carried score column *except* the one that
chose the label (found in the data: its carried values equal ``score_chosen`` /
``score_rejected`` on every pair) and ``score_original*`` (an imported human label): a
member that made the label never disagrees with it, so it would pull ε toward 0. Fewer
than two independent members is an error — one member has no scatter to measure noise.

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

Its standard error counts what the number of members decides: the noise scale comes
from the members' scatter with Σ(k_i − 1) degrees of freedom, so the confidence bound
is a Student-t quantile (per pair with ``se: per_pair``: k − 1 degrees of freedom, which
with 2 members makes few pairs confident and the error bar wide); the binomial error of
the share (Agresti–Coull, so 0 of n is not "0 ± 0") plus the expected number of
confident pairs whose sign is still member noise.

Policies for weak pairs: ``keep`` (annotate; the loss may use the dataset ε, recorded as
``loss_epsilon``), ``drop`` (quarantine pairs below ``min_strength`` and/or above
``max_flip_prob``), ``flip`` (swap chosen and rejected where strength < 0; ``flipped``
marks them; ``ches``/``rationale`` of a flipped pair are cleared, they described the other
order), ``carry`` (keep every pair; the loss should use per-pair ``flip_prob``, recorded
as ``loss_epsilon: flip_prob``). ε is estimated on the pairs as they come in, before the
policy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from prefdata.pairs import to_arrow
from prefdata.step import GlobalStep, Output

log = logging.getLogger(__name__)

POLICIES = ("keep", "drop", "flip", "carry")
COLUMNS = ("strength", "strength_std", "flip_prob", "flipped")
CLEARED_ON_FLIP = ("ches", "ln_ches", "rationale")


@dataclass
class NoiseConfig:
    members: list[str] | None = None  # default: every carried score_* except the label's and score_original*
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


def label_columns(frame: pl.LazyFrame, candidates: list[str]) -> list[str]:
    """The carried score columns that chose the label: equal to ``score_chosen`` and
    ``score_rejected`` on every pair where they have a value."""
    if not candidates:
        return []
    same = [((pl.col(f"{m}_chosen") == pl.col("score_chosen"))
             & (pl.col(f"{m}_rejected") == pl.col("score_rejected"))).fill_null(True).all().alias(m)
            for m in candidates]
    row = frame.select(same).collect().row(0, named=True)
    return [m for m in candidates if row[m]]


def choose_members(frame: pl.LazyFrame, names: list[str], cfg: NoiseConfig) -> tuple[list[str], list[str]]:
    """(members, the label's own score columns among the candidates)."""
    found = find_members(names)
    labels = label_columns(frame, [m for m in found if f"{m}_chosen" in names])
    if cfg.members is not None:
        members = list(cfg.members)
        own = [m for m in members if m in labels]
        if own:
            log.warning("noise: member(s) %s chose the label (their values equal score_chosen/score_rejected); "
                        "they never disagree with it and bias ε toward 0", own)
        return members, labels
    members = [m for m in found if m not in labels and not m.startswith("score_original")]
    if len(members) < 2:
        present = find_members(names)
        raise ValueError(
            f"noise: needs at least two ensemble members independent of the label, found {len(members)} "
            f"({members}); the label's own score {labels or []} and score_original* are not members. "
            f"Score columns carried to the pairs: {present}. Add a scorer step before build_pairs (e.g. a second "
            "'score_cdr' with its own name and criteria, 'score_rm' or 'judge_rubric'), or name the "
            "members explicitly with 'members: [...]'"
        )
    return members, labels


def normal_cdf(x: pl.Expr) -> pl.Expr:
    """Φ(x) by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as a polars expression."""
    u = x.abs() / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * u)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    tail = 0.5 * poly * (-(u * u)).exp()  # Φ(−|x|)
    return pl.when(x >= 0).then(1.0 - tail).otherwise(tail)


def noise_columns(schema_names: list[str], members: list[str], cfg: NoiseConfig) -> list[pl.Expr]:
    """Expressions for strength, strength_std, flip_prob, the per-pair se and its degrees of
    freedom on a pair frame."""
    missing = [f"{m}_{s}" for m in members for s in ("chosen", "rejected") if f"{m}_{s}" not in schema_names]
    if missing:
        raise ValueError(f"noise: member column(s) {missing} are not in the pair table; "
                         f"available: {sorted(c for c in schema_names if c.startswith('score_'))}")
    if len(members) < 2:
        raise ValueError(
            f"noise: members {members}: at least two are needed (one member has no scatter to measure "
            "its noise with); add a scorer step before build_pairs and list both"
        )
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
    se = (between / (n_valid - 1).clip(lower_bound=1)).sqrt()  # of the mean: sample var (ddof 1) / n
    valid = n_valid > 0
    exprs = [
        pl.when(valid).then(strength).alias("strength"),
        pl.when(valid).then(std).alias("strength_std"),
        pl.when(valid).then(flip).alias("flip_prob"),
        pl.when(valid).then(se).alias("_se"),
        (n_valid - 1).clip(lower_bound=0).alias("_df"),
    ]
    return exprs


def estimate_flip_rate(df: pl.DataFrame, z: float = 3.0, se: str = "pooled") -> dict:
    """Confident-sign estimate of ε and its standard error, from ``strength`` and the
    per-pair ``_se`` and ``_df`` columns."""
    scored = df.filter(pl.col("strength").is_not_null() & pl.col("strength").is_not_nan() & (pl.col("_df") > 0))
    p = _phi(z)
    if se == "pooled":
        pooled = scored.select(v=(pl.col("_se") ** 2).mean(), df=pl.col("_df").sum()).row(0, named=True)
        noise_se = math.sqrt(pooled["v"] or 0.0)
        quantile = t_quantile(p, pooled["df"] or 1)
        bound, se_expr = pl.lit(quantile * noise_se), pl.lit(noise_se)
    else:
        noise_se = None
        quantile = None
        df_q = scored["_df"].to_numpy().astype(float)
        bound = pl.Series(t_quantile(p, df_q)) * pl.col("_se").fill_null(0.0)
        se_expr = pl.col("_se")
    confident = pl.col("strength").abs() > bound
    wrong_sign = pl.when(se_expr > 0).then(normal_cdf(-pl.col("strength").abs() / se_expr)).otherwise(0.0)
    stats = scored.select(
        n_conf=confident.sum(),
        n_neg=(confident & (pl.col("strength") < 0)).sum(),
        sign_errors=pl.when(confident).then(wrong_sign).otherwise(0.0).sum(),
    ).row(0, named=True)
    n_conf, n_neg = int(stats["n_conf"] or 0), int(stats["n_neg"] or 0)
    mean_flip = df.select(pl.col("flip_prob").mean()).item()
    eps = stderr = None
    if n_conf:
        eps = n_neg / n_conf
        smooth = (n_neg + 1) / (n_conf + 2)  # Agresti–Coull: 0 of n is not "0 ± 0"
        stderr = math.sqrt(smooth * (1 - smooth) / (n_conf + 2) + (stats["sign_errors"] / n_conf) ** 2)
    return {
        "epsilon": eps,
        "epsilon_stderr": stderr,
        "epsilon_estimator": "confident_sign",
        "z": z,
        "se": se,
        "noise_se": noise_se,
        "confidence_quantile": quantile,
        "n_pairs": df.height,
        "n_scored": scored.height,
        "n_confident": n_conf,
        "mean_flip_prob": mean_flip,
    }


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def t_quantile(p: float, df):
    """Student-t quantile: exact for 1 and 2 degrees of freedom, else the Cornish–Fisher
    series of Abramowitz & Stegun 26.7.5 (within ~2% at p = Φ(3) for df ≥ 3)."""
    x = math.sqrt(2.0) * _erfinv(2 * p - 1)
    nu = np.maximum(np.asarray(df, dtype=float), 1.0)
    g1 = (x**3 + x) / 4
    g2 = (5 * x**5 + 16 * x**3 + 3 * x) / 96
    g3 = (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384
    g4 = (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160
    out = x + g1 / nu + g2 / nu**2 + g3 / nu**3 + g4 / nu**4
    out = np.where(nu == 1.0, math.tan(math.pi * (p - 0.5)), out)
    out = np.where(nu == 2.0, (2 * p - 1) / math.sqrt(2 * p * (1 - p)), out)
    return float(out) if out.ndim == 0 else out


def _erfinv(y: float) -> float:
    """Inverse error function by Newton steps from Winitzki's approximation."""
    a = 0.147
    ln = math.log(1 - y * y)
    x = math.copysign(math.sqrt(math.sqrt((2 / (math.pi * a) + ln / 2) ** 2 - ln / a) - (2 / (math.pi * a) + ln / 2)), y)
    for _ in range(3):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


def apply_noise(frame: pl.LazyFrame | pl.DataFrame, cfg: NoiseConfig) -> tuple[Output, dict]:
    lazy = frame.lazy()
    names = lazy.collect_schema().names()
    members, labels = choose_members(lazy, names, cfg)
    exprs = noise_columns(names, members, cfg)
    df = lazy.drop([c for c in COLUMNS if c in names]).with_columns(exprs).collect()
    meta = estimate_flip_rate(df, cfg.z, cfg.se)
    meta.update(members=members, label_columns=labels, policy=cfg.policy)
    df = df.drop("_se", "_df").with_columns(flipped=pl.lit(False))
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
