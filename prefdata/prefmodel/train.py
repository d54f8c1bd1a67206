"""Train a Bradley–Terry reward model or a General Preference Model from a pair table.

    prefdata train-rm --data pairs.parquet --model smollm2-135m-instruct --objective gpm --output out/gpm

``head_only`` (default): backbone features are computed once with prompt sharing and
cached (features.py), then only the head trains — seconds on CPU, one full-batch-free
loop over cached tensors (``fit_head``). ``full``: backbone and head fine-tune together;
this loop reuses the trainer's pieces (prefdata/train: eval split by prompt, seeded
length-grouped batches, safetensors checkpoints with optimizer/scheduler/RNG state and
exact resume, run folder refusal, RunLog). The trainer's own loop is built around packed
policy log-probs and reference caches, which a scalar/embedding head does not use, so
the loop here is short and separate. Head-only runs take seconds and write no
checkpoints. Losses and heads: heads.py (Zhang et al. 2024, "General Preference Modeling
with Preference Representations for Aligning Language Models").
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from prefdata.io import write_json
from prefdata.prefmodel.data import Pairs, read_pairs
from prefdata.prefmodel.features import Features, cached_features, forward_features, token_ids
from prefdata.prefmodel.heads import BTHead, GPMHead, bt_loss, gpm_loss, gpm_score
from prefdata.step import build_config
from prefdata.train.data import DataError, epoch_batches, split_eval

log = logging.getLogger("prefdata.prefmodel")

RESUMABLE = {"max_steps", "save_every", "keep_checkpoints", "log_every", "progress", "tensorboard", "wandb"}


@dataclass
class PrefModelConfig:
    data: str = ""
    model: str = "smollm2-135m-instruct"
    output: str = ""
    objective: str = "gpm"             # bt | gpm
    mode: str = "head_only"            # head_only | full
    dim: int = 8                       # GPM embedding dimension 2k
    normalize: bool = True             # GPM: L2-normalise embeddings (reference code does)
    gate: bool = True                  # GPM: prompt-dependent λ(x) per 2x2 block
    tau: float | None = None           # None: 1.0 for bt, 0.1 for gpm (reference code)
    margin_column: str | None = None   # BT margin m, per pair
    label_source: str | None = None    # keep only ai or human labels
    lr: float | None = None            # None: 1e-2 head_only, 1e-5 full
    weight_decay: float = 0.0
    epochs: float = 20.0
    max_steps: int = 0
    batch_size: int = 1024
    eval_fraction: float = 0.1
    eval_max: int = 10000
    seed: int = 0
    device: str = "cpu"
    feature_batch_size: int = 16
    feature_cache: str | None = None   # default: <output>/features
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "prefdata"

    @property
    def temperature(self) -> float:
        return self.tau if self.tau is not None else (1.0 if self.objective == "bt" else 0.1)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-2 if self.mode == "head_only" else 1e-5)


def check(cfg: PrefModelConfig) -> None:
    problems = []
    if cfg.objective not in ("bt", "gpm"):
        problems.append(f"objective must be bt or gpm, got {cfg.objective!r}")
    if cfg.mode not in ("head_only", "full"):
        problems.append(f"mode must be head_only or full, got {cfg.mode!r}")
    if cfg.objective == "gpm" and (cfg.dim < 2 or cfg.dim % 2):
        problems.append(f"dim (the GPM embedding dimension 2k) must be even and >= 2, got {cfg.dim}")
    if cfg.margin_column and cfg.objective != "bt":
        problems.append("margin_column applies to objective bt only")
    if cfg.temperature <= 0:
        problems.append(f"tau must be > 0, got {cfg.tau}")
    for name in ("data", "output"):
        if not getattr(cfg, name):
            problems.append(f"'{name}' is required")
    if problems:
        raise ValueError("train-rm: " + "; ".join(problems))


def make_head(cfg: PrefModelConfig, hidden: int):
    torch.manual_seed(cfg.seed)
    return BTHead(hidden) if cfg.objective == "bt" else GPMHead(hidden, cfg.dim, cfg.normalize, cfg.gate)


def pair_logits(head, h_c, h_r, h_p):
    """The preference logit before τ: r_c − r_r (BT) or s(c ≻ r) (GPM)."""
    if isinstance(head, BTHead):
        return head(h_c) - head(h_r)
    return gpm_score(head.embed(h_c), head.embed(h_r), head.scales(h_p, h_c.shape[0]))


def pair_loss(head, h_c, h_r, h_p, tau: float, margin=None):
    if isinstance(head, BTHead):
        return bt_loss(head(h_c), head(h_r), margin, tau)
    return gpm_loss(pair_logits(head, h_c, h_r, h_p), tau)


def fit_head(head, feats: Features, chosen: np.ndarray, rejected: np.ndarray, train_rows: np.ndarray,
             cfg: PrefModelConfig, margin: np.ndarray | None = None, on_step=None) -> list[dict]:
    """Train ``head`` on cached features; the trainer's seeded batch order (epoch_batches)."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_epoch = max(1, math.ceil(len(train_rows) / cfg.batch_size))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    ones = np.ones(len(chosen), dtype=np.int64)
    m = None if margin is None else torch.as_tensor(margin)
    records, step = [], 0
    head.train()
    while step < total:
        for idx in epoch_batches(train_rows, ones, cfg.batch_size, cfg.seed, step // per_epoch, False):
            c, r = chosen[idx], rejected[idx]
            hp = feats.prompt[c] if getattr(head, "gate", None) is not None else None
            loss = pair_loss(head, feats.response[c], feats.response[r], hp, cfg.temperature,
                             None if m is None else m[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            record = {"step": step, "loss": float(loss.detach())}
            records.append(record)
            if on_step is not None:
                on_step(record)
            if step >= total:
                break
    head.eval()
    return records


def accuracy(head, feats: Features, chosen, rejected, rows) -> float:
    """Share of pairs whose chosen response the head prefers (logit > 0)."""
    if len(rows) == 0:
        return float("nan")
    with torch.no_grad():
        c, r = chosen[rows], rejected[rows]
        z = pair_logits(head, feats.response[c], feats.response[r], feats.prompt[c])
    return float((z > 0).float().mean())


def train(cfg: PrefModelConfig, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          on_step=None) -> dict:
    """Run ``cfg``; returns a summary (also written to <output>/run.json)."""
    check(cfg)
    pairs = read_pairs(cfg.data, cfg.margin_column, cfg.label_source)
    train_rows, eval_rows = split_eval(pairs.groups, cfg.eval_fraction, cfg.eval_max, cfg.seed)
    out = Path(cfg.output)
    log.info("data: %d pairs (%d distinct responses) -> %d train, %d eval (split by prompt)",
             len(pairs), len(pairs.texts), len(train_rows), len(eval_rows))
    if cfg.mode == "head_only":
        return _train_head_only(cfg, pairs, train_rows, eval_rows, out, on_step)
    from prefdata.prefmodel.full import train_full

    return train_full(cfg, pairs, train_rows, eval_rows, out, resume, overwrite, stop_after, on_step)


def _train_head_only(cfg, pairs: Pairs, train_rows, eval_rows, out: Path, on_step) -> dict:
    from prefdata.models.hub import load_causal_lm
    from prefdata.models.identity import model_identity_digest
    from prefdata.prefmodel import io

    out.mkdir(parents=True, exist_ok=True)
    cache = cfg.feature_cache or str(out / "features")
    feats, info = cached_features(cfg.model, pairs.conversations, pairs.texts, cache, cfg.device,
                                  cfg.feature_batch_size)
    head = make_head(cfg, feats.response.shape[1])
    t0 = time.perf_counter()
    records = fit_head(head, feats, pairs.chosen, pairs.rejected, train_rows, cfg, pairs.margin, on_step)
    seconds = time.perf_counter() - t0
    summary = {"objective": cfg.objective, "mode": cfg.mode, "steps": len(records),
               "final_loss": records[-1]["loss"], "train_seconds": seconds,
               "train_accuracy": accuracy(head, feats, pairs.chosen, pairs.rejected, train_rows),
               "eval_accuracy": accuracy(head, feats, pairs.chosen, pairs.rejected, eval_rows),
               "train_pairs": len(train_rows), "eval_pairs": len(eval_rows), **info}
    log.info("head_only %s: %d steps in %.2fs, eval accuracy %.3f", cfg.objective, len(records), seconds,
             summary["eval_accuracy"])
    meta = {"backbone": cfg.model, "backbone_identity": model_identity_digest(cfg.model), "tau": cfg.temperature,
            "mode": cfg.mode, "eval_accuracy": summary["eval_accuracy"]}
    if cfg.objective == "bt":
        lm, tok = load_causal_lm(cfg.model, device="cpu", dtype="float32")
        io.save_bt(out, lm, tok, head, meta)
    else:
        io.save_gpm(out, head, meta)
    write_json({"config": asdict(cfg), "data": pairs.stats, **summary}, out / "run.json")
    return summary


def config_from(values: dict, where: str) -> PrefModelConfig:
    cfg = build_config(PrefModelConfig, values, where=where)
    check(cfg)
    return cfg


def main(argv: list[str]) -> int:
    """``prefdata train-rm``: settings from a YAML config, then flags, then ``--set``."""
    from prefdata.train.config import parse_set, read_recipe
    from prefdata.train.trainer import configure_logging

    p = argparse.ArgumentParser(prog="prefdata train-rm", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="pair parquet (prompt, chosen, rejected)")
    p.add_argument("--model", help="backbone: HF id, local path or smollm2-135m-instruct")
    p.add_argument("--objective", choices=["bt", "gpm"])
    p.add_argument("--mode", choices=["head_only", "full"])
    p.add_argument("--output", help="model folder (also run.json, log.jsonl, checkpoints)")
    p.add_argument("--config", help="YAML file of settings (a mapping, optionally under 'train_rm:')")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    try:
        values = read_recipe(args.config) if args.config else {}
        if set(values) == {"train_rm"}:
            values = values["train_rm"]
        values.update({k: getattr(args, k) for k in ("data", "model", "objective", "mode", "output")
                       if getattr(args, k) is not None})
        values.update(parse_set(args.set))
        summary = train(config_from(values, args.config or "command line"), args.resume, args.overwrite)
    except (DataError, ValueError, TypeError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"prefdata train-rm: error: {exc}", file=sys.stderr)
        return 2
    print(f"eval accuracy {summary.get('eval_accuracy', float('nan')):.4f} -> {summary.get('output', args.output)}")
    return 0
