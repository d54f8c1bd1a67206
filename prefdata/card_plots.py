"""The dataset card's PNG plots, made so a reader can compare them at a glance.

Chosen and rejected scores share one axis and one set of bins (two histograms on
different automatic ranges look alike whatever the data); every x label names the score
and its unit (``score_cdr (nats)``); count axes have integer ticks; the rows-per-step
bars keep one bar per step even when a step name repeats. Figures are built with
matplotlib's object API (no pyplot, no global backend switch), and each builder returns
its figure so tests can read the axes back.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl

from prefdata.io import write_text

CHOSEN, REJECTED, BARS, HIST = "#4477aa", "#ee7733", "#66aa55", "#4477aa"

# unit of a score column, by the step that writes it (``score_<name>``)
STEP_UNITS = {
    "score_cdr": "nats",
    "score_rm": "reward",
    "judge_rubric": "rating 1–5",
    "judge_pairwise": "win rate",
    "import_ratings": "original rating",
    "import_pairs": "original label",
}
# the same by column prefix, for a card made from the data alone
PREFIX_UNITS = (("score_cdr", "nats"), ("score_rm", "reward"), ("score_judge", "rating 1–5"),
                ("score_original", "original rating"))


def score_unit(column: str, summary: dict) -> str | None:
    """The unit of ``column``, from the step that wrote it, else from its name."""
    for s in summary.get("steps", []):
        c = s.get("config") or {}
        kind = s.get("step")
        names = c.get("name") if isinstance(c.get("name"), list) else [c.get("name")]
        imported = kind in ("import_ratings", "import_pairs")
        written = ["score_original"] if imported else [f"score_{n}" for n in names if n]
        if column not in written:
            continue
        if kind == "score_ensemble":
            units = {score_unit(m, summary) for m in c.get("members") or []}
            return units.pop() if len(units) == 1 else None
        if kind == "score_cdr" and c.get("reduction") == "mean":
            return "nats/token"
        if kind in STEP_UNITS:
            return STEP_UNITS[kind]
    return next((u for prefix, u in PREFIX_UNITS if column.startswith(prefix)), None)


def labelled(column: str, unit: str | None) -> str:
    return f"{column} ({unit})" if unit else column


def step_labels(steps: list[dict]) -> list[str]:
    """The engine's labels when the summary has them, else names numbered where they repeat."""
    names = [s["step"] for s in steps]
    seen: dict[str, int] = {}
    out = []
    for s, name in zip(steps, names):
        seen[name] = seen.get(name, 0) + 1
        out.append(s.get("label") or (f"{name}[{seen[name]}]" if names.count(name) > 1 else name))
    return out


def _bins(values: np.ndarray) -> np.ndarray:
    """Shared bin edges; whole-number data (ratings) gets one bin per value."""
    lo, hi = float(values.min()), float(values.max())
    if np.all(values == np.round(values)) and hi - lo <= 20:
        return np.arange(lo - 0.5, hi + 1.5)
    if lo == hi:
        return np.linspace(lo - 0.5, hi + 0.5, 6)
    return np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 4)))


def _figure(width: float = 5.5, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _integer_counts(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def score_figure(chosen: np.ndarray, rejected: np.ndarray, xlabel: str):
    """Chosen and rejected scores overlaid on one axis, with the same bins."""
    fig, ax = _figure()
    bins = _bins(np.concatenate([chosen, rejected]))
    ax.hist(chosen, bins=bins, color=CHOSEN, alpha=0.6, label=f"chosen (n={len(chosen)})")
    ax.hist(rejected, bins=bins, color=REJECTED, alpha=0.6, label=f"rejected (n={len(rejected)})")
    ax.hist(chosen, bins=bins, color=CHOSEN, histtype="step", linewidth=1.2)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend
    ax.set_title("chosen and rejected scores")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    _integer_counts(ax.yaxis)
    ax.legend(frameon=False)
    return fig


def histogram_figure(values: np.ndarray, xlabel: str, title: str, noun: str = "pairs", bins=None):
    fig, ax = _figure()
    bins = _bins(values) if bins is None else bins
    ax.hist(values, bins=bins, color=HIST, edgecolor="white", linewidth=0.6)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_title(f"{title} (n={len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(noun)
    _integer_counts(ax.yaxis)
    return fig


def steps_figure(labels: list[str], rows: list[int]):
    """One bar per step, labelled with its (unique) step label and its row count."""
    fig, ax = _figure(max(5.5, 1.0 + 0.9 * len(labels)), 3.8)
    x = np.arange(len(labels))
    bars = ax.bar(x, rows, color=BARS)
    ax.bar_label(bars, labels=[str(r) for r in rows], fontsize=8, padding=2)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_title("rows out per step")
    ax.set_xlabel("step")
    ax.set_ylabel("rows out")
    ax.set_ylim(0, max(rows + [1]) * 1.15)
    _integer_counts(ax.yaxis)
    return fig


def pair_figures(frame: pl.LazyFrame, columns: list[str], summary: dict, score: str | None) -> dict:
    """{file stem: figure} for the pair-level columns present."""
    unit = score_unit(score, summary) if score else None
    score_label = labelled(score or "score", unit)
    wanted = [c for c in ("score_chosen", "score_rejected", "margin", "strength", "flip_prob", "ches")
              if c in columns]
    if not wanted:
        return {}
    data = frame.select(wanted).collect()

    def values(c):
        return finite(data[c])

    figures = {}
    if "score_chosen" in wanted and "score_rejected" in wanted:
        chosen, rejected = values("score_chosen"), values("score_rejected")
        if len(chosen) and len(rejected):
            figures["scores"] = score_figure(chosen, rejected, score_label)
    labels = {
        "margin": (f"margin = chosen − rejected {score_label}", "margin"),
        "strength": ("strength (mean member score difference)", "preference strength"),
        "flip_prob": ("flip_prob (probability the label is flipped)", "flip probability"),
        "ches": ("ches (hidden-state similarity, CHES)", "CHES"),
    }
    for c, (xlabel, title) in labels.items():
        if c in wanted and len(values(c)):
            bins = np.linspace(0.0, 1.0, 21) if c == "flip_prob" else None  # a probability: its whole range
            figures[c] = histogram_figure(values(c), xlabel, title, bins=bins)
    return figures


def response_figures(frame: pl.LazyFrame, columns: list[str], summary: dict) -> dict:
    """One histogram per response-level score column (a table before pairs are built)."""
    scores = [c for c in columns if c.startswith("score_") and not c.endswith("_std")]
    if not scores:
        return {}
    data = frame.select(scores).collect()
    figures = {}
    for c in scores:
        if not data[c].dtype.is_numeric():
            continue
        v = finite(data[c])
        if len(v):
            figures[c] = histogram_figure(v, labelled(c, score_unit(c, summary)), c, noun="responses")
    return figures


def finite(series: pl.Series) -> np.ndarray:
    """The plottable values: nulls, NaN and ±inf (a failed score) left out."""
    values = series.drop_nulls().to_numpy().astype(float)
    return values[np.isfinite(values)]


def write_plots(folder: Path, frame: pl.LazyFrame, columns: list[str], summary: dict,
                score: str | None = None) -> list[Path]:
    """Render every figure that applies into ``folder`` (old PNGs removed first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    if "chosen" in columns:
        figures = pair_figures(frame, columns, summary, score)
    elif "responses" in columns:
        figures = {}
    else:
        figures = response_figures(frame, columns, summary)
    figures.update(rounds_figures(summary.get("rounds") or []))
    steps = summary.get("steps", [])
    if steps:
        figures["rows_per_step"] = steps_figure(step_labels(steps), [int(s["rows_out"]) for s in steps])
    return [save(fig, folder / f"{name}.png") for name, fig in figures.items()]


ROUND_METRICS = ("win_rate_vs_previous", "win_rate_vs_round0", "judge_win_rate_vs_previous", "judge_win_rate_vs_round0",
                 "mean_response_chars", "eval_chosen_logp_change", "eval_rejected_logp_change", "eval_margin",
                 "eval_reward_accuracy")


def rounds_figures(rows: list[dict]) -> dict:
    """On-policy rounds (prefdata.rounds): one figure per metric over rounds."""
    figures = {}
    for metric in ROUND_METRICS:
        points = [(r["round"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
        if not points:
            continue
        fig, ax = _figure(4.5, 3.0)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if "win_rate" in metric:
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
            ax.set_ylim(0, 1)
        ax.set_xticks([p[0] for p in points])
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        figures[f"rounds_{metric}"] = fig
    return figures


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return write_text(buffer.getvalue(), path)
