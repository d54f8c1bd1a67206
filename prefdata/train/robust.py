"""Which ε rDPO uses, decided once at start and reported, never clipped silently.

Chowdhury, Kini & Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy
Feedback", ICML 2024: the loss is unbiased when every label is flipped with rate ε. The
default (``rdpo_eps: dataset``) is the dataset's ε that the ``noise`` step estimated and
the pipeline wrote into the output parquet's key-value metadata (``prefdata_step:noise``),
with its standard error. ``rdpo_eps: per_pair`` uses each pair's ``flip_prob`` instead;
a pair above ``rdpo_eps_max`` cannot enter the loss as it is (1/(1−2ε) explodes at 0.5),
so it is counted, reported and handled by ``rdpo_over_max``: ``flip`` (default: the
ensemble believes the label is wrong, so chosen and rejected are swapped and p becomes
1 − p; a pair still above the bound, p near 0.5, is clipped and counted), ``clip``
(ε = rdpo_eps_max) or ``drop``. A number is one global ε.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from prefdata.io import STEP_METADATA, read_metadata
from prefdata.train.data import DataError, Examples, subset

log = logging.getLogger(__name__)


def dataset_noise(path: str | Path) -> dict | None:
    """The noise step's metadata from the data file (or the first file of a folder)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            return None
        path = files[0]
    try:
        return read_metadata(path, STEP_METADATA + "noise")
    except (OSError, ValueError, pq.lib.ArrowException):
        return None


def prepare(examples: Examples, cfg) -> tuple[Examples, float | None, dict]:
    """(examples, one global ε or None for per-pair, what to report): for ``loss: rdpo``."""
    if cfg.loss != "rdpo":
        return examples, None, {}
    if cfg.rdpo_eps == "dataset":
        eps, info = from_dataset(cfg)
        log.info("rdpo: ε = %.4f%s from the dataset's noise step (%s confident pairs)", eps,
                 f" ± {info['rdpo_eps_stderr']:.4f}" if info.get("rdpo_eps_stderr") is not None else "",
                 info.get("rdpo_eps_n_confident", "?"))
        return examples, eps, info
    if cfg.rdpo_eps == "per_pair":
        return per_pair(examples, cfg)
    log.info("rdpo: ε = %.4f (given in the config)", cfg.rdpo_eps)
    return examples, float(cfg.rdpo_eps), {"rdpo_eps": float(cfg.rdpo_eps), "rdpo_eps_source": "config"}


def from_dataset(cfg) -> tuple[float, dict]:
    meta = dataset_noise(cfg.data)
    if not meta or "epsilon" not in meta:
        raise DataError(
            f"{cfg.data}: rdpo_eps: dataset needs the noise step's ε in the file's metadata (key "
            f"'{STEP_METADATA}noise'), and there is none. Run the pipeline with a noise step, or set "
            "rdpo_eps: per_pair (the flip_prob column) or rdpo_eps: <number>"
        )
    eps = meta["epsilon"]
    if eps is None:
        raise DataError(f"{cfg.data}: the noise step could not estimate ε (no pair's strength was confident, "
                        f"{meta.get('n_pairs', '?')} pairs); set rdpo_eps to a number or per_pair")
    if eps > cfg.rdpo_eps_max:
        raise DataError(f"{cfg.data}: the dataset's ε = {eps:.3f} is above rdpo_eps_max = {cfg.rdpo_eps_max}: "
                        "the ensemble disagrees with most labels. Check the labels (noise policy: flip swaps "
                        "the pairs it believes wrong) before training; rDPO cannot correct ε near 0.5")
    if meta.get("policy") in ("flip", "drop"):
        log.warning("rdpo: the noise step estimated ε = %.3f before its policy '%s' changed the pairs; the "
                    "flip rate of this file is lower, so rDPO over-corrects. With that policy prefer a smaller "
                    "rdpo_eps, or run noise with policy: keep", eps, meta["policy"])
    return float(eps), {"rdpo_eps": float(eps), "rdpo_eps_source": "dataset",
                        "rdpo_eps_stderr": meta.get("epsilon_stderr"),
                        "rdpo_eps_n_confident": meta.get("n_confident")}


def per_pair(examples: Examples, cfg) -> tuple[Examples, None, dict]:
    if examples.flip_prob is None:
        raise DataError(f"{cfg.data}: rdpo_eps: per_pair needs a complete 'flip_prob' column (the noise step "
                        "writes it); none found. Use rdpo_eps: dataset or a number")
    p = np.asarray(examples.flip_prob, dtype=float)
    over = p > cfg.rdpo_eps_max
    n_over = int(over.sum())
    info = {"rdpo_eps": "per_pair", "rdpo_eps_source": "flip_prob", "rdpo_over_max": cfg.rdpo_over_max,
            "rdpo_pairs_over_max": n_over}
    if n_over == 0:
        log.info("rdpo: per-pair ε from flip_prob; no pair above rdpo_eps_max = %g", cfg.rdpo_eps_max)
        return examples, None, info
    head = (f"rdpo: {n_over} of {len(p)} pairs have flip_prob > rdpo_eps_max = {cfg.rdpo_eps_max:g} "
            f"(max {p.max():.3f})")
    if cfg.rdpo_over_max == "drop":
        log.warning("%s; rdpo_over_max: drop -> they are left out of training", head)
        return subset(examples, ~over), None, info
    if cfg.rdpo_over_max == "flip":
        examples = subset(examples, np.ones(len(p), bool), flip=over)
        still = int((np.asarray(examples.flip_prob) > cfg.rdpo_eps_max).sum())
        info["rdpo_pairs_clipped"] = still
        log.warning("%s; rdpo_over_max: flip (the default) -> chosen and rejected swapped, flip_prob -> "
                    "1 - flip_prob, as the ensemble believes the label is wrong%s. Set rdpo_over_max: clip "
                    "or drop to change this", head,
                    f"; {still} near 0.5 stay above the bound and are clipped to it" if still else "")
        return examples, None, info
    info["rdpo_pairs_clipped"] = n_over
    log.warning("%s; rdpo_over_max: clip -> their ε is set to %g (their loss is scaled by 1/(1-2ε) = %.1f)",
                head, cfg.rdpo_eps_max, 1 / (1 - 2 * cfg.rdpo_eps_max))
    return examples, None, info
