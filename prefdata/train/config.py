"""Every training setting in one dataclass, built strictly from YAML and ``--set key=value``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from prefdata.step import build_config

Loss = Literal["dpo", "rpo", "rdpo", "cdpo", "ipo", "simpo", "pro", "sppo", "ld_dpo", "gpo"]


@dataclass
class TrainConfig:
    # what to train on, and where the run goes
    data: str = ""                      # pair or list parquet (the pipeline's output)
    model: str = ""                     # HF id, local path or "smollm2-135m-instruct"
    output: str = "out/train"           # checkpoints, log.jsonl, and the final model
    loss: Loss = "dpo"
    reference: str | None = None        # reference model; None: the initial policy
    ref_cache_dir: str | None = None    # None: <data dir>/.prefdata-cache

    # loss settings
    beta: float = 0.1                   # DPO-family β; IPO's τ
    rpo_alpha: float = 1.0              # weight of the chosen NLL in RPO
    rdpo_eps: float | str = "dataset"   # rDPO flip rate: "dataset" (the noise step's ε, from the
                                        # parquet metadata) | "per_pair" (flip_prob) | a number
    rdpo_eps_max: float = 0.45          # < 0.5; per-pair flip_prob above it: see rdpo_over_max
    rdpo_over_max: Literal["flip", "clip", "drop"] = "flip"  # flip: swap the pair (the ensemble
                                        # believes the label is wrong), p -> 1 - p
    label_smoothing: float | str = 0.1  # cDPO ε, or "label_prob": 1 − each pair's label_prob
    ld_alpha: float = 0.5               # LD-DPO: weight in [0, 1] of the longer response's excess tokens
    ipo_normalize: Literal["sum", "per_token"] = "sum"  # per_token: each log-ratio / its tokens (TRL)
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    pro_sft_weight: float = 0.05
    sppo_eta: float = 1000.0            # SPPO's (and GPO's) η: target log-ratio η(P̂ − ½); the reference code's 1/β

    # data
    max_length: int = 1024              # prompt + one response, in tokens
    max_prompt_length: int | None = None  # longer prompts keep their end
    eval_fraction: float = 0.05
    eval_max: int = 256                 # about this many eval examples at most (whole prompts)
    group_by_length: bool = True
    order: Literal["auto", "shuffle", "curriculum"] = "auto"  # auto: curriculum when the data has
                                        # curriculum_order/iteration (the curriculum step)
    curriculum_shuffle: bool = False    # shuffle within each curriculum iteration

    # optimisation
    batch_size: int = 4                 # examples per batch (loss = mean over the batch)
    grad_accum: int = 1                 # batches per optimizer step
    micro_batch_size: int = 1           # rows per forward pass (speed/memory only)
    ref_batch_size: int = 8             # rows per forward when computing reference log-probs
    epochs: float = 1.0
    max_steps: int | None = None        # overrides epochs
    lr: float = 1e-6
    min_lr_ratio: float = 0.0           # cosine decays to lr × min_lr_ratio
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0          # 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: autocast, fp32 master weights
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    packing: Literal["auto", "on", "off"] = "auto"  # prefix sharing, checked against unpacked log-probs
                                        # at start: auto falls back to unpacked, on refuses
    keep_dropout: bool = False          # False: dropout off in the policy (as TRL does)
    lora_r: int = 0                     # > 0: train a LoRA adapter of this rank (pip install prefdata[peft])
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | None = None  # None: every linear layer but the head
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    seed: int = 0

    # logging and checkpoints
    log_every: int = 1
    eval_every: int = 50                # 0: only at the start and the end
    early_stopping: dict | None = None  # {metric, patience, mode}: stop after `patience` evals without
                                        # improvement; the final model is the best eval's (early_stopping.py)
    save_every: int = 100               # 0: only at the end
    keep_checkpoints: int = 2
    progress: bool = True               # tqdm bars (reference pass, training steps)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "prefdata"


# Settings a resumed run may change; any other difference is an error. Not max_steps or
# epochs: the learning-rate schedule is laid out over the total, so changing it on resume
# would silently reshape the cosine.
RESUMABLE_CHANGES = {
    "log_every", "eval_every", "save_every", "keep_checkpoints", "progress",
    "tensorboard", "wandb", "wandb_project", "device", "ref_cache_dir", "ref_batch_size",
}
RDPO_EPS_MODES = ("dataset", "per_pair", "label_prob")


def config_from(values: dict, where: str = "train config") -> TrainConfig:
    """Build a TrainConfig, refusing unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(TrainConfig)
    clean = {k: _number_from_string(v, hints.get(k)) for k, v in values.items()}
    cfg = build_config(TrainConfig, clean, where=where)
    check(cfg)
    return cfg


def read_recipe(path: str | Path) -> dict:
    """A YAML recipe: a flat mapping of TrainConfig fields, optionally under a ``train:`` key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    if isinstance(doc, dict) and set(doc) == {"train"}:
        doc = doc["train"]
    if not isinstance(doc, dict):
        raise ValueError(f"recipe {path}: expected a mapping of training settings")
    return doc


def parse_set(items: list[str]) -> dict:
    """``key=value`` strings, values read as YAML scalars (``1e-6``, ``true``, ``null``)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    return out


def check(cfg: TrainConfig) -> None:
    """Reject settings that cannot work together, before anything is loaded."""
    if not cfg.data:
        raise ValueError("train config: 'data' is required (the pair or list parquet)")
    if not cfg.model:
        raise ValueError("train config: 'model' is required (HF id, local path or smollm2-135m-instruct)")
    positive = ["batch_size", "grad_accum", "micro_batch_size", "ref_batch_size", "max_length"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"train config: '{name}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"train config: 'max_steps' must be >= 1, got {cfg.max_steps}")
    if cfg.max_prompt_length is not None and not 0 < cfg.max_prompt_length < cfg.max_length:
        raise ValueError("train config: 'max_prompt_length' must be between 1 and max_length - 1")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"train config: 'eval_fraction' must be in [0, 1), got {cfg.eval_fraction}")
    if not 0.0 <= cfg.rdpo_eps_max < 0.5:
        raise ValueError(f"train config: 'rdpo_eps_max' must be in [0, 0.5), got {cfg.rdpo_eps_max}")
    if isinstance(cfg.rdpo_eps, str) and cfg.rdpo_eps not in RDPO_EPS_MODES:
        raise ValueError(f"train config: 'rdpo_eps' must be one of {list(RDPO_EPS_MODES)} or a number in "
                         f"[0, 0.5), got {cfg.rdpo_eps!r}")
    if not isinstance(cfg.rdpo_eps, str) and not 0.0 <= cfg.rdpo_eps <= cfg.rdpo_eps_max:
        raise ValueError(f"train config: 'rdpo_eps' must be in [0, rdpo_eps_max={cfg.rdpo_eps_max}], "
                         f"got {cfg.rdpo_eps}")
    if isinstance(cfg.label_smoothing, str) and cfg.label_smoothing != "label_prob" or not isinstance(
            cfg.label_smoothing, str) and not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"train config: 'label_smoothing' must be in [0, 0.5) or 'label_prob' (each pair's "
                         f"soft label from build_pairs), got {cfg.label_smoothing!r}")
    if not 0.0 <= cfg.ld_alpha <= 1.0:
        raise ValueError(f"train config: 'ld_alpha' must be in [0, 1] (LD-DPO's weight of the longer "
                         f"response's excess tokens; 1 is DPO), got {cfg.ld_alpha}")
    if cfg.beta <= 0 or cfg.simpo_beta <= 0:
        raise ValueError("train config: 'beta' and 'simpo_beta' must be > 0")
    check_schedule(cfg)
    check_early_stopping(cfg)


def check_early_stopping(cfg: TrainConfig) -> None:
    """Early stopping needs held-out pairs and evals during the run, not only at the end."""
    from prefdata.train.early_stopping import parse

    if parse(cfg.early_stopping) is None:
        return
    if cfg.eval_fraction <= 0:
        raise ValueError("train config: 'early_stopping' needs eval pairs: set 'eval_fraction' > 0 "
                         f"(it is {cfg.eval_fraction})")
    if cfg.eval_every < 1:
        raise ValueError("train config: 'early_stopping' needs evals during training: set 'eval_every' >= 1 "
                         "(0 evaluates only at the start and the end)")


def check_schedule(cfg: TrainConfig) -> None:
    """Settings that would only fail (or silently do nothing) mid-run."""
    at_least = {"log_every": 1, "keep_checkpoints": 1, "eval_every": 0, "save_every": 0, "eval_max": 0}
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            what = {"log_every": "; 1 logs every step", "keep_checkpoints": "; the newest checkpoint is always kept",
                    "eval_every": "; 0 evaluates at the start and the end only",
                    "save_every": "; 0 saves at the end only"}.get(name, "")
            raise ValueError(f"train config: '{name}' must be >= {low}, got {getattr(cfg, name)}{what}")
    if cfg.lr <= 0:
        raise ValueError(f"train config: 'lr' must be > 0, got {cfg.lr}")
    if cfg.max_steps is None and cfg.epochs <= 0:
        raise ValueError(f"train config: 'epochs' must be > 0 (or set max_steps), got {cfg.epochs}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"train config: 'warmup_ratio' must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"train config: 'min_lr_ratio' must be in [0, 1], got {cfg.min_lr_ratio}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"train config: '{name}' must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("weight_decay", "max_grad_norm", "rpo_alpha", "pro_sft_weight", "lora_r"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"train config: '{name}' must be >= 0, got {getattr(cfg, name)}")


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _number_from_string(value, hint):
    """YAML reads ``1e-6`` as a string; accept it for float fields."""
    if isinstance(value, str) and hint is not None and float in (typing.get_args(hint) or (hint,)):
        try:
            return float(value)
        except ValueError:
            return value
    return value
