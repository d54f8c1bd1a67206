"""Train a causal LM on the pipeline's preference data: setup, data, loop, eval, checkpoint.

One pair (or ranked list) is one packed sequence — the prompt once, then every response
(prefix sharing, see packing.py) — so a batch costs no padding and no reference forward:
reference log-probs come from a cache computed once (reference.py). Losses are in
losses.py. Checkpoints hold safetensors weights, optimizer, scheduler, RNG states and the
data position; ``--resume`` continues exactly where the last one left off.

    prefdata train --data out/pairs.parquet --model smollm2-135m-instruct --loss dpo
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from prefdata.io import write_json
from prefdata.models.hub import load_causal_lm, resolve
from prefdata.train import losses
from prefdata.train.config import RESUMABLE_CHANGES, TrainConfig, as_dict, config_from, parse_set, read_recipe
from prefdata.train.data import DataError, epoch_batches, load_examples, micro_batches, split_eval
from prefdata.train.packing import collate, response_logps
from prefdata.train.reference import reference_logps

log = logging.getLogger("prefdata.train")


def main(argv: list[str]) -> int:
    """``prefdata train``: settings from a YAML recipe, then the flags, then ``--set``."""
    p = argparse.ArgumentParser(prog="prefdata train", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="pair or list parquet")
    p.add_argument("--model", help="HF id, local path or smollm2-135m-instruct")
    p.add_argument("--loss", help=f"one of {', '.join(losses.LOSSES)}")
    p.add_argument("--output", help="run folder (checkpoints, log.jsonl, final model)")
    p.add_argument("--config", help="YAML recipe of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field, e.g. --set lr=5e-7 (repeatable)")
    args = p.parse_args(argv)
    try:
        values = read_recipe(args.config) if args.config else {}
        values.update({k: getattr(args, k) for k in ("data", "model", "loss", "output")
                       if getattr(args, k) is not None})
        values.update(parse_set(args.set))
        cfg = config_from(values, where=args.config or "prefdata train")
        train(cfg, resume=args.resume)
    except (DataError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"prefdata train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, on_step=None) -> dict:
    """Run training; returns a summary.

    ``stop_after`` ends the run after that step (tests use it as a crash); ``on_step`` is
    called with each step's record after the optimizer step (benchmarks time it).
    """
    # ---- setup -------------------------------------------------------------------------
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    seed_everything(cfg.seed)
    bf16 = cfg.precision == "bf16"
    autocast = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        print(f"prefdata train: no checkpoint under {out}/checkpoints; starting from step 0")
    if ckpt is not None:
        check_resumable(ckpt, cfg)
    run_log = RunLog(out, cfg, resume_step=read_state(ckpt)["step"] if ckpt else None)

    # ---- data --------------------------------------------------------------------------
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model))
    examples = load_examples(cfg.data, tokenizer, cfg.max_length, cfg.max_prompt_length)
    check_data_fits_loss(examples, cfg)
    train_idx, eval_idx = split_eval(len(examples), cfg.eval_fraction, cfg.eval_max, cfg.seed)
    lengths = examples.lengths()
    st = examples.stats
    print(f"data: {len(examples)} {examples.kind} -> {len(train_idx)} train, {len(eval_idx)} eval; truncated "
          f"{st['prompts_truncated']} prompts and {st['responses_truncated']} responses ({st['tokens_cut']} tokens "
          f"cut); packed length mean {st['mean_packed_tokens']:.0f}, max {st['max_packed_tokens']}")
    batches_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))

    # ---- model, and reference log-probs while the weights are still the initial ones -----
    model, tokenizer = load_policy(cfg.model, cfg, device)
    ref = None
    info = {"reference_cache": "not needed"}
    if cfg.loss not in losses.REFERENCE_FREE:
        ref, info = reference_logps(examples, cfg, model, device, autocast,
                                    lambda name: load_policy(name, cfg, device)[0])
        print(f"reference log-probs: cache {info['reference_cache']} ({info['reference_cache_path']})")
    write_json({"config": as_dict(cfg), "data": examples.stats, "data_fingerprint": examples.fingerprint,
                "train_examples": len(train_idx), "eval_examples": len(eval_idx), "total_steps": total_steps,
                **info}, out / "run.json")
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- optimizer and schedule: linear warmup, then cosine ------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device != "mps")
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    # ---- resume ------------------------------------------------------------------------
    step, baseline = 0, None
    if ckpt is not None:
        step, baseline = load_checkpoint(ckpt, cfg, model, optimizer, scheduler)
        print(f"resumed from {ckpt} at step {step}")

    def batch_at(g: int) -> np.ndarray:
        return epoch_batches(train_idx, lengths, cfg.batch_size, cfg.seed, g // batches_per_epoch,
                             cfg.group_by_length)[g % batches_per_epoch]

    def forward(idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        """Per-example losses, rewards and log-probs of one micro-batch."""
        batch = collate([examples.row(i) for i in idx], pad_id=tokenizer.pad_token_id or 0)
        with autocast():
            logps, n_tokens = response_logps(model, batch, device)
        valid = n_tokens > 0
        ref_b = None if ref is None else torch.nan_to_num(torch.tensor(ref[idx], dtype=torch.float32, device=device))
        scores = None if examples.scores is None else pad_rows([examples.scores[i] for i in idx], logps)
        flip = None if examples.flip_prob is None else torch.tensor([examples.flip_prob[i] for i in idx], device=device)
        loss = losses.compute_loss(cfg, logps, n_tokens, valid, ref_b, scores, flip)
        rew = losses.rewards(cfg.loss, logps, n_tokens, ref_b, cfg.beta, cfg.simpo_beta)
        return loss, {"rewards": rew.detach(), "logps": logps.detach(), "valid": valid}

    def evaluate() -> dict:
        if len(eval_idx) == 0:
            return {}
        model.eval()
        parts, loss_sum = [], 0.0
        with torch.no_grad():
            for idx in micro_batches(eval_idx, lengths, cfg.ref_batch_size):
                loss, stats = forward(idx)
                loss_sum += loss.sum().item()
                parts.append(stats)
        model.train()
        return {"eval/loss": loss_sum / len(eval_idx), **{f"eval/{k}": v for k, v in summarize(parts).items()}}

    # ---- loop --------------------------------------------------------------------------
    model.train()
    model.config.use_cache = False
    if baseline is None:
        baseline = evaluate()
        if baseline:
            run_log.write({"step": 0, **baseline})
    warned = False
    pairs_per_step = cfg.batch_size * cfg.grad_accum
    while step < total_steps:
        t0 = time.perf_counter()
        parts, loss_sum, n_seen = [], 0.0, 0
        for a in range(cfg.grad_accum):
            batch = batch_at(step * cfg.grad_accum + a)
            for idx in micro_batches(batch, lengths, cfg.micro_batch_size):
                loss, stats = forward(idx)
                (loss.sum() / (len(batch) * cfg.grad_accum)).backward()
                loss_sum += loss.detach().sum().item() / len(batch)
                parts.append(stats)
            n_seen += len(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        record = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr, "grad_norm": float(grad_norm),
                  **summarize(parts), "seconds": seconds, "examples_per_s": n_seen / seconds,
                  "epoch": step * cfg.grad_accum / batches_per_epoch}
        if on_step is not None:
            on_step(record)
        if step % cfg.log_every == 0 or step == total_steps:
            run_log.write(record)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            metrics = evaluate()
            if metrics:
                metrics.update(displacement(metrics, baseline))
                run_log.write({"step": step, **metrics})
                if not warned and metrics.get("eval/likelihood_displacement"):
                    warned = True
                    print(f"warning: the chosen log-prob fell {-metrics['eval/chosen_logp_change']:.2f} nats "
                          "below its start while the margin grew (likelihood displacement, Razin et al. "
                          "2024); consider --loss rpo or filtering pairs by CHES")
        if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
            save_checkpoint(out, step, model, optimizer, scheduler, cfg, baseline)
        if stop_after is not None and step >= stop_after:
            run_log.close()
            return {"step": step, "stopped": True, **info}

    # ---- final model: loads with AutoModelForCausalLM.from_pretrained(output) -------------
    save_final(out, model, tokenizer)
    run_log.close()
    print(f"done: {step} steps, {pairs_per_step} examples per step; model saved to {out}")
    return {"step": step, "stopped": False, **info}


# ---- helpers, in the order the loop uses them ----------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_data_fits_loss(examples, cfg: TrainConfig) -> None:
    if examples.kind == "lists" and cfg.loss not in losses.LIST_LOSSES:
        raise DataError(f"{cfg.data} holds ranked lists; '{cfg.loss}' needs pairs. Use --loss pro, "
                        "or build pairs with the pipeline's build step")
    if cfg.loss == "rdpo" and cfg.rdpo_eps is None and examples.flip_prob is None:
        raise DataError(f"{cfg.data}: rdpo with a per-pair ε needs a complete 'flip_prob' column (the "
                        "noise step writes it); none found. Or set rdpo_eps for one global flip rate")


def load_policy(name: str, cfg: TrainConfig, device: str):
    """(model, tokenizer) in fp32 (bf16 runs under autocast) with the attention prefix sharing needs."""
    model, tokenizer = load_causal_lm(name, device=device, dtype="float32")
    model.set_attn_implementation(cfg.attn_implementation)
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{name}: models with logit soft-capping are not supported by the packed LM head")
    return model, tokenizer


def pad_rows(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def summarize(parts: list[dict]) -> dict:
    """Reward accuracy (best beats each other response), margin, and log-prob means."""
    width = max(p["rewards"].shape[1] for p in parts)

    def cat(key):
        return torch.cat([torch.nn.functional.pad(p[key].float(), (0, width - p[key].shape[1])) for p in parts])

    rew, logps, others = cat("rewards"), cat("logps"), cat("valid")[:, 1:].bool()
    wins = (rew[:, :1] > rew[:, 1:]) & others
    margin = (rew[:, :1] - rew[:, 1:]) * others
    n = others.sum().clamp(min=1)
    return {"reward_accuracy": (wins.sum() / n).item(), "margin": (margin.sum() / n).item(),
            "chosen_logp": logps[:, 0].mean().item(),
            "rejected_logp": ((logps[:, 1:] * others).sum() / n).item()}


def displacement(metrics: dict, baseline: dict) -> dict:
    """Chosen/rejected log-prob change since step 0: the likelihood-displacement monitor."""
    if "eval/chosen_logp" not in baseline:
        return {}
    dc = metrics["eval/chosen_logp"] - baseline["eval/chosen_logp"]
    dr = metrics["eval/rejected_logp"] - baseline["eval/rejected_logp"]
    grew = metrics["eval/margin"] > baseline["eval/margin"]
    return {"eval/chosen_logp_change": dc, "eval/rejected_logp_change": dr,
            "eval/likelihood_displacement": bool(dc < 0 and grew)}


class RunLog:
    """Step records to stdout and <output>/log.jsonl; TensorBoard and W&B when asked."""

    def __init__(self, out: Path, cfg: TrainConfig, resume_step: int | None):
        self.path = out / "log.jsonl"
        if resume_step is not None and self.path.exists():  # drop what the crashed run wrote later
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None:
            self.path.write_text("")
        self.file = open(self.path, "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("wandb=true needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=as_dict(cfg), dir=str(out), resume="allow")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                           if k not in ("seconds", "epoch"))
        print(shown, flush=True)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ---- checkpoints: safetensors + JSON, written to a temp folder then renamed ------------------


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, baseline: dict) -> Path:
    folder = out / "checkpoints"
    final, tmp = folder / f"step-{step:07d}", folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    np_state = np.random.get_state()
    state = {"step": step, "config": as_dict(cfg), "baseline": baseline,
             "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
             "rng_python": random.getstate(),
             "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[: -cfg.keep_checkpoints or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    saved, now = read_state(ckpt)["config"], as_dict(cfg)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"cannot resume from {ckpt}: {', '.join(f'{k} {saved.get(k)!r} -> {now[k]!r}' for k in changed)} "
                         "changed; resume with the same settings, or start a new run in another --output")


def load_checkpoint(ckpt: Path, cfg: TrainConfig, model, optimizer, scheduler) -> tuple[int, dict]:
    state = read_state(ckpt)
    load_model(model, str(ckpt / "model.safetensors"))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("rng."):
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["rng_numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return state["step"], state["baseline"]


def save_final(out: Path, model, tokenizer) -> None:
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
