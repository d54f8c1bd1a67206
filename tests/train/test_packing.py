"""Prefix sharing gives the log-probs of separate prompt+response forwards."""

import pytest
import torch

from prefdata.train.packing import attention_mask, collate, response_logps


def unpacked_logps(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(-1, torch.tensor(response)[:, None]).sum().item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for p_len, lens in [(7, [5, 9]), (3, [4, 2, 6]), (11, [1, 3])]:
        prompt = torch.randint(10, 1000, (p_len,), generator=g).tolist()
        rows.append((prompt, [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lens]))
    with torch.no_grad():
        sums, counts = response_logps(model, collate(rows, pad_id=0), "cpu")
        for b, (prompt, responses) in enumerate(rows):
            for k, resp in enumerate(responses):
                assert counts[b, k] == len(resp)
                assert sums[b, k].item() == pytest.approx(unpacked_logps(model, prompt, resp), abs=1e-4)
            assert (counts[b, len(responses):] == 0).all()


def test_mask_keeps_responses_apart():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    allowed = attention_mask(seg)[0, 0] == 0
    assert allowed[4, :2].all() and not allowed[4, 2:4].any()   # rejected sees prompt, not chosen
    assert allowed[3, 2] and not allowed[2, 3]                   # causal inside a response
    assert allowed[6].tolist() == [False] * 6 + [True]           # padding only sees itself
