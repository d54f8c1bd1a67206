"""Saving and loading preference models where users expect them.

BT: an ``AutoModelForSequenceClassification`` folder (num_labels = 1, the head as its
bias-free ``score`` layer, pad token set), so ``score_rm``, TRL and OpenRLHF load it as is.

GPM: a folder with ``prefmodel.json`` (kind, embedding dimension, normalisation, gate, τ,
the backbone and its content identity) and ``gpm_head.safetensors`` (``value.weight``
[2k, d] and, with a gate, ``gate.weight`` [k, d]). After ``full`` training the fine-tuned
backbone is saved in the same folder (``backbone: "."``); after ``head_only`` the folder
names the frozen backbone instead of copying it (a 7B backbone is not duplicated per
head), and loading refuses a backbone whose identity or hidden size differs. Load with::

    from prefdata.prefmodel.io import load_gpm
    gpm = load_gpm("out/gpm")                       # backbone + head
    v, lam = gpm.embed(conversations, responses)    # [n, 2k], [n, k]
    P = gpm.win_probs(conversation, responses)      # [N, N], P[a, b] = P(a ≻ b)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from prefdata.prefmodel.heads import GPMHead, gpm_matrix

log = logging.getLogger(__name__)

META_FILE = "prefmodel.json"
HEAD_FILE = "gpm_head.safetensors"


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished temp folder's files into ``out`` (each an atomic rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        target = out / f.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    tmp.rmdir()


def save_bt(out: str | Path, causal_lm, tokenizer, head, meta: dict) -> Path:
    """The backbone with ``head`` as a sequence-classification reward model."""
    from transformers import AutoModelForSequenceClassification

    out = Path(out)
    config = type(causal_lm.config).from_dict(causal_lm.config.to_dict())
    config.num_labels, config.architectures = 1, None
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _check_pooling(tokenizer, config.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    getattr(model, model.base_model_prefix).load_state_dict(causal_lm.base_model.state_dict())
    with torch.no_grad():
        model.score.weight.copy_(head.score.weight.to(model.score.weight.dtype))
    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps({"kind": "bt", **meta}, indent=2))
    _publish(tmp, out)
    return out


def _check_pooling(tokenizer, pad_id) -> None:
    """The features are read at the turn's last token; a reward model pools on the last
    non-pad token. If the template ends with the pad token the two differ: say so."""
    from prefdata.prefmodel.features import token_ids

    _, turn = token_ids(tokenizer, [{"role": "user", "content": "hi"}], "hello")
    if turn and turn[-1] == pad_id:
        log.warning("the chat template ends the assistant turn with the pad token (id %s): the saved reward "
                    "model pools on an earlier token than the head was trained on; set a distinct pad token", pad_id)


def save_gpm(out: str | Path, head: GPMHead, meta: dict, causal_lm=None, tokenizer=None) -> Path:
    """Head file + metadata; with ``causal_lm`` (full training) the backbone goes in too."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().float() for k, v in head.state_dict().items()}, str(tmp / HEAD_FILE))
    info = {"kind": "gpm", "dim": head.dim, "normalize": head.normalize, "gate": head.use_gate,
            "hidden_size": head.value.weight.shape[1], **meta}
    if causal_lm is not None:
        causal_lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info["backbone"], info["backbone_identity"] = ".", None
    (tmp / META_FILE).write_text(json.dumps(info, indent=2))
    _publish(tmp, out)
    return out


def read_meta(folder: str | Path) -> dict | None:
    """``prefmodel.json`` of a saved preference model, or None for any other model folder."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-save the model with prefdata train-rm") from None


@dataclass
class GPM:
    """A loaded GPM: backbone (a ``TransformersLM``), head and τ."""

    folder: Path
    lm: object
    head: GPMHead
    tau: float

    def embed(self, conversations: list, responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One embedding and gate per response — N backbone passes for N responses."""
        from prefdata.prefmodel.features import extract

        feats = extract(self.lm, conversations, responses)
        with torch.no_grad():
            return self.head.embed(feats.response), self.head.scales(feats.prompt, len(responses))

    def win_probs(self, conversation: list, responses: list[str]) -> torch.Tensor:
        v, lam = self.embed([conversation] * len(responses), responses)
        return probability_matrix(v, lam[0], self.tau)


def probability_matrix(v: torch.Tensor, scales: torch.Tensor, tau: float) -> torch.Tensor:
    """P[a, b] = σ(s(a ≻ b)/τ) for one prompt's responses; the diagonal is 0.5."""
    return torch.sigmoid(gpm_matrix(v, scales) / tau)


def backbone_path(folder: Path, meta: dict) -> str:
    return str(folder) if meta.get("backbone") == "." else meta["backbone"]


def load_gpm(folder: str | Path, device: str = "cpu", batch_size: int = 16, dtype: str = "float32") -> GPM:
    """Load a GPM folder written by ``prefdata train-rm --objective gpm``."""
    from safetensors.torch import load_file

    from prefdata.models.identity import model_identity_digest
    from prefdata.models.transformers_backend import TransformersLM

    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None or meta.get("kind") != "gpm":
        raise ValueError(f"{folder}: no GPM here ({META_FILE} missing or not kind 'gpm'); "
                         "train one with prefdata train-rm --objective gpm")
    head_path = folder / HEAD_FILE
    if not head_path.is_file():
        raise ValueError(f"{head_path}: the GPM head file is missing; re-save the model")
    backbone = backbone_path(folder, meta)
    expected = meta.get("backbone_identity")
    if expected and model_identity_digest(backbone) != expected:
        raise ValueError(f"{folder / META_FILE}: field 'backbone_identity' does not match the backbone "
                         f"'{backbone}' found now (its weights changed); the head was trained on other "
                         "features — retrain the head or restore that backbone")
    tensors = load_file(str(head_path))
    head = head_from_tensors(tensors, meta, head_path)
    lm = TransformersLM(backbone, device=device, dtype=dtype, batch_size=batch_size)
    if lm.model.config.hidden_size != head.value.weight.shape[1]:
        raise ValueError(f"{head_path}: 'value.weight' takes hidden size {head.value.weight.shape[1]} but the "
                         f"backbone '{backbone}' has hidden size {lm.model.config.hidden_size}; "
                         "the head file does not belong to this backbone")
    head.to(lm.device)
    return GPM(folder, lm, head.eval(), float(meta.get("tau", 0.1)))


def head_from_tensors(tensors: dict, meta: dict, where: Path) -> GPMHead:
    if "value.weight" not in tensors:
        raise ValueError(f"{where}: no 'value.weight' tensor; not a GPM head file")
    dim, hidden = tensors["value.weight"].shape
    if dim % 2:
        raise ValueError(f"{where}: 'value.weight' has {dim} output dimensions, an odd number; "
                         "a GPM embedding has 2k dimensions")
    if dim != meta.get("dim", dim):
        raise ValueError(f"{where}: 'value.weight' has {dim} rows but {META_FILE} field 'dim' says {meta['dim']}")
    gate = "gate.weight" in tensors
    if gate != bool(meta.get("gate", gate)):
        raise ValueError(f"{where}: {META_FILE} field 'gate' is {meta.get('gate')} but the head file "
                         f"{'has' if gate else 'lacks'} 'gate.weight'")
    head = GPMHead(hidden, dim, normalize=bool(meta.get("normalize", True)), gate=gate)
    head.load_state_dict(tensors)
    return head
