"""Prefix sharing gives the log-probs of separate prompt+response forwards."""

import numpy as np
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


@pytest.fixture(scope="module")
def sliding_window_model(tmp_path_factory) -> str:
    """A tiny Mistral whose 6-token sliding window is shorter than every row: the packed
    path's own mask would let responses see the whole prompt."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from prefdata.models.hub import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=6, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny-mistral-sw")
    MistralForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def test_packing_is_checked_and_refused_or_replaced_for_a_sliding_window_model(
        sliding_window_model, tiny_model, pairs_file, tmp_path, caplog):
    import logging

    from train_data import direct_logps

    from prefdata.train.trainer import train
    from test_trainer import cfg_for, log_rows

    data = pairs_file(6)
    with pytest.raises(ValueError, match=r"tiny-mistral-sw\d* \(MistralForCausalLM\): packed log-probs differ "
                                         r"from the model's own forward by \d\.\d\de[-+]\d+ relative"):
        train(cfg_for(data, sliding_window_model, tmp_path / "on", max_steps=1, packing="on", eval_fraction=0.0))
    with caplog.at_level(logging.WARNING):
        summary = train(cfg_for(data, sliding_window_model, tmp_path / "auto", max_steps=1, eval_fraction=0.0,
                                loss="simpo", batch_size=6))
    assert summary["packing"] == "off" and summary["packing_check_rel_error"] > 1e-4
    assert "training unpacked" in caplog.text
    # the unpacked fallback gives the model's own log-probs: SimPO's first loss from ordinary forwards
    lp, n = direct_logps(sliding_window_model, data)
    r = lp / n
    want = np.mean(np.logaddexp(0.0, -(2.0 * (r[:, 0] - r[:, 1]) - 0.5)))
    assert log_rows(tmp_path / "auto")[-1]["loss"] == pytest.approx(want, rel=1e-4)
    # a plain Llama passes the check and stays packed
    ok = train(cfg_for(data, tiny_model, tmp_path / "llama", max_steps=1, eval_fraction=0.0, loss="simpo"))
    assert ok["packing"] == "on" and ok["packing_check_rel_error"] < 1e-4
