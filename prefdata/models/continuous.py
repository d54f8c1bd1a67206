"""Continuous batching for sampling with a transformers causal LM.

A static batch keeps computing every row until its longest reply ends: a 5-token and a
96-token reply cost 96 steps each. Here a fixed number of *slots* decode together and a
slot whose draw ends (eos, a stop string, ``max_new_tokens``) takes the next waiting
draw at once, so no step computes a finished row (Yu et al. 2022, "Orca: A Distributed
Serving System for Transformer-Based Generative Models", OSDI: iteration-level
scheduling).

- **One prefill per prompt.** A prompt runs once, alone (no padding), when its first
  draw is admitted; each of its draws copies that KV cache into its slot and samples its
  first token from the same last-position logits.
- **Slots.** One key/value buffer per layer, ``[slots, kv heads, capacity, head dim]``;
  every row starts at column 0 and a decode step writes each row's new key at that row's
  own length, attending through a per-row mask. The buffer grows by doubling; rows of
  finished draws are filled by waiting draws, or by the last rows when none wait.
- **Seeds per draw.** Each draw has its own RNG stream (``draw_seed``) and uses one
  uniform per token: the token is the inverse CDF of that row's nucleus. What a draw
  samples depends on its own logits and its own stream, never on the rows beside it.

Batch composition: the prompt pass and the sampler never see other draws. On CPU the
decode step is made row-exact too: attention runs row by row over exactly that row's
columns (``rowwise_attention``), and the matrix products run on at least ``MIN_ROWS``
rows (idle rows pad the batch), because BLAS (MKL here) computes a row identically for
any batch of 16 rows or more but with other kernels below that. A draw's tokens are then
the same whatever batch size, slot or neighbours it had. On GPU the step is one batched,
masked attention (a loop per row would cost a kernel launch per row and layer): logits
may then differ in the last bits with the batch, which changes a sampled token only when
its uniform falls within that rounding of a CDF boundary (rare in float32, less rare in
bfloat16).
"""

from __future__ import annotations

from collections import Counter, deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

CANDIDATES = 256  # top tokens tried first for the nucleus (a full sort only when they fall short)
MIN_ROWS = 16  # CPU decode steps run at least this many rows: BLAS is row-exact from here on
ROWWISE = "prefdata_rowwise"
_ROW_LENGTHS: ContextVar[list[int] | None] = ContextVar("prefdata_row_lengths", default=None)


@dataclass
class Draw:
    """One reply being sampled: its prompt, its sample index, its RNG stream, its tokens."""

    prompt: int
    sample_index: int
    rng: torch.Generator
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens in this draw's KV row (prompt + generated, last one not yet fed)
    finish_reason: str | None = None


@dataclass(frozen=True)
class DecodeSettings:
    temperature: float
    top_p: float
    max_new_tokens: int
    min_new_tokens: int
    eos_ids: tuple[int, ...]
    slots: int


# -- the KV buffer --------------------------------------------------------------------------
class SlotLayer(DynamicLayer):
    """One layer's keys and values for every slot; a decode step writes one column per row."""

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def allocate(self, like: torch.Tensor, slots: int, capacity: int) -> None:
        shape = (slots, like.shape[1], capacity, like.shape[3])
        self.keys = like.new_zeros(shape)
        self.values = like.new_zeros(shape)
        self.device, self.is_initialized = like.device, True

    def grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        dim = self.keys.shape[-1]
        self.keys.view(-1, dim).index_copy_(0, o.write_at, key_states[:, :, -1].reshape(-1, dim))
        self.values.view(-1, dim).index_copy_(0, o.write_at, value_states[:, :, -1].reshape(-1, dim))
        return self.keys[:o.active, :, :o.width], self.values[:o.active, :, :o.width]

    def get_seq_length(self) -> int:
        return self.owner.width - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0


class SlotCache(Cache):
    """A ``Cache`` the model writes decode steps into, one row per slot."""

    def __init__(self, slots: int, max_length: int):
        super().__init__(layers=[])
        self.slots, self.max_length, self.capacity = slots, max_length, 0
        self.active, self.width = 0, 0
        self.write_at = None

    def write_prompt(self, slot: int, prompt: DynamicCache) -> None:
        """Copy a prefilled prompt's keys and values (batch row 0) into ``slot``."""
        length = prompt.layers[0].keys.shape[2]
        if not self.layers:
            self.layers = [SlotLayer(self) for _ in prompt.layers]
            self.capacity = min(self.max_length, max(2 * length, 64))
            for mine, theirs in zip(self.layers, prompt.layers):
                mine.allocate(theirs.keys, self.slots, self.capacity)
        self._ensure(length)
        for mine, theirs in zip(self.layers, prompt.layers):
            mine.keys[slot, :, :length] = theirs.keys[0]
            mine.values[slot, :, :length] = theirs.values[0]

    def move(self, source: int, target: int, length: int) -> None:
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]

    def begin_step(self, lengths: torch.Tensor) -> None:
        """Rows ``0..len(lengths)-1`` each write their next key at column ``lengths[row]``."""
        self.active, self.width = len(lengths), int(lengths.max()) + 1
        self._ensure(self.width)
        heads = self.layers[0].keys.shape[1]
        # flat row of (slot, head, column) in a [slots * heads * capacity, dim] view
        slot_head = torch.arange(self.active * heads, device=lengths.device)
        self.write_at = slot_head * self.capacity + lengths.repeat_interleave(heads)

    def _ensure(self, width: int) -> None:
        if width > self.capacity:
            self.capacity = min(self.max_length, max(width, 2 * self.capacity))
            for layer in self.layers:
                layer.grow(self.capacity)


# -- row-exact attention (CPU) --------------------------------------------------------------
def rowwise_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode attention, each row alone over exactly its own columns.

    The same arithmetic as a batch of one, whatever the other rows and the padded width;
    query heads are grouped by their key/value head (grouped-query attention).
    """
    lengths = _ROW_LENGTHS.get()
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    rows = []
    for i, n in enumerate(lengths):
        q = query[i:i + 1].reshape(1, kv_heads, heads // kv_heads, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, key[i:i + 1, :, :n], value[i:i + 1, :, :n], scale=scaling)
        rows.append(out.reshape(1, heads, 1, value.shape[-1]))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(ROWWISE, rowwise_attention)


@contextmanager
def _rowwise(model, lengths: list[int]):
    """Route the model's attention through ``rowwise_attention`` for one forward."""
    config = model.config
    previous, token = config._attn_implementation, _ROW_LENGTHS.set(lengths)
    config._attn_implementation = ROWWISE
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ROW_LENGTHS.reset(token)


# -- sampling -------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float,
                top_p: float, candidates: int = CANDIDATES) -> torch.Tensor:
    """One token per row: argmax when greedy, else the inverse CDF of the row's nucleus at
    its uniform (temperature, then the smallest top set holding ``top_p`` of the mass,
    like transformers' top-p). Each row's token depends on that row alone."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return _inverse_cdf(probs, uniforms)
    top, idx = probs.topk(min(candidates, probs.shape[-1]), dim=-1)
    short = top.cumsum(-1)[:, -1] < top_p  # the nucleus reaches past the candidates
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if bool((~short).any()):
        tokens[~short] = _nucleus_token(top[~short], idx[~short], uniforms[~short], top_p)
    if bool(short.any()):
        ranked, order = probs[short].sort(dim=-1, descending=True)
        tokens[short] = _nucleus_token(ranked, order, uniforms[short], top_p)
    return tokens


def _nucleus_token(ranked, order, uniforms, top_p):
    """Keep a token while the mass ranked above it is below ``top_p``; draw among those."""
    kept = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
    return order.gather(-1, _inverse_cdf(kept, uniforms)[:, None])[:, 0]


def _inverse_cdf(weights, uniforms):
    """The first index whose cumulative weight exceeds ``uniform * total`` (zero weights never)."""
    cdf = weights.cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)


# -- the scheduler --------------------------------------------------------------------------
class ContinuousBatcher:
    """Runs draws through a fixed number of slots; call ``run`` once.

    ``rowwise`` (default: on CPU) selects the row-exact decode step; otherwise one batched
    attention with a per-row mask (the GPU path).
    """

    def __init__(self, model, prompts: list[list[int]], draws: list[Draw], settings: DecodeSettings,
                 stop=None, progress=None, rowwise: bool | None = None):
        self.model, self.base = model, model.base_model
        self.device = next(model.parameters()).device
        self.prompts, self.draws, self.s, self.stop = prompts, draws, settings, stop
        self.progress = progress
        self.slots = min(settings.slots, len(draws))
        self.rowwise = self.device.type == "cpu" if rowwise is None else rowwise
        self.rows = max(self.slots, MIN_ROWS) if self.rowwise else self.slots
        longest = max(len(prompts[d.prompt]) for d in draws) if draws else 1
        self.cache = SlotCache(self.rows, longest + settings.max_new_tokens)
        self.prefilled: dict[int, tuple[DynamicCache, torch.Tensor]] = {}
        self.waiting = Counter(d.prompt for d in draws)  # draws not yet admitted, per prompt
        self.eos = torch.tensor(settings.eos_ids, device=self.device)

    def run(self) -> list[Draw]:
        queue = deque(range(len(self.draws)))
        active: list[int | None] = []  # draw index per slot, None where a slot is free
        with torch.inference_mode():
            while queue or active:
                self._fill(queue, active)
                if not queue:
                    self._compact(active)
                if active:
                    self._step(active)
        return self.draws

    # -- admission ---------------------------------------------------------------------------
    def _fill(self, queue: deque, active: list) -> None:
        """Free slots take waiting draws; a draw that ends on its first token frees it again."""
        while queue and (None in active or len(active) < self.slots):
            slot = active.index(None) if None in active else len(active)
            if slot == len(active):
                active.append(None)
            index = queue.popleft()
            if self._admit(self.draws[index], slot):
                active[slot] = index

    def _admit(self, draw: Draw, slot: int) -> bool:
        cache, logits = self._prompt(draw.prompt)
        token = self._sample(logits[None], [draw])[0]
        if self._push(draw, int(token)):
            return False
        self.cache.write_prompt(slot, cache)
        draw.length = len(self.prompts[draw.prompt])
        return True

    def _prompt(self, p: int):
        """The prompt's KV cache and last logits, computed once for all of its draws."""
        if p not in self.prefilled:
            ids = torch.tensor([self.prompts[p]], device=self.device)
            cache = DynamicCache(config=self.model.config)
            out = self.base(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=self.device)[None],
                            cache=cache, use_cache=True)
            self.prefilled[p] = (cache, self._logits(out.last_hidden_state[:, -1])[0])
        found = self.prefilled[p]
        self.waiting[p] -= 1
        if self.waiting[p] == 0:
            del self.prefilled[p]
        return found

    def _compact(self, active: list) -> None:
        """Move the last busy rows into free slots so a step runs only busy rows."""
        while active and active[-1] is None:
            active.pop()
        while None in active:
            hole = active.index(None)
            last = active.pop()
            self.cache.move(len(active), hole, self.draws[last].length)
            active[hole] = last
            while active and active[-1] is None:
                active.pop()

    # -- decoding ----------------------------------------------------------------------------
    def _step(self, active: list) -> None:
        """One token for every busy row; rows that end free their slot."""
        draws = [self.draws[i] for i in active]
        logits = self._forward([d.tokens[-1] for d in draws], [d.length for d in draws])
        tokens = self._sample(logits, draws).tolist()
        for slot, (draw, token) in enumerate(zip(draws, tokens)):
            draw.length += 1
            if self._push(draw, token):
                active[slot] = None

    def _forward(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """Logits after feeding each row its last token (written at column ``length``)."""
        busy = len(tokens)
        if self.rowwise and busy < self.rows:  # idle rows keep the batch at MIN_ROWS
            idle = self.rows - busy
            tokens, lengths = tokens + [self.s.eos_ids[0]] * idle, lengths + [0] * idle
        at = torch.tensor(lengths, device=self.device)
        self.cache.begin_step(at)
        kwargs = dict(input_ids=torch.tensor(tokens, device=self.device)[:, None],
                      position_ids=at[:, None], cache=self.cache, use_cache=True)
        if self.rowwise:
            with _rowwise(self.model, [n + 1 for n in lengths]):
                out = self.base(**kwargs)
        else:
            out = self.base(attention_mask=_decode_mask(at, self.cache.width, self.model), **kwargs)
        return self._logits(out.last_hidden_state[:, -1])[:busy]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _sample(self, logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
        early = [row for row, d in enumerate(draws) if len(d.tokens) < self.s.min_new_tokens]
        if early:  # a copy: the prompt's logits are shared by its draws
            logits = logits.clone()
            logits[torch.tensor(early, device=logits.device)[:, None], self.eos[None, :]] = float("-inf")
        uniforms = None
        if self.s.temperature > 0:
            uniforms = torch.cat([torch.rand(1, generator=d.rng) for d in draws]).to(logits.device)
        return sample_next(logits, uniforms, self.s.temperature, self.s.top_p).cpu()

    def _push(self, draw: Draw, token: int) -> bool:
        """Add a token to a draw; True when the draw has ended (its reason recorded)."""
        if token in self.s.eos_ids:
            draw.finish_reason = "stop"
        else:
            draw.tokens.append(token)
            if self.stop is not None and self.stop.reached(draw.tokens):
                draw.finish_reason = "stop"
            elif len(draw.tokens) >= self.s.max_new_tokens:
                draw.finish_reason = "length"
        if draw.finish_reason and self.progress is not None:
            self.progress.update(1)
        return draw.finish_reason is not None


def _decode_mask(lengths: torch.Tensor, width: int, model) -> torch.Tensor:
    """``[rows, 1, 1, width]``: each row sees its own columns ``0..length`` (the new one last).

    Boolean for SDPA and flex attention; additive (0 / dtype minimum) for eager attention.
    """
    seen = torch.arange(width, device=lengths.device)[None, :] <= lengths[:, None]
    seen = seen[:, None, None, :]
    if getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return seen
    dtype = next(model.parameters()).dtype
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)


class StopStrings:
    """Ends a draw at the first stop string, as vLLM does: only text after ``min_new_tokens``.

    ``reached`` decodes only the last few tokens (cheap, checked every step); ``cut`` finds
    the first stop string in the final text and returns the text before it.
    """

    def __init__(self, stop: tuple[str, ...], tokenizer, min_new_tokens: int = 0):
        self.stop, self.tokenizer, self.min_new_tokens = stop, tokenizer, min_new_tokens
        self.window = max(len(s) for s in stop) + 4

    def reached(self, tokens: list[int]) -> bool:
        if len(tokens) <= self.min_new_tokens:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stop)

    def cut(self, text: str, tokens: list[int]) -> tuple[str, bool]:
        """The text before the first stop string ending after the first ``min_new_tokens``."""
        floor = 0
        if self.min_new_tokens:
            floor = len(self.tokenizer.decode(tokens[:self.min_new_tokens], skip_special_tokens=True))
        hits = [k for k in (text.find(s, max(0, floor - len(s) + 1)) for s in self.stop) if k >= 0]
        return (text[:min(hits)], True) if hits else (text, False)
