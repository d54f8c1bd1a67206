"""The transformers backend: the embedded default, on CPU or one GPU.

Sampling runs by continuous batching (``continuous``): ``batch_size`` slots decode
together, a finished reply's slot takes the next waiting draw, each prompt is prefilled
once for all of its draws, and each draw samples from its own seeded stream.

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
from prefdata.models.base import (Conversation, Generation, LogProb, Sampling, draw_keys, draw_seed,
                                  first_indices)
from prefdata.models.continuous import ContinuousBatcher, DecodeSettings, Draw, StopStrings

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
        self.eos_ids = _eos_ids(self.tokenizer, self.model, name)
        self.pad_id = self.tokenizer.pad_token_id
        self.max_length = max_length or _context_length(self.model.config)
        self.share_prompts = share_prompts

    # -- the protocol ---------------------------------------------------------------------
    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling,
                 keys: Sequence[str] | None = None, first_index=None) -> list[list[str]]:
        """``n`` replies per conversation; see ``generate_replies``."""
        replies = self.generate_replies(conversations, n, sampling, keys, first_index)
        return [[g.text for g in row] for row in replies]

    def generate_replies(self, conversations: list[Conversation], n: int, sampling: Sampling,
                         keys: Sequence[str] | None = None, first_index=None) -> list[list[Generation]]:
        """``n`` replies per conversation with their finish reasons, by continuous batching.

        Draw k of conversation i is seeded by ``draw_seed(seed, keys[i], first_index[i] + k)``
        (keys default to each conversation's hash), so it does not depend on the other
        conversations of the call or on ``batch_size`` (see ``continuous``). Greedy replies
        are all the same: one is computed per conversation.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not conversations:
            return []
        keys, starts = draw_keys(conversations, keys), first_indices(conversations, first_index)
        prompts, owner = self._unique_prompts(conversations)
        for i, u in enumerate(owner):
            self._check_generation_length(i, len(prompts[u]) + sampling.max_new_tokens)
        per = 1 if sampling.temperature <= 0 else n
        draws = [Draw(owner[i], starts[i] + k, _rng(draw_seed(sampling.seed, keys[i], starts[i] + k)))
                 for i in range(len(conversations)) for k in range(per)]
        settings = DecodeSettings(
            temperature=sampling.temperature, top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            eos_ids=tuple(self.eos_ids), slots=self.batch_size,
        )
        stop = StopStrings(sampling.stop, self.tokenizer, sampling.min_new_tokens) if sampling.stop else None
        with _bar(len(draws), f"generate {self.name}") as bar:
            ContinuousBatcher(self.model, prompts, draws, settings, stop, bar).run()
        replies = [self._reply(d, stop) for d in draws]
        return [replies[i * per:(i + 1) * per] * (n // per) for i in range(len(conversations))]

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

    def hidden_state_sums(self, conversations: list[Conversation],
                          responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``hidden_states`` summed over positions on the device (float64 ``[n, d]``), and counts.

        Per-response ``[T, d]`` arrays never reach the host: each batch's states are added
        into per-item float64 sums, ``LM_HEAD_CHUNK`` positions at a time.
        """
        import torch

        sums, counts = None, np.zeros(len(conversations), dtype=np.int64)
        for batch, targets, h in self._response_positions(conversations, responses, want="hidden"):
            lens = torch.tensor([len(targets[j]) for j in range(len(batch))], device=h.device)
            item = torch.repeat_interleave(torch.arange(len(batch), device=h.device), lens)
            total = torch.zeros(len(batch), h.shape[-1], dtype=torch.float64, device=h.device)
            for start in range(0, h.shape[0], LM_HEAD_CHUNK):
                chunk = slice(start, start + LM_HEAD_CHUNK)
                total.index_add_(0, item[chunk], h[chunk].double())
            total = total.cpu().numpy()
            if sums is None:
                sums = np.zeros((len(conversations), total.shape[1]))
            for j, owners in enumerate(batch):
                sums[owners] = total[j]
                counts[owners] = len(targets[j])
        return (sums if sums is not None else np.zeros((0, 0))), counts

    # -- internals ------------------------------------------------------------------------
    def _prompt_ids(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _unique_prompts(self, conversations) -> tuple[list[list[int]], list[int]]:
        """Distinct prompt token lists, and which one each conversation uses."""
        ids = self._prompt_ids_many(conversations)
        index: dict[tuple, int] = {}
        owner = [index.setdefault(tuple(p), len(index)) for p in ids]
        return [list(p) for p in index], owner

    def _reply(self, draw: Draw, stop: StopStrings | None) -> Generation:
        text = self.tokenizer.decode(draw.tokens, skip_special_tokens=True)
        reason = draw.finish_reason
        if stop is not None:
            text, cut = stop.cut(text, draw.tokens)
            reason = "stop" if cut else reason
        return Generation(text=text, finish_reason=reason)

    def _check_generation_length(self, index: int, length: int) -> None:
        self._check_length(index, length, "prompt + max_new_tokens")
        window = _sliding_window(self.model.config)
        if window is not None and length > window:
            raise ValueError(
                f"model '{self.name}': item {index} needs {length} tokens (prompt + "
                f"max_new_tokens) but the model attends through a sliding window of {window}, "
                "which sampling does not apply; shorten that item or lower max_new_tokens"
            )

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
                cache=DynamicCache(config=self.model.config), use_cache=True,
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
                    cache=_select_rows(out.cache, group, self.model.config),
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


def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    items = list(items)
    return [items[k:k + size] for k in range(0, len(items), size)]


def _progress(batches: list, desc: str):
    from tqdm.auto import tqdm

    from prefdata.models import progress_disabled

    return tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2 or progress_disabled())


def _bar(total: int, desc: str):
    """A bar counting finished draws (hidden for a single one, and under ``--no-progress``)."""
    from tqdm.auto import tqdm

    from prefdata.models import progress_disabled

    return tqdm(total=total, desc=desc, leave=False, disable=total < 2 or progress_disabled())


def _rng(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _eos_ids(tokenizer, model, name: str) -> list[int]:
    """The tokenizer's eos first (it ends scored responses), then any the model adds."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in extra if isinstance(extra, (list, tuple)) else [extra]:
        if t is not None and t not in ids:
            ids.append(int(t))
    if ids[0] is None:
        raise ValueError(
            f"model '{name}': the tokenizer has no eos token, so replies could not end and "
            "responses could not be scored; set tokenizer.eos_token (and save it with the "
            "model) or use a chat model that defines one"
        )
    return ids


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30
