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
  finished draws are filled by waiting draws, and busy rows are moved to the front (on
  CPU also ordered by bucket, below).
- **Seeds per draw.** Each draw has its own RNG stream (``draw_seed``) and uses one
  uniform per token: the token is the inverse CDF of that row's nucleus. What a draw
  samples depends on its own logits and its own stream, never on the rows beside it.

Batch composition: the prompt pass and the sampler never see other draws. On CPU the
decode step is made row-exact too (measured here, and tested in
``tests/models/test_continuous_invariance.py``):

- *Matrix products* run on at least ``MIN_ROWS`` rows (idle rows pad the batch): BLAS
  (MKL here) computes a row identically for any batch of 16 rows or more, with other
  kernels below that. With several threads that holds only up to 56 rows (another kernel
  takes over from 57 rows when the inner dimension is 1536), so there a step of more than
  ``MAX_ROWS`` rows runs each linear layer in near-equal pieces of 24 to 48 rows
  (``_row_pieces``); one thread needs none (measured up to 256 rows).
- *Attention* reads each row's columns up to its *bucket*, its own length rounded up to a
  multiple of ``BUCKET`` (columns past its length masked). Busy rows are kept ordered by
  bucket in the slots and each run of rows with one bucket is one attention call
  (``grouped_attention``). The attention kernel computes each batch entry alone and the
  same way whatever the count of entries; only the width a row reads over changes the
  order of its sums, and that width is the row's own.

A draw's tokens are then the same whatever batch size, slot or neighbours it had. On GPU
the step is one batched, masked attention over all rows: logits may then differ in the
last bits with the batch, which changes a sampled token only when its uniform falls within
that rounding of a CDF boundary (rare in float32, less rare in bfloat16).
"""

from __future__ import annotations

from collections import Counter, deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

CANDIDATES = 256  # top tokens tried first for the nucleus (a full sort only when they fall short)
MIN_ROWS = 16  # CPU decode steps run at least this many rows: BLAS is row-exact from here on
MAX_ROWS = 48  # ... up to here at any thread count; with threads, longer batches run in pieces
BUCKET = 32  # CPU decode attention reads a row's columns up to its length rounded up to this
GROUPED = "prefdata_grouped"
_GROUPS: ContextVar[list | None] = ContextVar("prefdata_groups", default=None)


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

    def move(self, sources: list[int], targets: list[int], length: int) -> None:
        """Row ``sources[k]`` goes to row ``targets[k]`` (columns ``:length``), all at once,
        so a target may be another move's source."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.layers[0].keys.device)
        dst = torch.tensor(targets, device=src.device)
        for layer in self.layers:
            for name in ("keys", "values"):
                buf = getattr(layer, name)
                buf[dst, :, :length] = buf[src, :, :length]  # the right side is a copy

    def begin_step(self, lengths: torch.Tensor, width: int | None = None) -> None:
        """Rows ``0..len(lengths)-1`` each write their next key at column ``lengths[row]``;
        attention may read columns ``:width`` (default: up to the longest row's new key)."""
        self.active, self.width = len(lengths), width or int(lengths.max()) + 1
        self._ensure(self.width)
        heads = self.layers[0].keys.shape[1]
        # flat row of (slot, head, column) in a [slots * heads * capacity, dim] view
        slot_head = torch.arange(self.active * heads, device=lengths.device)
        self.write_at = slot_head * self.capacity + lengths.repeat_interleave(heads)

    def _ensure(self, width: int) -> None:
        if width > self.capacity:
            self.capacity = max(width, min(self.max_length, 2 * self.capacity))
            for layer in self.layers:
                layer.grow(self.capacity)


# -- row-exact attention (CPU) --------------------------------------------------------------
def bucket(columns: int) -> int:
    """The width a row's decode attention reads: its column count rounded up to ``BUCKET``."""
    return -(-columns // BUCKET) * BUCKET


def attention_groups(columns: list[int], device) -> list[tuple[int, int, int, torch.Tensor]]:
    """``(first row, end row, width, mask)`` for each run of consecutive rows with one bucket;
    the mask ``[rows, 1, 1, width]`` lets a row see its own ``columns`` only."""
    groups, start = [], 0
    for row in range(1, len(columns) + 1):
        if row == len(columns) or bucket(columns[row]) != bucket(columns[start]):
            width = bucket(columns[start])
            seen = torch.tensor(columns[start:row], device=device)
            mask = torch.arange(width, device=device)[None, :] < seen[:, None]
            groups.append((start, row, width, mask[:, None, None, :]))
            start = row
    return groups


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode attention, one call per run of rows that share a bucket (``attention_groups``).

    A row reads exactly the columns up to its bucket, masked past its length, so its
    result is the same whatever rows share its call; query heads are grouped by their
    key/value head (grouped-query attention). Rows after the last group (idle padding)
    get zeros.
    """
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    out = query.new_zeros(rows, heads, 1, value.shape[-1])
    for first, end, width, mask in _GROUPS.get():
        q = query[first:end].reshape(end - first, kv_heads, heads // kv_heads, dim)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, key[first:end, :, :width], value[first:end, :, :width], attn_mask=mask, scale=scaling)
        out[first:end] = o.reshape(end - first, heads, 1, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, grouped_attention)


@contextmanager
def _grouped(model, groups: list):
    """Route the model's attention through ``grouped_attention`` for one forward."""
    config = model.config
    previous, token = config._attn_implementation, _GROUPS.set(groups)
    config._attn_implementation = GROUPED
    try:
        yield
    finally:
        config._attn_implementation = previous
        _GROUPS.reset(token)


@contextmanager
def _row_pieces(linears: list, rows: int):
    """With several threads, run each linear layer on at most ``MAX_ROWS`` rows at a time."""
    if rows <= MAX_ROWS or torch.get_num_threads() == 1:
        yield
        return
    pieces = -(-rows // MAX_ROWS)
    for layer in linears:
        layer.forward = partial(_linear_in_pieces, layer, pieces)
    try:
        yield
    finally:
        for layer in linears:
            del layer.forward


def _linear_in_pieces(layer, pieces: int, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = [torch.nn.functional.linear(part, layer.weight, layer.bias) for part in flat.tensor_split(pieces)]
    return torch.cat(out).reshape(*x.shape[:-1], -1)


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
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def run(self) -> list[Draw]:
        queue = deque(range(len(self.draws)))
        active: list[int | None] = []  # draw index per slot, None where a slot is free
        with torch.inference_mode():
            while queue or active:
                self._fill(queue, active)
                if self.rowwise:
                    self._arrange(active)
                elif not queue:
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
            self.cache.move([len(active)], [hole], self.draws[last].length)
            active[hole] = last
            while active and active[-1] is None:
                active.pop()

    def _arrange(self, active: list) -> None:
        """Busy rows to slots ``0..busy-1``, ordered by the bucket their next step reads, so
        each bucket is one run of rows (one attention call). Only rows outside their
        bucket's run move: a row that crosses into the next bucket, say, swaps with the
        last row of its run."""
        busy = [i for i in active if i is not None]
        widths = {i: bucket(self.draws[i].length + 1) for i in busy}
        ranges, start = {}, 0
        for w in sorted(set(widths.values())):
            count = sum(1 for v in widths.values() if v == w)
            ranges[w], start = range(start, start + count), start + count
        placed: list[int | None] = [None] * len(busy)
        movers = []
        for slot, i in enumerate(active):
            if i is None:
                continue
            if slot in ranges[widths[i]]:
                placed[slot] = i
            else:
                movers.append((slot, i))
        sources, targets = [], []
        free = {w: [p for p in r if placed[p] is None] for w, r in ranges.items()}
        for slot, i in movers:
            target = free[widths[i]].pop()
            placed[target] = i
            sources.append(slot)
            targets.append(target)
        self.cache.move(sources, targets, max((self.draws[active[s]].length for s in sources), default=0))
        active[:] = placed

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
        if self.rowwise and busy < MIN_ROWS:  # idle rows keep the batch at MIN_ROWS
            idle = MIN_ROWS - busy
            tokens, lengths = tokens + [self.s.eos_ids[0]] * idle, lengths + [0] * idle
        at = torch.tensor(lengths, device=self.device)
        kwargs = dict(input_ids=torch.tensor(tokens, device=self.device)[:, None],
                      position_ids=at[:, None], cache=self.cache, use_cache=True)
        if self.rowwise:
            groups = attention_groups([n + 1 for n in lengths[:busy]], self.device)
            self.cache.begin_step(at, max(width for _, _, width, _ in groups))
            with _grouped(self.model, groups), _row_pieces(self.linears, len(tokens)):
                out = self.base(**kwargs)
                return self._logits(out.last_hidden_state[:, -1])[:busy]
        else:
            self.cache.begin_step(at)
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
