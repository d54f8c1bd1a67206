"""The transformers backend: the embedded default, on CPU or one GPU.

Work is batched by token length so a batch pads only to its own longest member, and
log-probabilities are computed only where a response token is predicted: the lm_head
(vocabulary-sized) runs on those positions alone, never on the prompt.

Scoring shares prompts: the items of a call are grouped by identical prompt tokens, each
prompt runs once (``use_cache=True``), and its N responses continue from that KV cache
(its rows repeated along the batch), in batches sorted by response length. A prompt three
times as long as its responses is then computed once instead of N times. Prompts and
responses are both right-padded, so no query row is ever fully masked; position ids are
explicit.
``share_prompts=False`` (or a sliding-window model whose items outgrow its window)
takes the plain path: one padded prompt+response row per item.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from prefdata.models import hub
from prefdata.models.base import Conversation, LogProb, Sampling

log = logging.getLogger(__name__)

LM_HEAD_CHUNK = 1024  # positions per lm_head call: bounds the [positions, vocab] buffer


def resolve_device(device: str) -> str:
    """``auto`` means the GPU when there is one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersLM:
    """A causal LM behind the ``LanguageModel`` protocol, loaded from safetensors."""

    def __init__(
        self,
        name: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        share_prompts: bool = True,
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
        self.share_prompts = share_prompts

    # -- the protocol ---------------------------------------------------------------------
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

    def logprobs(self, conversations: list[Conversation], responses: list[str]) -> list[LogProb]:
        """Sum and mean of log p(response token) over response tokens (eos included)."""
        import torch

        result: list[LogProb | None] = [None] * len(conversations)
        for batch, targets, lp in self._response_positions(conversations, responses, want="logprobs"):
            counts = torch.tensor([len(targets[j]) for j in range(len(batch))])
            sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(
                0, torch.repeat_interleave(torch.arange(len(batch)), counts), lp.double().cpu()
            )
            for j, owners in enumerate(batch):
                k = int(counts[j])
                for i in owners:
                    result[i] = LogProb(sum=float(sums[j]), mean=float(sums[j]) / k, n_tokens=k)
        return result

    def hidden_states(self, conversations: list[Conversation], responses: list[str]) -> list[np.ndarray]:
        """Final-norm hidden states at the positions that predict response tokens, ``[T, d]``."""
        result: list[np.ndarray | None] = [None] * len(conversations)
        for batch, targets, h in self._response_positions(conversations, responses, want="hidden"):
            parts = h.float().cpu().numpy()
            bounds = np.cumsum([len(targets[j]) for j in range(len(batch))])[:-1]
            for owners, part in zip(batch, np.split(parts, bounds)):
                for k, i in enumerate(owners):
                    result[i] = part if k == 0 else part.copy()
        return result

    # -- internals ------------------------------------------------------------------------
    def _prompt_ids(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _response_ids(self, response: str) -> list[int]:
        return self.tokenizer(response, add_special_tokens=False).input_ids + [self.eos_ids[0]]

    def _check_length(self, index: int, length: int, what: str) -> None:
        if length > self.max_length:
            raise ValueError(
                f"model '{self.name}': item {index} needs {length} tokens ({what}) but the "
                f"model's context is {self.max_length}; shorten that item or lower max_new_tokens"
            )

    def _response_positions(self, conversations, responses, want: str) -> Iterator:
        """Yield (owners, response ids, per-position values) for length-sorted batches.

        Identical (prompt, response) items are computed once (and so come out identical);
        ``owners[j]`` lists the input indices of the batch's j-th distinct item. Values are
        log p(target) for ``logprobs`` or hidden states for ``hidden``, flat over the
        batch's response positions, items in batch order.
        """
        import torch

        if len(conversations) != len(responses):
            raise ValueError(
                f"got {len(conversations)} conversations but {len(responses)} responses"
            )
        prompts = self._prompt_ids_many(conversations)
        answers = [self._response_ids(r) for r in responses]
        lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
        for i, length in enumerate(lengths):
            self._check_length(i, length, "prompt + response")
        owners: dict[tuple, list[int]] = {}
        for i, (p, a) in enumerate(zip(prompts, answers)):
            owners.setdefault((tuple(p), tuple(a)), []).append(i)
        firsts = [items[0] for items in owners.values()]
        copies = list(owners.values())
        prompts, answers = [prompts[i] for i in firsts], [answers[i] for i in firsts]
        window = _sliding_window(self.model.config)
        shared = self.share_prompts and (window is None or max(lengths, default=0) <= window)
        batches = self._shared_batches if shared else self._plain_batches
        with torch.inference_mode():
            for unique, picked in batches(prompts, answers, want):
                targets = [answers[u] for u in unique]
                batch = [copies[u] for u in unique]
                if want == "hidden":
                    yield batch, targets, picked
                else:
                    flat = torch.tensor([t for a in targets for t in a], device=self.device)
                    yield batch, targets, self._target_logprobs(picked, flat)

    def _plain_batches(self, prompts, answers, want: str) -> Iterator:
        """One right-padded prompt+response row per item, longest first."""
        lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for batch in _progress(_chunks(order, self.batch_size), f"{want} {self.name}"):
            ids, mask = _pad([prompts[i] + answers[i] for i in batch], self.pad_id, left=False)
            rows, cols = _predicting_positions([len(prompts[i]) for i in batch],
                                               [len(answers[i]) for i in batch])
            hidden = self.model.base_model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state
            yield batch, hidden[rows.to(self.device), cols.to(self.device)]

    def _shared_batches(self, prompts, answers, want: str) -> Iterator:
        """Each distinct prompt once, its responses continuing from its KV cache.

        A prompt pass runs up to ``batch_size`` distinct prompts (sorted by length, so they
        pad to near-equal lengths); its responses, from all of those prompts, are then
        sorted by length and run ``batch_size`` at a time, each row reading its prompt's
        cache rows.
        """
        import torch
        from transformers import DynamicCache

        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p), []).append(i)
        order = sorted(groups.values(), key=lambda items: -len(prompts[items[0]]))
        for pass_groups in _progress(_chunks(order, self.batch_size), f"{want} {self.name}"):
            ids, mask = _pad([prompts[items[0]] for items in pass_groups], self.pad_id, left=False)
            ids, mask = ids.to(self.device), mask.to(self.device)
            plen = mask.sum(1)
            out = self.model.base_model(
                input_ids=ids, attention_mask=mask,
                position_ids=torch.arange(ids.shape[1], device=self.device).expand_as(ids),
                past_key_values=DynamicCache(config=self.model.config), use_cache=True,
            )
            last = out.last_hidden_state[torch.arange(len(pass_groups), device=self.device), plen - 1]
            rows = sorted(((g, i) for g, items in enumerate(pass_groups) for i in items),
                          key=lambda row: -len(answers[row[1]]))
            for sub in _chunks(rows, self.batch_size):
                batch = [i for _, i in sub]
                group = torch.tensor([g for g, _ in sub])
                # The response pass reads every response token but the last (it predicts nothing).
                inputs = [answers[i][:-1] for i in batch]
                width = max(len(a) for a in inputs)
                index = _shared_index([len(a) for a in inputs], group, len(pass_groups), width).to(self.device)
                if width == 0:
                    yield batch, last[index]
                    continue
                group = group.to(self.device)
                rids, rmask = _pad(inputs, self.pad_id, left=False)
                rids, rmask = rids.to(self.device), rmask.to(self.device)
                hidden = self.model.base_model(
                    input_ids=rids, attention_mask=torch.cat([mask[group], rmask], 1),
                    position_ids=plen[group][:, None] + torch.arange(width, device=self.device)[None],
                    past_key_values=_select_rows(out.past_key_values, group, self.model.config),
                    use_cache=True,
                ).last_hidden_state
                yield batch, torch.cat([last, hidden.reshape(-1, hidden.shape[-1])])[index]

    def _prompt_ids_many(self, conversations) -> list[list[int]]:
        """Template each distinct conversation once (a prompt's N responses share it)."""
        import json

        seen: dict[str, list[int]] = {}
        out = []
        for c in conversations:
            key = json.dumps(list(c), sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen[key] = self._prompt_ids(c)
            out.append(seen[key])
        return out

    def _target_logprobs(self, hidden, targets):
        """log-softmax of the lm_head output, only at the given positions, in chunks."""
        import torch

        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        out = []
        for start in range(0, hidden.shape[0], LM_HEAD_CHUNK):
            logits = head(hidden[start:start + LM_HEAD_CHUNK]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            lp = torch.log_softmax(logits, dim=-1)
            out.append(lp.gather(1, targets[start:start + LM_HEAD_CHUNK, None])[:, 0])
        return torch.cat(out)



# -- helpers ------------------------------------------------------------------------------
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


def _predicting_positions(prompt_lens: Sequence[int], answer_lens: Sequence[int]):
    """(row, column) of every position whose next token is a response token."""
    import torch

    counts = torch.tensor(answer_lens)
    rows = torch.repeat_interleave(torch.arange(len(answer_lens)), counts)
    starts = torch.repeat_interleave(torch.tensor(prompt_lens) - 1, counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return rows, starts + offsets


def _select_rows(cache, rows, config):
    """A new cache holding the given batch rows (repeats allowed) of every layer of ``cache``."""
    from transformers import DynamicCache

    selected = DynamicCache(config=config)
    for layer_idx, layer in enumerate(cache.layers):
        selected.update(layer.keys[rows], layer.values[rows], layer_idx)
    return selected


def _shared_index(input_lens: Sequence[int], group, n_groups: int, width: int):
    """Where each predicting position sits in ``cat([prompt last states, response states])``.

    Response token 0 is predicted by its prompt's last state; token k > 0 by response
    state k - 1 of its row (rows of ``width`` states, after the ``n_groups`` prompt rows).
    """
    import torch

    parts = []
    for row, n in enumerate(input_lens):
        parts.append(group[row:row + 1])
        parts.append(n_groups + row * width + torch.arange(n))
    return torch.cat(parts)


def _sliding_window(config) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


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
