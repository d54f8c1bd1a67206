"""Combine several score columns into one ensemble score with an uncertainty.

Each member column (``score_rm``, ``score_cdr``, ``score_judge`` …) is first put on a common
scale — standardised over the whole dataset (``standardize: global``, the default, which
is why this is a global step), within each prompt's responses (``prompt``), or left as is
(``none``) — then combined into ``score_<name>``, with ``score_<name>_std`` the members'
population standard deviation (ddof = 0): how much the scorers disagree about a response.
``<name>_members`` counts the members present; missing member values (a judge that gave
up) are skipped, and a row with fewer than ``min_members`` gets null. With ``member_std:
true`` a member's own ``<member>_std`` (MC dropout, a nested ensemble), scaled like the
member, adds its variance (law of total variance: std = √(Var_k z_k + mean_k σ_k²)).

How members combine (``combine``):

* ``mean`` (the default): the mean of the (standardised) members.
* ``sum``: their sum. With ``transform: logsigmoid_centered`` this is the method of Wang
  et al. 2024, "Transforming and Combining Rewards for Aligning Large Language Models":
  each member becomes u = log σ(r(x, y) − r_ref(x)), r_ref(x) a per-prompt reference
  reward, and the sum of the u's acts like a logical AND of the properties (a response
  gains little from being very good on one member once it is good enough there, and
  loses much for being bad on any). ``reference`` gives r_ref: ``quantile:0.85`` (that
  quantile, linear interpolation, of the prompt's own responses' scores for that member)
  or a column holding the score of a reference response (a mapping ``member -> column``
  when there are several members). The transform applies after ``standardize``;
  ``standardize: none`` gives the paper's formula on raw rewards.
* ``harmonic``: the weighted harmonic mean H = (Σ w_k) / Σ (w_k / v_k) of the members
  rescaled to (0, 1] — with two members and ``harmonic_lambda: λ``, H = 1 / (λ/a + (1−λ)/b),
  λ weighing the first member: the λ-Harmonic reward of Miao et al. 2024, "Subject-driven
  Text-to-Image Generation via Preference-based Reinforcement Learning" (the paper that
  introduces Reward Preference Optimization, RPO), where a is the image-to-reference
  similarity, b the image-to-text similarity, and the harmonic mean makes a sample good
  only if it is good on both (a member at 0 gives H = 0, the limit). Verified against the
  authors' code, github.com/andrew-miao/RPO ``evaluation_metrics.py``
  (``RewardModel.mix_up_similarity_fn``): the same formula, with λ the weight of the
  image-similarity term, each similarity a cosine mapped to [0, 1] by (s + 1)/2 — our
  ``rescale: cosine`` — and a 1e-8 guard in each denominator that we do not add (a member
  at exactly 0 gives 0 here, about 0 there). The code also allows λ = 0 or 1 (one member
  alone); here λ must lie strictly inside (0, 1) — with one member, don't combine. Its
  Bradley–Terry labels come from P(a ≻ b) = σ(r_a − r_b) (the code draws a 0/1 label from
  it; ``build_pairs``' ``label_prob`` keeps the probability, for ``cdpo`` / ``rdpo``).
  ``weights`` generalise λ to k members (each in (0, 1), summing to 1). ``rescale`` must be
  explicit: ``minmax`` over the ``standardize`` scope (``global`` or ``prompt``) to [0, 1],
  ``sigmoid`` of the standardised value, ``cosine`` ((v + 1)/2 of raw members in [−1, 1],
  with ``standardize: none``), or ``none`` (raw members, which must then be positive:
  anything else is an error naming the member and row).

A constant member (std 0 over its scope) is centred but not scaled. Everything is a
polars expression over the whole table; no Python loop over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from prefdata.step import GlobalStep, Output

SCOPES = ("global", "prompt", "none")
TRANSFORMS = ("none", "logsigmoid_centered")
COMBINES = ("mean", "sum", "harmonic")
RESCALES = ("none", "minmax", "sigmoid", "cosine")
QUANTILE = "quantile:"


@dataclass
class EnsembleConfig:
    members: list[str] = field(default_factory=list)
    name: str = "ensemble"
    standardize: str = "global"
    min_members: int = 1
    member_std: bool = False
    transform: str = "none"  # none | logsigmoid_centered (Wang et al. 2024)
    reference: str | dict[str, str] | None = None  # quantile:<q> | column | {member: quantile:<q> or column}
    combine: str = "mean"  # mean | sum | harmonic
    harmonic_lambda: float | None = None  # two members: H = 1 / (λ/a + (1-λ)/b)
    weights: list[float] | None = None  # harmonic weights, one per member, summing to 1
    rescale: str = "none"  # harmonic: none | minmax | sigmoid | cosine ((v + 1) / 2, the RPO code)


class Ensemble(GlobalStep):
    """Writes ``score_<name>``, ``score_<name>_std`` and ``<name>_members``."""

    name = "score_ensemble"
    Config = EnsembleConfig

    def check(self) -> None:
        c = self.config
        problems = []
        if len(c.members) < 2:
            problems.append(f"needs at least two member columns, got {c.members}")
        if len(set(c.members)) != len(c.members):
            problems.append(f"members repeat: {c.members}")
        if c.standardize not in SCOPES:
            problems.append(f"standardize must be one of {list(SCOPES)}, got {c.standardize!r}")
        if not 1 <= c.min_members <= max(len(c.members), 1):
            problems.append(f"min_members must be between 1 and {len(c.members)}, got {c.min_members}")
        if f"score_{c.name}" in c.members:
            problems.append(f"the output score_{c.name} cannot also be a member")
        problems += _transform_problems(c) + _combine_problems(c)
        if problems:
            raise ValueError("score_ensemble: " + "; ".join(problems))

    def input_columns(self) -> list[str]:
        c = self.config
        cols = list(c.members)
        if c.standardize == "prompt" or any(r.startswith(QUANTILE) for r in references(c).values()):
            cols.append("prompt_id")
        if c.member_std:
            cols += [f"{m}_std" for m in c.members]
        cols += [r for r in references(c).values() if not r.startswith(QUANTILE) and r not in cols]
        return cols

    def new_columns(self) -> list[str]:
        n = self.config.name
        return [f"score_{n}", f"score_{n}_std", f"{n}_members"]

    def output_columns(self, columns: list[str]) -> list[str]:
        new = self.new_columns()
        return [c for c in columns if c not in new] + new

    def process(self, frame: pl.LazyFrame) -> Output:
        names = frame.collect_schema().names()
        missing = [c for c in self.input_columns() if c not in names]
        if missing:
            raise ValueError(f"score_ensemble: column(s) {missing} are not in the table; "
                             f"it has {[c for c in names if c.startswith('score_')]}"
                             + _reference_hint(self.config, missing))
        frame = frame.drop([c for c in self.new_columns() if c in names])
        if self.config.combine == "harmonic" and self.config.rescale == "none":
            _check_positive(frame, self.config)
        if self.config.combine == "harmonic" and self.config.rescale == "cosine":
            _check_cosine(frame, self.config)
        df = ensemble_frame(frame, self.config).collect()
        n = self.config.name
        counts = {f"{n}_rows": df.height,
                  f"{n}_null": int(df.get_column(f"score_{n}").null_count())}
        return Output(df.to_arrow(), counts=counts)


def references(cfg: EnsembleConfig) -> dict[str, str]:
    """The reference (``quantile:<q>`` or a column) of each member, for logsigmoid_centered."""
    if cfg.transform != "logsigmoid_centered" or cfg.reference is None:
        return {}
    if isinstance(cfg.reference, dict):
        return {m: cfg.reference[m] for m in cfg.members if m in cfg.reference}
    return {m: cfg.reference for m in cfg.members}


def _transform_problems(c: EnsembleConfig) -> list[str]:
    if c.transform not in TRANSFORMS:
        return [f"transform must be one of {list(TRANSFORMS)}, got {c.transform!r}"]
    if c.transform == "none":
        return ["option 'reference' only applies to transform: logsigmoid_centered"] if c.reference is not None else []
    problems = []
    if c.reference is None:
        return ["transform logsigmoid_centered needs option 'reference': 'quantile:0.85' (a quantile of each "
                "prompt's own responses) or the column of a reference response's score"]
    if isinstance(c.reference, dict):
        unknown = sorted(set(c.reference) - set(c.members))
        absent = [m for m in c.members if m not in c.reference]
        if unknown or absent:
            problems.append(f"option 'reference' must name every member once: unknown {unknown}, missing {absent}")
    elif not c.reference.startswith(QUANTILE) and len(c.members) > 1:
        problems.append(f"option 'reference': one column ({c.reference!r}) cannot be the reference of every "
                        "member; give a mapping member -> column, or 'quantile:<q>'")
    for m, ref in references(c).items():
        if ref.startswith(QUANTILE):
            try:
                q = float(ref[len(QUANTILE):])
            except ValueError:
                q = math.nan
            if not 0 <= q <= 1:
                problems.append(f"option 'reference' for {m}: {ref!r} is not 'quantile:<q>' with q in [0, 1]")
        elif ref in c.members or not ref:
            problems.append(f"option 'reference' for {m}: {ref!r} must be a reference-score column, not a member")
    if c.member_std:
        problems.append("member_std applies to combine mean/sum without a transform")
    return problems


def _combine_problems(c: EnsembleConfig) -> list[str]:
    if c.combine not in COMBINES:
        return [f"combine must be one of {list(COMBINES)}, got {c.combine!r}"]
    if c.rescale not in RESCALES:
        return [f"rescale must be one of {list(RESCALES)}, got {c.rescale!r}"]
    if c.combine != "harmonic":
        stray = [k for k, v in (("harmonic_lambda", c.harmonic_lambda), ("weights", c.weights)) if v is not None]
        stray += ["rescale"] if c.rescale != "none" else []
        return [f"option(s) {stray} only apply to combine: harmonic"] if stray else []
    problems = []
    if c.transform != "none" or c.member_std:
        problems.append("combine harmonic takes no transform and no member_std (rescale puts members in (0, 1])")
    if c.rescale == "cosine" and c.standardize != "none":
        problems.append("rescale cosine maps raw similarities in [-1, 1] to [0, 1]; it needs standardize: none")
    if c.rescale == "none" and c.standardize != "none":
        problems.append("combine harmonic with rescale none needs standardize none (standardised scores are "
                        "negative for half the rows); set rescale: minmax or sigmoid, or standardize: none")
    if c.harmonic_lambda is not None:
        if c.weights is not None:
            problems.append("give harmonic_lambda (two members) or weights, not both")
        if not 0 < c.harmonic_lambda < 1:
            problems.append(f"option 'harmonic_lambda' must be in (0, 1), got {c.harmonic_lambda}")
        if len(c.members) != 2:
            problems.append(f"option 'harmonic_lambda' weighs two members; with {len(c.members)} give 'weights'")
    if c.weights is not None:
        if len(c.weights) != len(c.members):
            problems.append(f"option 'weights' needs one weight per member ({len(c.members)}), got {c.weights}")
        if any(not 0 < w < 1 for w in c.weights) or not math.isclose(sum(c.weights), 1.0, abs_tol=1e-9):
            problems.append(f"option 'weights' must each be in (0, 1) and sum to 1, got {c.weights}")
    return problems


def _reference_hint(cfg: EnsembleConfig, missing: list[str]) -> str:
    refs = [r for r in references(cfg).values() if r in missing]
    return (f". The reference column(s) {refs} of option 'reference' (transform logsigmoid_centered) must hold "
            "the reference response's score; add them, or use 'quantile:<q>'") if refs else ""


def _check_positive(frame: pl.LazyFrame, cfg: EnsembleConfig) -> None:
    """Harmonic mean without rescaling: every present member value must be > 0."""
    _check_members(frame, cfg, lambda x: x <= 0, "combine harmonic with rescale none needs scores > 0",
                   "are <= 0; set rescale: minmax (to [0, 1] over the standardize scope) or sigmoid")


def _check_cosine(frame: pl.LazyFrame, cfg: EnsembleConfig) -> None:
    """rescale cosine: every present member value must be a cosine, in [-1, 1]."""
    _check_members(frame, cfg, lambda x: x.abs() > 1, "rescale cosine needs scores in [-1, 1] (cosine similarities)",
                   "are outside; use rescale: minmax or sigmoid for other scores")


def _check_members(frame: pl.LazyFrame, cfg: EnsembleConfig, is_bad, need: str, advice: str) -> None:
    """An error naming each member with bad values, their count and the first bad row."""
    values = {m: pl.col(m).cast(pl.Float64) for m in cfg.members}
    bad = frame.with_row_index("__row").select(
        [pl.col("__row").filter(is_bad(x)).first().alias(m) for m, x in values.items()]
        + [is_bad(x).sum().alias(f"__n_{m}") for m, x in values.items()]).collect().row(0, named=True)
    found = [(m, bad[m], bad[f"__n_{m}"]) for m in cfg.members if bad[f"__n_{m}"]]
    if found:
        detail = ", ".join(f"{m}: {n} value(s), first at row {row}" for m, row, n in found)
        raise ValueError(f"score_ensemble: {need}, but {detail} {advice}")


def ensemble_frame(frame: pl.LazyFrame, cfg: EnsembleConfig) -> pl.LazyFrame:
    """The frame with the ensemble columns. Standardised members are materialised first, so
    that a per-prompt quantile of them (``.over``) does not re-standardise within the prompt."""
    staged = []
    for m in cfg.members:
        z, scale = _standardised(cfg, m)
        staged += [z.alias(f"__z_{m}"), scale.alias(f"__s_{m}")]
    temp = [c for m in cfg.members for c in (f"__z_{m}", f"__s_{m}")]
    return frame.with_columns(staged).with_columns(ensemble_columns(cfg)).drop(temp)


def ensemble_columns(cfg: EnsembleConfig) -> list[pl.Expr]:
    """Expressions for the combined score, the members' population std and the member count,
    over the staged ``__z_<member>`` / ``__s_<member>`` columns (``ensemble_frame``)."""
    zs, own = [], []
    refs = references(cfg)
    for m in cfg.members:
        z, scale = pl.col(f"__z_{m}"), pl.col(f"__s_{m}")
        if cfg.transform == "logsigmoid_centered":
            z = _log_sigmoid(z - _reference(cfg, m, refs[m], z))
        elif cfg.combine == "harmonic":
            z = _rescaled(cfg, m, z)
        zs.append(z.alias(f"__u_{m}"))
        if cfg.member_std:
            own.append(((pl.col(f"{m}_std").cast(pl.Float64).fill_nan(None) / scale) ** 2).alias(f"__v_{m}"))
    count = pl.sum_horizontal([z.is_not_null().cast(pl.Int64) for z in zs])
    mean = pl.mean_horizontal(zs)
    var = pl.mean_horizontal([(z - mean) ** 2 for z in zs])
    if own:
        var = var + pl.mean_horizontal(own).fill_null(0.0)
    combined = {"mean": mean, "sum": pl.sum_horizontal(zs), "harmonic": _harmonic(cfg, zs)}[cfg.combine]
    enough = count >= cfg.min_members
    n = cfg.name
    return [
        pl.when(enough).then(combined).otherwise(None).alias(f"score_{n}"),
        pl.when(enough).then(var.sqrt()).otherwise(None).alias(f"score_{n}_std"),
        count.alias(f"{n}_members"),
    ]


def _standardised(cfg: EnsembleConfig, m: str) -> tuple[pl.Expr, pl.Expr]:
    x = pl.col(m).cast(pl.Float64).fill_nan(None)
    if cfg.standardize == "none":
        return x, pl.lit(1.0)
    centre, scale = x.mean(), x.std(ddof=0)
    if cfg.standardize == "prompt":
        centre, scale = centre.over("prompt_id"), scale.over("prompt_id")
    scale = pl.when(scale > 0).then(scale).otherwise(1.0)
    return (x - centre) / scale, scale


def _reference(cfg: EnsembleConfig, m: str, ref: str, z: pl.Expr) -> pl.Expr:
    """r_ref(x) on the member's (standardised) scale: a quantile of the prompt's own values,
    or the reference column put through the member's standardisation."""
    if ref.startswith(QUANTILE):
        return z.quantile(float(ref[len(QUANTILE):]), "linear").over("prompt_id")
    x = pl.col(m).cast(pl.Float64).fill_nan(None)
    r = pl.col(ref).cast(pl.Float64).fill_nan(None)
    if cfg.standardize == "none":
        return r
    centre, scale = x.mean(), x.std(ddof=0)
    if cfg.standardize == "prompt":
        centre, scale = centre.over("prompt_id"), scale.over("prompt_id")
    return (r - centre) / pl.when(scale > 0).then(scale).otherwise(1.0)


def _log_sigmoid(d: pl.Expr) -> pl.Expr:
    """log σ(d) = −softplus(−d), stable for large |d|."""
    return -((-d).clip(lower_bound=0.0) + (-d.abs()).exp().log1p())


def _rescaled(cfg: EnsembleConfig, m: str, z: pl.Expr) -> pl.Expr:
    if cfg.rescale == "sigmoid":
        return 1.0 / (1.0 + (-z).exp())
    if cfg.rescale == "cosine":
        return (z + 1.0) / 2.0
    if cfg.rescale == "minmax":
        x = pl.col(m).cast(pl.Float64).fill_nan(None)
        lo, hi = x.min(), x.max()
        if cfg.standardize == "prompt":
            lo, hi = lo.over("prompt_id"), hi.over("prompt_id")
        return pl.when(hi > lo).then((x - lo) / (hi - lo)).otherwise(1.0)
    return z


def _harmonic(cfg: EnsembleConfig, vs: list[pl.Expr]) -> pl.Expr:
    """(Σ w) / Σ (w / v) over the members present; a member at 0 makes it 0."""
    k = len(vs)
    if cfg.weights is not None:
        weights = list(cfg.weights)
    elif cfg.harmonic_lambda is not None:
        weights = [cfg.harmonic_lambda, 1.0 - cfg.harmonic_lambda]
    else:
        weights = [1.0 / k] * k
    present = pl.sum_horizontal([v.is_not_null().cast(pl.Float64) * w for v, w in zip(vs, weights)])
    inverse = pl.sum_horizontal([w / v for v, w in zip(vs, weights)])
    return pl.when(inverse.is_infinite()).then(0.0).otherwise(present / inverse)
