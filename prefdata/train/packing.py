"""Prefix sharing: a prompt and all its responses in one sequence, one forward pass.

A row is ``prompt | response_1 | response_2 | ...``. A custom 4D attention mask lets each
response see the prompt and its own earlier tokens, never another response, and the
position ids of every response restart right after the prompt — so each response gets
exactly the log-probabilities of an unpacked ``prompt + response`` forward, while the
prompt is computed once. Rows in a micro-batch are right-padded; padding is masked out.
Wang & Hegde, "Accelerating Direct Preference Optimization with Prefix Sharing", 2024.

transformers 5 passes a 4D ``attention_mask`` straight to the attention function; we give
it an additive float mask (0 = attend, dtype-min = blocked), which both ``sdpa`` and
``eager`` read correctly.
"""

from __future__ import annotations

import torch

from prefdata.train.adapters import backbone

SUPPORTED_ATTENTION = ("sdpa", "eager")


def pack(prompt: list[int], responses: list[list[int]]):
    """Token ids, position ids and segment ids (0 prompt, k+1 response k) of one row."""
    ids, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    for k, resp in enumerate(responses):
        ids += resp
        pos += range(len(prompt), len(prompt) + len(resp))
        seg += [k + 1] * len(resp)
    return ids, pos, seg


def packed_length(prompt: list[int], responses: list[list[int]]) -> int:
    return len(prompt) + sum(len(r) for r in responses)


def collate(rows: list[tuple[list[int], list[list[int]]]], pad_id: int, dtype=torch.float32):
    """Tensors for one forward over packed rows, and where each response token is scored.

    ``rows`` is a list of (prompt ids, [response ids, ...]). Returns a dict with
    ``input_ids``, ``position_ids``, ``attention_mask`` [B,1,L,L], and the flat indices of
    the hidden states that predict each response token (``pred_index``), the tokens
    (``targets``) and which (row, response) they belong to (``owner``, = row*K + k).
    """
    B = len(rows)
    K = max(len(r) for _, r in rows)
    packed = [pack(p, r) for p, r in rows]
    L = max(len(ids) for ids, _, _ in packed)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segments = torch.full((B, L), -1, dtype=torch.long)
    pred, targets, owner = [], [], []
    for b, ((prompt, responses), (ids, pos, seg)) in enumerate(zip(rows, packed)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        position_ids[b, :n] = torch.tensor(pos)
        segments[b, :n] = torch.tensor(seg)
        start = len(prompt)
        for k, resp in enumerate(responses):
            # token j of response k is predicted by the token before it: the prompt's last
            # token for j = 0, else the response's own previous token
            before = [len(prompt) - 1] + list(range(start, start + len(resp) - 1))
            pred += [b * L + i for i in before]
            targets += resp
            owner += [b * K + k] * len(resp)
            start += len(resp)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask(segments, dtype),
        "pred_index": torch.tensor(pred, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "owner": torch.tensor(owner, dtype=torch.long),
        "shape": (B, K),
    }


def attention_mask(segments: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive [B,1,L,L] mask: causal, and a response token sees only the prompt and itself.

    Padding (segment -1) sees only itself, so no row of the softmax is empty.
    """
    L = segments.shape[1]
    q = segments[:, :, None]
    k = segments[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & (k != -1) & (q != -1) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def response_logps(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B,K] and token counts [B,K] of every response in a packed batch.

    Only the positions that predict response tokens go through the LM head (the prompt's
    logits are never formed), and log-softmax is taken as logit − logsumexp.
    """
    model = backbone(model)
    attn = model.config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"prefix sharing needs attn_implementation in {SUPPORTED_ATTENTION}, the model uses {attn!r}"
        )
    B, K = batch["shape"]
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = next(model.parameters()).dtype
    mask = batch["attention_mask"].to(device)
    if mask.dtype != dtype:
        mask = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    out = model.base_model(
        input_ids=batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=mask,
        use_cache=False,
    )
    hidden = out.last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["pred_index"].to(device)]
    logits = model.get_output_embeddings()(hidden).float()
    targets = batch["targets"].to(device)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    owner = batch["owner"].to(device)
    sums = torch.zeros(B * K, dtype=torch.float32, device=device).index_add(0, owner, token_logps)
    counts = torch.zeros(B * K, dtype=torch.float32, device=device).index_add(
        0, owner, torch.ones_like(token_logps)
    )
    return sums.view(B, K), counts.view(B, K)


def packed_logps(model, rows, device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B,K] and token counts [B,K] of ``rows`` in one prefix-shared forward."""
    return response_logps(model, collate(rows, pad_id=pad_id), device)


def unpacked_logps(model, rows, device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same numbers from one ordinary ``model(prompt + response)`` forward per response.

    The model's own forward (its attention masks, sliding windows, logit scaling and
    soft-capping), so it is the ground truth the packed path is checked against and the
    fallback when they differ. Slower: the prompt is computed once per response.
    """
    K = max(len(r) for _, r in rows)
    sums = torch.zeros(len(rows), K, dtype=torch.float32, device=device)
    counts = torch.zeros(len(rows), K, dtype=torch.float32, device=device)
    for b, (prompt, responses) in enumerate(rows):
        for k, resp in enumerate(responses):
            ids = torch.tensor([prompt + resp], device=device)
            logits = _logits(model, ids, len(resp) + 1)[0, -len(resp) - 1:-1].float()
            target = torch.tensor(resp, device=device)
            token_logps = logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            sums[b, k] = token_logps.sum()
            counts[b, k] = len(resp)
    return sums, counts


def _logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    try:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=ids, use_cache=False).logits
