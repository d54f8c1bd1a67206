"""Frozen copy of the transformers backend's generation at commit b7d8c63 (before
continuous batching): static batches through ``model.generate``, left-padded, one sampling
stream per call, every draw prefilling its prompt again. The baseline of
``bench_sample.py`` ("today's sample step"); not part of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefdata.models import hub
from prefdata.models.base import Conversation, Sampling
from prefdata.models.transformers_backend import resolve_device

class TransformersLM:
    """The backend as it was: static batches through ``model.generate``."""

    def __init__(
        self,
        name: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        trust_remote_code: bool = False,
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.name = name
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model, self.tokenizer = hub.load_causal_lm(
            name, self.device, dtype, trust_remote_code=trust_remote_code
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"model '{name}' has no chat template; prefdata formats every prompt as a "
                "conversation, so use an instruct/chat checkpoint or add a chat_template"
            )
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.max_length = max_length or _context_length(self.model.config)

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling) -> list[list[str]]:
        """``n`` replies per conversation, reproducible from ``sampling.seed`` alone."""
        import torch

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not conversations:
            return []
        greedy = sampling.temperature <= 0
        draws = 1 if greedy else n  # greedy replies are all the same: compute one
        prompts = [self._prompt_ids(c) for c in conversations]
        for i, ids in enumerate(prompts):
            self._check_length(i, len(ids) + sampling.max_new_tokens, "prompt + max_new_tokens")
        # One row per (conversation, draw), a conversation's draws adjacent, longest first.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        rows = np.repeat(order, draws)
        texts: list[list[str]] = [[] for _ in conversations]
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        kwargs = _generate_kwargs(sampling, self.eos_ids, self.pad_id, generator)
        with torch.inference_mode():
            for batch in _progress(_chunks(rows, self.batch_size), f"generate {self.name}"):
                ids, mask = _pad([prompts[i] for i in batch], self.pad_id, left=True)
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
                )
                new = out[:, ids.shape[1]:].tolist()
                decoded = self.tokenizer.batch_decode(
                    [_until_eos(t, self.eos_ids) for t in new], skip_special_tokens=True
                )
                for i, text in zip(batch, decoded):
                    texts[i].append(text)
        return [t * n if greedy else t for t in texts]

    def _prompt_ids(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _check_length(self, index: int, length: int, what: str) -> None:
        if length > self.max_length:
            raise ValueError(
                f"model '{self.name}': item {index} needs {length} tokens ({what}) but the "
                f"model's context is {self.max_length}; shorten that item or lower max_new_tokens"
            )


def _generate_kwargs(sampling: Sampling, eos_ids: list[int], pad_id: int, generator) -> dict:
    """Explicit settings, so a checkpoint's generation_config (top_k, penalties) can't leak in.

    Sampling goes through ``NucleusSampler`` and greedy search: it draws from its own
    generator (no global RNG) and avoids a full-vocabulary sort and multinomial per step.
    """
    from transformers import LogitsProcessorList

    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
        num_beams=1, repetition_penalty=1.0, do_sample=False,
        temperature=None, top_p=None, top_k=None,
    )
    if sampling.temperature > 0:
        sampler = NucleusSampler(sampling.temperature, sampling.top_p, generator)
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
    return kwargs

class NucleusSampler:
    """Temperature + top-p sampling as a logits processor that returns a one-hot choice.

    Same distribution as transformers' top-p (keep a token while the mass ranked above it
    is below ``top_p``), but computed on the top ``candidates`` tokens when they already
    hold ``top_p`` of the mass, which on CPU is ~20x cheaper than sorting the vocabulary.
    """

    def __init__(self, temperature: float, top_p: float, generator, candidates: int = 256):
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator, self.candidates = generator, candidates

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p >= 1:
            token = torch.multinomial(probs, 1, generator=self.generator)
        else:
            top, idx = probs.topk(min(self.candidates, probs.shape[-1]), dim=-1)
            if bool((top.sum(-1) < self.top_p).any()):
                top, idx = probs.sort(dim=-1, descending=True)
            above = top.cumsum(-1) - top
            top = top.masked_fill(above >= self.top_p, 0.0)
            token = idx.gather(-1, torch.multinomial(top, 1, generator=self.generator))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

def _pad(seqs: list[list[int]], pad_id: int, left: bool):
    """Pad to the batch's longest sequence; left for generation, right for scoring."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask

def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:k]
    return tokens

def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    items = list(items)
    return [items[k:k + size] for k in range(0, len(items), size)]

def _progress(batches: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2)

def _eos_ids(tokenizer, model) -> list[int]:
    """The tokenizer's eos first (it ends scored responses), then any the model adds."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in extra if isinstance(extra, (list, tuple)) else [extra]:
        if t is not None and t not in ids:
            ids.append(int(t))
    if ids[0] is None:
        raise ValueError("the tokenizer has no eos token; generation could not stop")
    return ids

def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30
