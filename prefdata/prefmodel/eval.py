"""``prefdata eval-rm MODEL PAIRS``: pairwise accuracy of a reward model or GPM on a held-out
pair table, overall and per ``source``/``domain`` (RewardBench-style: the share of pairs
whose chosen response the model prefers; a tie counts as wrong). For a scalar reward model
(any ``*ForSequenceClassification`` folder or Hub id, including BT models from train-rm)
it also reports the distribution of the reward margin r_c − r_r; for a GPM, of s(c ≻ r).
Lambert et al. 2024, "RewardBench: Evaluating Reward Models for Language Modeling".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from prefdata.prefmodel.data import read_pairs
from prefdata.train.data import DataError


def pair_margins(model: str, pairs, device: str = "cpu", batch_size: int = 16) -> tuple[str, np.ndarray]:
    """(kind, r_c − r_r or s(c ≻ r) per pair); each distinct response scored once."""
    from prefdata.prefmodel.io import read_meta

    meta = read_meta(model) if Path(model).is_dir() else None
    if meta is not None and meta.get("kind") == "gpm":
        import torch

        from prefdata.prefmodel.heads import gpm_score
        from prefdata.prefmodel.io import load_gpm

        gpm = load_gpm(model, device=device, batch_size=batch_size)
        v, lam = gpm.embed(pairs.conversations, pairs.texts)
        with torch.no_grad():
            s = gpm_score(v[pairs.chosen], v[pairs.rejected], lam[pairs.chosen])
        return "gpm", s.double().cpu().numpy()
    from prefdata.models.reward_backend import RewardModel

    rm = RewardModel(model, device=device, batch_size=batch_size)
    r = rm.score(pairs.conversations, pairs.texts)
    return "reward", r[pairs.chosen] - r[pairs.rejected]


def evaluate(model: str, data: str, device: str = "cpu", batch_size: int = 16) -> dict:
    pairs = read_pairs(data)
    kind, margin = pair_margins(model, pairs, device, batch_size)
    report = {"model": model, "data": data, "kind": kind, "pairs": len(pairs),
              "accuracy": float((margin > 0).mean()), "margin": distribution(margin)}
    groups = pairs.source
    if groups is None:
        import pyarrow.parquet as pq

        if "domain" in pq.read_schema(data).names:
            groups = [str(x) for x in pq.read_table(data, columns=["domain"]).column("domain").to_pylist()]
    if groups is not None:
        g = np.asarray(groups, dtype=object)
        report["by_group"] = {str(k): {"pairs": int((g == k).sum()), "accuracy": float((margin[g == k] > 0).mean())}
                              for k in sorted(set(groups))}
    return report


def distribution(x: np.ndarray) -> dict:
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(x.mean()), "std": float(x.std()), "p05": float(q[0]), "p25": float(q[1]),
            "median": float(q[2]), "p75": float(q[3]), "p95": float(q[4])}


def format_report(r: dict) -> str:
    m = r["margin"]
    lines = [f"{r['model']} on {r['data']}: {r['pairs']} pairs, accuracy {r['accuracy']:.4f}",
             f"  {'reward margin r_c - r_r' if r['kind'] == 'reward' else 'GPM score s(c > r)'}: mean {m['mean']:.4g}, "
             f"std {m['std']:.4g}, p05 {m['p05']:.4g}, median {m['median']:.4g}, p95 {m['p95']:.4g}"]
    for name, g in (r.get("by_group") or {}).items():
        lines.append(f"  {name}: {g['pairs']} pairs, accuracy {g['accuracy']:.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prefdata eval-rm", description=__doc__.split("\n")[0])
    p.add_argument("model", help="reward model (folder or HF id) or GPM folder from train-rm")
    p.add_argument("pairs", help="held-out pair parquet (prompt, chosen, rejected)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", help="also write the report to this JSON file")
    args = p.parse_args(argv)
    try:
        report = evaluate(args.model, args.pairs, args.device, args.batch_size)
    except (DataError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"prefdata eval-rm: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from prefdata.io import write_json

        write_json(report, args.json)
    print(format_report(report))
    return 0
