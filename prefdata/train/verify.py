"""Prefix sharing is checked, not assumed: packed vs ordinary log-probs on real rows at start.

The packed forward (packing.py) builds its own 4D mask and calls the LM head directly, so
whatever a model does beyond plain causal attention and a linear head — sliding-window
attention, ALiBi, logit scaling or soft-capping — is skipped silently. Before training
(and before the reference pass) the longest rows of the data go through both paths in
fp32; a relative difference above ``TOLERANCE`` means the packed path is wrong for this
model: ``packing: auto`` falls back to the unpacked path (and says so), ``packing: on``
refuses. Wang & Hegde, "Accelerating Direct Preference Optimization with Prefix
Sharing", 2024.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from prefdata.train.packing import packed_logps, unpacked_logps

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
CHECK_ROWS = 2  # the longest two: a padded multi-row batch, at the cost of scoring ~2 pairs twice


def packing_error(model, rows, device) -> float:
    """Largest |packed − unpacked| / max(|unpacked|, 1) over the responses of ``rows``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed, counts = packed_logps(model, rows, device)
        plain, _ = unpacked_logps(model, rows, device)
    model.train(was_training)
    valid = counts > 0
    rel = (packed - plain).abs() / plain.abs().clamp(min=1.0)
    return float(rel[valid].max())


def choose_logps(model, name: str, examples, mode: str, device) -> tuple[callable, dict]:
    """The log-prob function to train (or score the reference) with, after the check."""
    if mode == "off":
        return unpacked_logps, {"packing": "off"}
    longest = np.argsort(-examples.lengths(), kind="stable")[:CHECK_ROWS]
    error = packing_error(model, [examples.row(i) for i in longest], device)
    info = {"packing_check_rel_error": error}
    if error <= TOLERANCE:
        log.info("packing: %s gives the same log-probs packed and unpacked (max relative difference %.2e)",
                 name, error)
        return packed_logps, {"packing": "on", **info}
    why = (f"{name} ({type(model).__name__}): packed log-probs differ from the model's own forward by "
           f"{error:.2e} relative (> {TOLERANCE:g}) on the {len(longest)} longest rows; its attention or head "
           "is not plain causal + linear (sliding window, ALiBi, logit scaling or soft-capping)")
    if mode == "on":
        raise ValueError(f"{why}. Set packing: auto (fall back to unpacked) or packing: off")
    log.warning("%s; training unpacked (one forward per response; slower). Set packing: off to skip this check",
                why)
    return unpacked_logps, {"packing": "off", "packing_fallback": why, **info}
