"""Train a causal LM on the pipeline's preference data: setup, data, loop, eval, checkpoint.

One pair (or ranked list) is one packed sequence — the prompt once, then every response
(prefix sharing, see packing.py; checked against the model's own forward at start, see
verify.py) — so a batch costs no padding and no reference forward: reference log-probs
come from a cache computed once (reference.py). Losses are in losses.py; rDPO's ε is
decided in robust.py; checkpoints and run identity in checkpoints.py. ``--resume``
continues exactly where the last checkpoint left off, and only the same run.

    prefdata train --data out/pairs.parquet --model smollm2-135m-instruct --loss dpo
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prefdata.io import write_json, write_text
from prefdata.models.hub import load_causal_lm, resolve
from prefdata.train import losses, robust
from prefdata.train.adapters import add_lora, require_peft
from prefdata.train.checkpoints import (check_resumable, checkpoint_path, load_checkpoint, load_weights, new_run_id,
                                        open_run_folder, read_state, run_identity, save_checkpoint, save_final)
from prefdata.train.config import TrainConfig, as_dict, config_from, parse_set, read_recipe
from prefdata.train.distributed import Ranks
from prefdata.train.early_stopping import EarlyStopping
from prefdata.train.data import (DataError, curriculum_batches, epoch_batches, load_examples, micro_batches,
                                 require_label_prob, split_eval, with_ld_prefix)
from prefdata.train.reference import check_same_tokenizer, reference_logps
from prefdata.train.verify import choose_logps

log = logging.getLogger("prefdata.train")


def set_keys_help() -> str:
    """The ``--set`` keys with their defaults, from the TrainConfig dataclass."""
    import dataclasses

    from prefdata.train.config import TrainConfig

    lines = ["--set keys (TrainConfig fields) and their defaults:"]
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"  {f.name} = {default!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``prefdata train``: settings from a YAML recipe, then the flags, then ``--set``."""
    p = argparse.ArgumentParser(prog="prefdata train", description=__doc__.split("\n")[0],
                                epilog=set_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="pair or list parquet")
    p.add_argument("--model", help="HF id, local path or smollm2-135m-instruct")
    p.add_argument("--loss", help=f"one of {', '.join(losses.LOSSES)}")
    p.add_argument("--output", help="run folder (checkpoints, log.jsonl, final model)")
    p.add_argument("--config", help="YAML recipe of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output that holds another run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field, e.g. --set lr=5e-7 (repeatable)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the trained model when done (HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    args = p.parse_args(argv)
    configure_logging(args.verbose)
    try:
        values = read_recipe(args.config) if args.config else {}
        values.update({k: getattr(args, k) for k in ("data", "model", "loss", "output")
                       if getattr(args, k) is not None})
        values.update(parse_set(args.set))
        cfg = config_from(values, where=args.config or "command line")
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
        if args.push_to_hub and summary.get("main_process", True):
            from prefdata.train.publish import push_model

            log.info("pushed to %s", push_model(cfg.output, args.push_to_hub, private=args.private))
    except (DataError, ValueError, TypeError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"prefdata train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def configure_logging(verbose: bool = False) -> None:
    """As ``prefdata run`` does (cli.py): INFO (DEBUG with -v), time, level and logger name;
    processes other than 0 of a multi-process run only warn."""
    quiet = int(os.environ.get("RANK", "0")) > 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          on_step=None) -> dict:
    """Run training; returns a summary.

    ``stop_after`` ends the run after that step (tests use it as a crash); ``on_step`` is
    called with each step's record after the optimizer step (benchmarks time it).
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers import AutoTokenizer

    # ---- setup: refuse to mix runs before anything is loaded -----------------------------
    out = Path(cfg.output)
    if cfg.lora_r:
        require_peft()
    ranks = Ranks(cfg)
    ckpt = open_run_folder(out, resume, overwrite, delete=ranks.main)
    ranks.barrier()
    out.mkdir(parents=True, exist_ok=True)
    device = ranks.device or (("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    seed_everything(cfg.seed)
    bf16 = cfg.precision == "bf16"
    autocast = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    # ---- data --------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model))
    if cfg.reference not in (None, cfg.model) and cfg.loss not in losses.REFERENCE_FREE:
        check_same_tokenizer(tokenizer, cfg.reference, cfg.model)
    examples = load_examples(cfg.data, tokenizer, cfg.max_length, cfg.max_prompt_length)
    check_data_fits_loss(examples, cfg)
    examples, rdpo_eps, rdpo_info = (robust.prepare(examples, cfg) if cfg.rdpo_eps != "label_prob"
                                     else (examples, None, {"rdpo_eps_source": "label_prob"}))
    examples = loss_data(examples, cfg)
    identity = run_identity(cfg, examples.fingerprint, {"rdpo_eps": rdpo_info.get("rdpo_eps")})
    if ckpt is not None:
        check_resumable(ckpt, cfg, identity)
    run = {"run_id": read_state(ckpt).get("run_id") if ckpt else new_run_id(), "identity": identity}
    train_idx, eval_idx = split_eval(examples.groups, cfg.eval_fraction, cfg.eval_max, cfg.seed)
    lengths = examples.lengths()
    curriculum = use_curriculum(cfg, examples)

    def epoch_plan(epoch: int) -> list[np.ndarray]:
        if curriculum:
            return curriculum_batches(train_idx, examples.iteration, examples.order, cfg.batch_size, cfg.seed,
                                      epoch, cfg.curriculum_shuffle)
        return epoch_batches(train_idx, lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)

    batches_per_epoch = len(epoch_plan(0))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    st = examples.stats
    log.info("data: %d %s -> %d train, %d eval (split by prompt); truncated %d prompts and %d responses "
             "(%d tokens cut); packed length mean %.0f, max %d; order: %s", len(examples), examples.kind,
             len(train_idx), len(eval_idx), st["prompts_truncated"], st["responses_truncated"], st["tokens_cut"],
             st["mean_packed_tokens"], st["max_packed_tokens"],
             f"curriculum, {len(np.unique(examples.iteration))} iterations" if curriculum else "shuffled")

    # ---- model, checked packing, and reference log-probs while the weights are the initial ones
    model, tokenizer = load_policy(cfg.model, cfg, device)
    logps_fn, pack_info = choose_logps(model, cfg.model, examples, cfg.packing, device)

    def load_reference(name: str):
        ref_model = load_policy(name, cfg, device)[0]
        return ref_model, choose_logps(ref_model, name, examples, cfg.packing, device)[0]

    ref = None
    info = {"reference_cache": "not needed", **pack_info, **rdpo_info}
    if cfg.loss not in losses.REFERENCE_FREE:
        if not ranks.main:
            ranks.barrier()  # process 0 computes and caches, then the others read the cache
        ref, ref_info = reference_logps(examples, cfg, model, device, autocast, load_reference, logps_fn)
        if ranks.main:
            ranks.barrier()
        info.update(ref_info)
        log.info("reference log-probs: cache %s (%s)", info["reference_cache"], info["reference_cache_path"])
    if ranks.main:
        write_json({"config": as_dict(cfg), "data": examples.stats, **run, "train_examples": len(train_idx),
                    "eval_examples": len(eval_idx), "total_steps": total_steps, "processes": ranks.world, **info},
                   out / "run.json")
    if cfg.lora_r:  # after the reference pass: the reference is the base without the adapter
        model = add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)

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
        step, baseline = load_checkpoint(ckpt, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, step)
    stopper = EarlyStopping.from_config(cfg.early_stopping, read_state(ckpt).get("early_stopping") if ckpt else None)
    run_log = RunLog(out, cfg, resume_step=step if ckpt else None, enabled=ranks.main)

    def batch_at(g: int) -> np.ndarray:
        return epoch_plan(g // batches_per_epoch)[g % batches_per_epoch]

    def forward(idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        """Per-example losses, rewards and log-probs of one micro-batch."""
        with autocast():
            logps, n_tokens = logps_fn(model, [examples.row(i) for i in idx], device)
        valid = n_tokens > 0
        ref_b = None if ref is None else torch.nan_to_num(torch.tensor(ref[idx], dtype=torch.float32, device=device))
        scores = None if examples.scores is None else pad_rows([examples.scores[i] for i in idx], logps)
        flip = None if examples.flip_prob is None else torch.tensor([examples.flip_prob[i] for i in idx], device=device)
        soft = None if examples.label_prob is None else torch.tensor([examples.label_prob[i] for i in idx],
                                                                   device=device)
        loss = losses.compute_loss(cfg, logps, n_tokens, valid, ref_b, scores, flip, rdpo_eps, soft)
        rew = losses.rewards(cfg.loss, logps, n_tokens, ref_b, cfg.beta, cfg.simpo_beta, cfg.ld_alpha)
        k = rew.shape[1]  # ld_dpo's third (prefix) response is no response of its own
        return loss, {"rewards": rew.detach(), "logps": logps.detach()[:, :k], "valid": valid[:, :k]}

    def evaluate() -> dict:
        if len(eval_idx) == 0 or not ranks.main:
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
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (cfg.progress and ranks.main))
    with logging_redirect_tqdm():
        if baseline is None:
            baseline = evaluate()
            if baseline:
                run_log.write({"step": 0, **baseline})
        warned = False
        while step < total_steps and not (stopper and stopper.stopped):
            t0 = time.perf_counter()
            parts, loss_sum, n_seen = [], 0.0, 0
            for a in range(cfg.grad_accum):
                batch = batch_at(step * cfg.grad_accum + a)
                for idx in micro_batches(ranks.shard(batch), lengths, cfg.micro_batch_size):
                    loss, stats = forward(idx)
                    (loss.sum() / (len(batch) * cfg.grad_accum)).backward()
                    loss_sum += loss.detach().sum().item() / len(batch)
                    parts.append(stats)
                n_seen += len(batch)
            ranks.sum_gradients(params)
            loss_sum, parts = ranks.sum(loss_sum), ranks.gather(parts)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            record = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr, "grad_norm": float(grad_norm),
                      **summarize(parts), "seconds": seconds, "examples_per_s": n_seen / seconds,
                      "epoch": step * cfg.grad_accum / batches_per_epoch}
            if curriculum:
                record["iteration"] = int(examples.iteration[batch[-1]])
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if on_step is not None:
                on_step(record)
            if step % cfg.log_every == 0 or step == total_steps:
                run_log.write(record)
            best_now = False
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
                metrics = evaluate()
                if stopper is not None:
                    best_now = stop_or_best(stopper, step, metrics, ranks)
                if metrics:
                    metrics.update(displacement(metrics, baseline))
                    run_log.write({"step": step, **metrics})
                    if not warned and metrics.get("eval/likelihood_displacement"):
                        warned = True
                        log.warning("the chosen log-prob fell %.2f nats below its start while the margin grew "
                                    "(likelihood displacement, Razin et al. 2024); consider --loss rpo or "
                                    "filtering pairs by CHES", -metrics["eval/chosen_logp_change"])
            if ((cfg.save_every and step % cfg.save_every == 0) or step == total_steps or best_now
                    or (stopper and stopper.stopped)):
                if ranks.main:
                    save_checkpoint(out, step, model, optimizer, scheduler, cfg, baseline, run,
                                    stopper.state() if stopper else None)
                ranks.barrier()
            if stop_after is not None and step >= stop_after:
                bar.close()
                run_log.close()
                return {"step": step, "stopped": True, **info}
    bar.close()

    # ---- final model: loads with AutoModelForCausalLM.from_pretrained(output) -------------
    selected = select_best(stopper, step, model, out)
    if selected:
        run_log.write({"step": step, **selected})
    if ranks.main:
        save_final(out, model, tokenizer)
    ranks.barrier()
    run_log.close()
    log.info("done: %d steps, %d examples per step; model saved to %s", step, cfg.batch_size * cfg.grad_accum, out)
    return {"step": step, "stopped": False, "main_process": ranks.main, **selected, **info}


# ---- helpers, in the order the loop uses them ----------------------------------------------


def stop_or_best(stopper: EarlyStopping, step: int, metrics: dict, ranks: Ranks) -> bool:
    """Record an eval with early stopping; True when it is the best so far (save it). Process
    0 evaluates and decides; the others follow its decision."""
    best = stopper.update(step, metrics)
    best, stopped = ranks.sum(float(best)) > 0, ranks.sum(float(stopper.stopped)) > 0
    stopper.stopped = stopped
    if best:
        log.info("early stopping: new best eval/%s %.4g at step %d", stopper.metric, stopper.best_value or 0.0, step)
    elif stopped:
        log.info("early stopping at step %d: no better eval/%s for %d eval(s); the final model is step %d's "
                 "(eval/%s %.4g)", step, stopper.metric, stopper.patience, stopper.best_step, stopper.metric,
                 stopper.best_value)
    return best


def select_best(stopper: EarlyStopping | None, step: int, model, out: Path) -> dict:
    """With early stopping, load the best checkpoint's weights (kept by rotation) into the
    model before it is saved as the final one; what was selected, for the summary."""
    if stopper is None or stopper.best_step is None:
        return {}
    if stopper.best_step != step:
        load_weights(model, checkpoint_path(out, stopper.best_step) / "model.safetensors")
    return {"early_stopped": stopper.stopped, "best_step": stopper.best_step,
            "best_metric": f"eval/{stopper.metric}", "best_value": stopper.best_value}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_data_fits_loss(examples, cfg: TrainConfig) -> None:
    if examples.kind == "lists" and cfg.loss not in losses.LIST_LOSSES:
        raise DataError(f"{cfg.data} holds ranked lists; '{cfg.loss}' needs pairs. Use --loss pro, "
                        "or build pairs with the pipeline's build step")


def loss_data(examples, cfg: TrainConfig):
    """What a loss reads beyond the pairs: per-pair soft labels, LD-DPO's prefixes."""
    if "label_prob" in (cfg.label_smoothing if cfg.loss == "cdpo" else None,
                        cfg.rdpo_eps if cfg.loss == "rdpo" else None):
        require_label_prob(examples, cfg, cfg.data)
    return with_ld_prefix(examples) if cfg.loss == "ld_dpo" else examples


def use_curriculum(cfg: TrainConfig, examples) -> bool:
    """Curriculum order when asked, or by default when the data has it."""
    has = examples.order is not None
    if cfg.order == "curriculum" and not has:
        raise DataError(f"{cfg.data}: order: curriculum needs the 'curriculum_order' and 'iteration' columns "
                        "(the curriculum step writes them); none found. Use order: shuffle")
    return cfg.order == "curriculum" or (cfg.order == "auto" and has)


def load_policy(name: str, cfg: TrainConfig, device: str):
    """(model, tokenizer) in fp32 (bf16 runs under autocast), dropout off unless kept."""
    model, tokenizer = load_causal_lm(name, device=device, dtype="float32")
    model.set_attn_implementation(cfg.attn_implementation)
    if not cfg.keep_dropout:
        disable_dropout(model)
    return model, tokenizer


def disable_dropout(model) -> int:
    """Dropout off everywhere (as TRL does): the log-prob of a response should not depend on
    a random mask, or the policy and the cached reference disagree at step 0. Covers
    ``nn.Dropout`` modules and the float rates attention layers read in their forward."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        for attr in ("attention_dropout", "dropout", "hidden_dropout", "attn_dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and value and not isinstance(module, torch.nn.Dropout):
                setattr(module, attr, 0.0)
                changed += 1
    return changed


def enable_gradient_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl``; a line cut short by a kill is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s: a record cut short (a killed run?) is left out: %.60s", path, line)
    return records


class RunLog:
    """Step records to the log and <output>/log.jsonl; TensorBoard and W&B when asked."""

    def __init__(self, out: Path, cfg: TrainConfig, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = out / "log.jsonl", enabled
        self.file = self.tb = self.wandb = None
        if not enabled:  # another process of a multi-process run
            return
        if resume_step is not None and self.path.exists():  # drop what the crashed run wrote later
            keep = [json.dumps(r) for r in read_log(self.path) if r.get("step", 0) <= resume_step]
            write_text("".join(k + "\n" for k in keep), self.path)
        elif resume_step is None:
            write_text("", self.path)
        self.file = open(self.path, "a")
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
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        log.info(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                            if k not in ("seconds", "epoch")))
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
