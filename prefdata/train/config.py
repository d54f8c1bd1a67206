"""Every training setting in one dataclass, built strictly from YAML and ``--set key=value``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from prefdata.step import build_config

Loss = Literal["dpo", "rpo", "rdpo", "cdpo", "ipo", "simpo", "pro"]


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
    rdpo_eps: float | None = None       # rDPO flip rate; None: per pair, from flip_prob
    rdpo_eps_max: float = 0.45          # ε is clipped to [0, rdpo_eps_max] (< 0.5)
    label_smoothing: float = 0.1        # cDPO ε
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    pro_sft_weight: float = 0.05

    # data
    max_length: int = 1024              # prompt + one response, in tokens
    max_prompt_length: int | None = None  # longer prompts keep their end
    eval_fraction: float = 0.05
    eval_max: int = 256                 # at most this many eval examples
    group_by_length: bool = True

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
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    seed: int = 0

    # logging and checkpoints
    log_every: int = 1
    eval_every: int = 50                # 0: only at the start and the end
    save_every: int = 100               # 0: only at the end
    keep_checkpoints: int = 2
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "prefdata"


# Settings a resumed run may change; any other difference is an error.
RESUMABLE_CHANGES = {
    "max_steps", "epochs", "log_every", "eval_every", "save_every", "keep_checkpoints",
    "tensorboard", "wandb", "wandb_project", "device", "ref_cache_dir", "ref_batch_size",
}


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
    if cfg.rdpo_eps is not None and not 0.0 <= cfg.rdpo_eps < 0.5:
        raise ValueError(f"train config: 'rdpo_eps' must be in [0, 0.5), got {cfg.rdpo_eps}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"train config: 'label_smoothing' must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.beta <= 0 or cfg.simpo_beta <= 0:
        raise ValueError("train config: 'beta' and 'simpo_beta' must be > 0")


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
