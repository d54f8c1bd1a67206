"""Checkpoints, and what makes a run folder belong to one run.

A checkpoint holds safetensors weights and optimizer state, the scheduler, RNG states,
the data position, and the run's identity: its id, the data fingerprint (every token id
after templating and truncation), the policy and reference models' content identity
(prefdata.models.identity) and the config. ``--resume`` continues only the same run —
it names each difference it finds instead of continuing on other data or weights — and
a new run refuses a folder that holds another run's checkpoints unless ``--overwrite``.
Rotation keeps the newest ``keep_checkpoints`` of the current run and never the one
just written. Everything is written to a temp folder, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from prefdata.models.identity import model_identity_digest
from prefdata.train.config import RESUMABLE_CHANGES, TrainConfig, as_dict

log = logging.getLogger(__name__)


def run_identity(cfg: TrainConfig, data_fingerprint: str, extra: dict | None = None) -> dict:
    """What a checkpoint must match to be resumed: data, policy and reference weights."""
    reference = cfg.reference or cfg.model
    return {"data_fingerprint": data_fingerprint,
            "policy_model": model_identity_digest(cfg.model),
            "reference_model": model_identity_digest(reference),
            **(extra or {})}


def open_run_folder(out: Path, resume: bool, overwrite: bool, delete: bool = True) -> Path | None:
    """The checkpoint to resume from (or None), after refusing to mix two runs in one folder.
    ``delete``: this process may remove an overwritten run (process 0 of several)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; choose one")
    found = checkpoints(out)
    if resume:
        if not found:
            log.info("no checkpoint under %s/checkpoints; starting from step 0", out)
        return found[-1] if found else None
    if found and not overwrite:
        raise ValueError(
            f"{out} holds checkpoints of another run ({found[0].name} … {found[-1].name}); continue it with "
            "--resume, replace it with --overwrite (deletes them), or choose another --output")
    if found and delete:
        log.warning("--overwrite: deleting %d checkpoint(s) under %s", len(found), out / "checkpoints")
        shutil.rmtree(out / "checkpoints")
    return None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def check_resumable(ckpt: Path, cfg: TrainConfig, identity: dict) -> None:
    """Refuse to continue on other data, other weights or other settings, naming each."""
    state = read_state(ckpt)
    saved_identity = state.get("identity") or {}
    problems = []
    names = {"data_fingerprint": "the data fingerprint (data file, tokenizer, chat template or truncation)",
             "policy_model": f"the policy model identity ({cfg.model})",
             "reference_model": f"the reference model identity ({cfg.reference or cfg.model})"}
    for key, now in identity.items():
        if saved_identity.get(key) != now:
            problems.append(f"{names.get(key, key)} differs: checkpoint {saved_identity.get(key)!r}, now {now!r}")
    saved, current = state["config"], as_dict(cfg)
    for k in sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]):
        why = " (the learning-rate schedule is laid out over the total)" if k in ("max_steps", "epochs") else ""
        problems.append(f"setting {k} changed: {saved.get(k)!r} -> {current[k]!r}{why}")
    if problems:
        raise ValueError(f"cannot resume from {ckpt}: " + "; ".join(problems)
                         + ". Resume with the same data, models and settings, or start a new run in another --output")


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, baseline: dict,
                    run: dict, early_stopping: dict | None = None) -> Path:
    """``run`` = {"run_id": ..., "identity": {...}}; ``early_stopping``: the stopper's state,
    whose best checkpoint rotation keeps."""
    folder = out / "checkpoints"
    final, tmp = checkpoint_path(out, step), folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    np_state = np.random.get_state()
    state = {"step": step, "config": as_dict(cfg), "baseline": baseline, **run,
             "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
             "rng_python": random.getstate(),
             "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if early_stopping is not None:
        state["early_stopping"] = early_stopping
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    best = (early_stopping or {}).get("best_step")
    rotate(folder, run["run_id"], cfg.keep_checkpoints, final, keep_also=None if best is None else checkpoint_path(out, best))
    return final


def checkpoint_path(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def save_weights(model, path: Path) -> None:
    """Every weight, or with frozen ones (a LoRA base) only the trainable ones: the base is
    the policy model, whose identity a resume checks."""
    if all(p.requires_grad for p in model.parameters()):
        save_model(model, str(path))
    else:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))


def load_weights(model, path: Path) -> None:
    if all(p.requires_grad for p in model.parameters()):
        load_model(model, str(path))
        return
    tensors = load_file(str(path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trainable:
        raise ValueError(f"{path}: holds {len(tensors)} tensors, the model has {len(trainable)} trainable ones; "
                         "the checkpoint is from another adapter setup")
    model.load_state_dict(tensors, strict=False)


def rotate(folder: Path, run_id: str, keep: int, newest: Path, keep_also: Path | None = None) -> list[Path]:
    """Delete this run's checkpoints beyond the newest ``keep``; ``newest`` always stays, and
    so does ``keep_also`` (early stopping's best), which does not count toward ``keep``."""
    mine = [d for d in sorted(folder.glob("step-*")) if d not in (newest, keep_also) and _run_of(d) == run_id]
    doomed = mine[: max(0, len(mine) - (max(keep, 1) - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _run_of(ckpt: Path) -> str | None:
    try:
        return read_state(ckpt).get("run_id")
    except (OSError, ValueError):
        return None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[int, dict]:
    state = read_state(ckpt)
    load_weights(model, ckpt / "model.safetensors")
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
