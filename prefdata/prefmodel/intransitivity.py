"""Intransitive preferences: cyclic triples (a ≻ b ≻ c ≻ a) per prompt.

From a GPM's N×N win-probability matrix (a ≻ b when P[a, b] > 0.5), or from a pairwise
judge's both-order verdicts on a pair table (an edge only where both orders agreed; a tie
or a disagreement is no edge). For a strict relation B, the number of directed 3-cycles
is trace(B³)/3. A BT reward can never produce one; a GPM can (Zhang et al. 2024, "General
Preference Modeling with Preference Representations for Aligning Language Models").
"""

from __future__ import annotations

import numpy as np
import polars as pl


def cyclic_triples(beats: np.ndarray) -> int:
    """Directed 3-cycles of a strict relation (``beats[a, b]``: a ≻ b; both directions set is an error)."""
    B = np.asarray(beats, dtype=np.int64)
    if B.size and (B * B.T).any():
        raise ValueError("cyclic_triples: a relation with a ≻ b and b ≻ a for the same pair is not strict")
    return int(np.trace(B @ B @ B)) // 3


def triples_from_probabilities(P: np.ndarray) -> int:
    return cyclic_triples(np.asarray(P) > 0.5)


def from_verdicts(pairs: pl.DataFrame, verdict: str, a: str = "chosen_id", b: str = "rejected_id",
                  prompt: str = "prompt_id") -> pl.DataFrame:
    """Per prompt: cyclic triples among the judge's agreed verdicts (``chosen`` | ``rejected``)."""
    missing = [c for c in (verdict, a, b, prompt) if c not in pairs.columns]
    if missing:
        raise ValueError(f"intransitivity: the pair table lacks column(s) {missing}; it needs {prompt}, {a}, {b} "
                         f"and a pairwise judge's verdict column (e.g. <judge>_verdict from judge_pairwise)")
    edges = (pairs.filter(pl.col(verdict).is_in(["chosen", "rejected"]))
             .select(pl.col(prompt).alias("prompt_id"),
                     pl.when(pl.col(verdict) == "chosen").then(pl.col(a)).otherwise(pl.col(b)).alias("w"),
                     pl.when(pl.col(verdict) == "chosen").then(pl.col(b)).otherwise(pl.col(a)).alias("l")))
    counts = {}
    for (pid,), g in edges.group_by(["prompt_id"], maintain_order=True):
        ids = sorted(set(g["w"].to_list()) | set(g["l"].to_list()))
        pos = {x: i for i, x in enumerate(ids)}
        B = np.zeros((len(ids), len(ids)), dtype=bool)
        B[[pos[x] for x in g["w"]], [pos[x] for x in g["l"]]] = True
        B &= ~B.T  # a contradictory duplicate pair is no edge
        counts[pid] = cyclic_triples(B)
    prompts = pairs.select(pl.col(prompt).unique(maintain_order=True)).to_series().to_list()
    return pl.DataFrame({"prompt_id": prompts, "cyclic_triples": [counts.get(p, 0) for p in prompts]},
                        schema={"prompt_id": pairs.schema[prompt], "cyclic_triples": pl.Int64})


def summary(per_prompt: pl.DataFrame, prefix: str) -> dict:
    """Run-summary counts: prompts, prompts with at least one cycle, cyclic triples."""
    n = per_prompt.height
    with_cycle = int((per_prompt["cyclic_triples"] > 0).sum()) if n else 0
    return {f"{prefix}_prompts": n, f"{prefix}_prompts_with_cycle": with_cycle,
            f"{prefix}_cyclic_triples": int(per_prompt["cyclic_triples"].sum()) if n else 0}


def card_lines(summary_: dict) -> list[str]:
    """Dataset-card lines from every step's intransitivity counts in a run summary."""
    lines = []
    for step in summary_.get("steps", []) or []:
        counts = step.get("counts") or {}
        for key, with_cycle in counts.items():
            if not key.endswith("_prompts_with_cycle"):
                continue
            prefix = key[: -len("_prompts_with_cycle")]
            n = counts.get(f"{prefix}_prompts", 0)
            share = with_cycle / n if n else 0.0
            lines.append(f"- Intransitivity (`{prefix}`, step `{step.get('label') or step.get('step')}`): "
                         f"{with_cycle} of {n} prompts ({share:.1%}) have at least one cyclic triple "
                         f"(a ≻ b ≻ c ≻ a); {counts.get(f'{prefix}_cyclic_triples', 0)} cyclic triples in all. "
                         "A scalar reward cannot express these.")
    return lines
