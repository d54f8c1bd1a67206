"""``full`` mode: fine-tune backbone and head together, with the trainer's checkpoints.

Each step featurises the distinct responses of a batch of pairs with the backbone
(features.forward_features, gradients on) and applies the head's loss. Checkpoints are
prefdata.train.checkpoints' (safetensors weights, optimizer, scheduler, RNG state, data
position), so a killed run resumed with ``--resume`` takes exactly the next step it
would have taken; a resume is refused when the data, backbone or settings differ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prefdata.io import write_json
from prefdata.prefmodel.features import forward_features, token_ids
from prefdata.train.checkpoints import (load_checkpoint, new_run_id, open_run_folder, read_state,
                                        save_checkpoint)
from prefdata.train.data import epoch_batches

log = logging.getLogger("prefdata.prefmodel")


class BackboneAndHead(nn.Module):
    def __init__(self, lm, head):
        super().__init__()
        self.lm, self.head = lm, head


def _identity(cfg, pairs, ids) -> dict:
    import hashlib

    from prefdata.models.identity import model_identity_digest

    h = hashlib.sha256()
    for p, t in ids:
        h.update(np.asarray(p + [-1] + t, dtype=np.int64).tobytes())
    h.update(np.asarray([pairs.chosen, pairs.rejected], dtype=np.int64).tobytes())
    return {"data_fingerprint": h.hexdigest()[:16], "backbone": model_identity_digest(cfg.model)}


def _check_resumable(ckpt: Path, cfg, identity: dict) -> None:
    from prefdata.prefmodel.train import RESUMABLE

    state = read_state(ckpt)
    problems = [f"{k} differs: checkpoint {state['identity'].get(k)!r}, now {v!r}"
                for k, v in identity.items() if state["identity"].get(k) != v]
    now = asdict(cfg)
    problems += [f"setting {k} changed: {state['config'].get(k)!r} -> {now[k]!r}"
                 for k in sorted(now) if k not in RESUMABLE and state["config"].get(k) != now[k]]
    if problems:
        raise ValueError(f"cannot resume from {ckpt}: " + "; ".join(problems)
                         + ". Resume with the same data, backbone and settings, or use another --output")


def train_full(cfg, pairs, train_rows, eval_rows, out: Path, resume: bool, overwrite: bool,
               stop_after: int | None, on_step) -> dict:
    from tqdm.auto import tqdm

    from prefdata.models.hub import load_causal_lm
    from prefdata.prefmodel import io
    from prefdata.prefmodel.train import make_head, pair_logits, pair_loss
    from prefdata.train.trainer import RunLog, disable_dropout, seed_everything

    ckpt = open_run_folder(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    lm, tok = load_causal_lm(cfg.model, device=cfg.device, dtype="float32")
    disable_dropout(lm)
    ids = [token_ids(tok, c, t) for c, t in zip(pairs.conversations, pairs.texts)]
    identity = _identity(cfg, pairs, ids)
    if ckpt is not None:
        _check_resumable(ckpt, cfg, identity)
    run = {"run_id": read_state(ckpt)["run_id"] if ckpt else new_run_id(), "identity": identity}
    model = BackboneAndHead(lm, make_head(cfg, lm.config.hidden_size)).to(cfg.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lengths = np.array([len(ids[c][0]) + len(ids[c][1]) + len(ids[r][1]) for c, r in zip(pairs.chosen, pairs.rejected)])
    per_epoch = max(1, math.ceil(len(train_rows) / cfg.batch_size))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    margin = None if pairs.margin is None else torch.as_tensor(pairs.margin)

    def forward(rows: np.ndarray):
        items = np.unique(np.concatenate([pairs.chosen[rows], pairs.rejected[rows]]))
        where = {int(it): k for k, it in enumerate(items)}
        h, hp = forward_features(model.lm.base_model, [ids[i] for i in items], cfg.device, pad)
        c = torch.tensor([where[int(i)] for i in pairs.chosen[rows]])
        r = torch.tensor([where[int(i)] for i in pairs.rejected[rows]])
        return h[c], h[r], hp[c]

    step = 0
    if ckpt is not None:
        step, _ = load_checkpoint(ckpt, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, step)
    run_log = RunLog(out, cfg, resume_step=step if ckpt else None)
    write_json({"config": asdict(cfg), **run, "total_steps": total}, out / "run.json")
    model.train()
    bar = tqdm(total=total, initial=step, desc="train-rm", unit="step", disable=not cfg.progress)
    while step < total:
        batch = epoch_batches(train_rows, lengths, cfg.batch_size, cfg.seed, step // per_epoch)[step % per_epoch]
        hc, hr, hp = forward(batch)
        loss = pair_loss(model.head, hc, hr, hp, cfg.temperature, None if margin is None else margin[batch]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        record = {"step": step, "loss": float(loss.detach())}
        bar.update(1)
        if on_step is not None:
            on_step(record)
        if step % cfg.log_every == 0 or step == total:
            run_log.write(record)
        if (cfg.save_every and step % cfg.save_every == 0) or step == total:
            save_checkpoint(out, step, model, optimizer, scheduler, cfg, {}, run)
        if stop_after is not None and step >= stop_after:
            bar.close()
            run_log.close()
            return {"step": step, "stopped": True}
    bar.close()
    model.eval()
    with torch.no_grad():
        correct = sum(int((pair_logits(model.head, *forward(eval_rows[i:i + cfg.batch_size])) > 0).sum())
                      for i in range(0, len(eval_rows), cfg.batch_size))
    acc = correct / len(eval_rows) if len(eval_rows) else float("nan")
    run_log.write({"step": step, "eval/accuracy": acc})
    run_log.close()
    meta = {"backbone": ".", "backbone_identity": None, "tau": cfg.temperature, "mode": "full", "eval_accuracy": acc}
    if cfg.objective == "bt":
        io.save_bt(out, model.lm, tok, model.head, meta)
    else:
        io.save_gpm(out, model.head, meta, causal_lm=model.lm, tokenizer=tok)
    return {"step": step, "stopped": False, "eval_accuracy": acc, "objective": cfg.objective, "mode": "full"}
