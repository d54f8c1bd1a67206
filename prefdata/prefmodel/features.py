"""Backbone features for preference heads, computed once with prompt sharing and cached.

A response's feature is the backbone's final (normed) hidden state at the last token of
its assistant turn as the model's chat template writes it — the token a
``*ForSequenceClassification`` model pools on, so a BT head trained on these features is
exactly the ``score`` layer of the saved reward model (io.py). The prompt's feature (for
the GPM gate) is the state at the prompt's last token (end of the generation prompt), as
in the GPM reference code.

Extraction goes through the transformers backend's ``hidden_states``, which runs each
distinct prompt once and continues its N responses from its KV cache (prompt sharing,
prefdata/models/transformers_backend.py). Features are cached on disk like reference
log-probs, keyed by the backbone's content identity (prefdata.models.identity) and a hash
of every (prompt, response) text, so a second run on the same data loads them instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FEATURES_VERSION = "1"


@dataclass
class Features:
    response: torch.Tensor   # [M, d] float32, one row per distinct (prompt, response)
    prompt: torch.Tensor     # [M, d] the prompt's last-token state, for the gate


def turn_text(tokenizer, conversation: list[dict], response: str) -> str:
    """The response's assistant turn exactly as the chat template renders it after the
    generation prompt (so prompt ids + these ids = the reward model's token ids)."""
    prefix = tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(list(conversation) + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(prefix):
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + response; "
                         "preference features need a template whose assistant turn follows the generation prompt")
    return full[len(prefix):]


def token_ids(tokenizer, conversation: list[dict], response: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with generation prompt) and the assistant turn's ids, as the backend tokenises."""
    ids = tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=True)
    prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    turn = tokenizer(turn_text(tokenizer, conversation, response), add_special_tokens=False).input_ids
    return prompt, turn


def extract(lm, conversations: list, responses: list[str]) -> Features:
    """Features of each (conversation, response) with a loaded ``TransformersLM`` (no grad)."""
    turns = [turn_text(lm.tokenizer, c, r) for c, r in zip(conversations, responses)]
    states = lm.hidden_states(list(conversations), turns)
    d = lm.model.config.hidden_size
    resp = np.zeros((len(states), d), np.float32)
    prompt = np.zeros((len(states), d), np.float32)
    for i, h in enumerate(states):
        resp[i], prompt[i] = h[-1], h[0]
    return Features(torch.from_numpy(resp), torch.from_numpy(prompt))


def cache_key(model_identity: str, conversations: list, responses: list[str], dtype: str) -> str:
    h = hashlib.sha256(json.dumps([FEATURES_VERSION, model_identity, dtype], sort_keys=True).encode())
    for c, r in zip(conversations, responses):
        h.update(json.dumps([list(c), r], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


def cached_features(model: str, conversations: list, responses: list[str], cache_dir: str | Path,
                    device: str = "cpu", batch_size: int = 16, lm=None) -> tuple[Features, dict]:
    """Features from ``cache_dir`` when this backbone already featurised these texts,
    else computed (one model load) and written atomically. Returns (features, info)."""
    from safetensors.torch import load_file, save_file

    from prefdata.models.identity import model_identity_digest

    key = cache_key(model_identity_digest(model), conversations, responses, "float32")
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.exists():
        t = load_file(str(path))
        log.info("features: cache hit %s", path)
        return Features(t["response"], t["prompt"]), {"feature_cache": "hit", "feature_cache_path": str(path)}
    if lm is None:
        from prefdata.models.transformers_backend import TransformersLM

        lm = TransformersLM(model, device=device, dtype="float32", batch_size=batch_size)
    feats = extract(lm, conversations, responses)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"response": feats.response.contiguous(), "prompt": feats.prompt.contiguous()}, str(tmp))
    os.replace(tmp, path)
    log.info("features: computed %d and cached at %s", len(responses), path)
    return feats, {"feature_cache": "miss", "feature_cache_path": str(path)}


def forward_features(backbone, rows: list[tuple[list[int], list[int]]], device: str, pad_id: int):
    """Differentiable features for ``full`` fine-tuning: one right-padded prompt+turn row
    per item; (response state at the turn's last token, prompt state at its last token)."""
    seqs = [p + t for p, t in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    b = torch.arange(len(seqs), device=hidden.device)
    last = torch.tensor([len(s) - 1 for s in seqs], device=hidden.device)
    plast = torch.tensor([len(p) - 1 for p, _ in rows], device=hidden.device)
    return hidden[b, last], hidden[b, plast]
