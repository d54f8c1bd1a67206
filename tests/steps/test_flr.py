"""score_flr against a direct token-by-token computation of follow-up likelihoods (tiny model)."""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefdata.models import clear_cache
from prefdata.steps.flr import DEFAULT_NEGATIVE, DEFAULT_POSITIVE, ScoreFLR, user_view

PROMPTS = [
    [{"role": "user", "content": "What is 12 * 12?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
]
ROWS = [(0, "144"), (0, "12 * 12 = 124."), (1, "An apple."), (1, "")]


@pytest.fixture(scope="module")
def model(tiny_llama):
    yield tiny_llama
    clear_cache()


@functools.cache
def _load(path):
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _follow_up_logprob(path, prompt, response, follow_up):
    """Per-token log p of the follow-up as the user's next turn, from one full forward pass."""
    tok, lm = _load(path)
    swapped = [{"role": {"user": "assistant", "assistant": "user"}.get(m["role"], m["role"]), "content": m["content"]}
               for m in prompt + [{"role": "assistant", "content": response}]]
    context = list(tok.apply_chat_template(swapped, add_generation_prompt=True)["input_ids"])
    target = tok(follow_up, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([context + target])).logits[0].double(), -1)
    terms = [float(logp[len(context) + k - 1, t]) for k, t in enumerate(target)]
    return sum(terms), sum(terms) / len(terms)


def _table():
    return pa.table({"prompt": [PROMPTS[p] for p, _ in ROWS], "response": [r for _, r in ROWS]})


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_score_is_positive_minus_negative_follow_up_likelihood(model, reduction):
    pos, neg = ["Thanks, that helped.", "Perfect!"], ["That's wrong."]
    step = ScoreFLR(model=model, positive=pos, negative=neg, reduction=reduction, backend="transformers",
                    device="cpu", dtype="float32", batch_size=3)
    out = step.process(_table())
    assert out.column_names == ["prompt", "response", "score_flr"]
    k = 1 if reduction == "mean" else 0
    for (p, response), got in zip(ROWS, out.column("score_flr").to_pylist()):
        lp = lambda f: _follow_up_logprob(model, PROMPTS[p], response, f)[k]  # noqa: E731
        expected = np.mean([lp(f) for f in pos]) - np.mean([lp(f) for f in neg])
        assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(np.round(out.column("score_flr").to_pylist(), 6))) == len(ROWS)  # responses differ


def test_user_view_swaps_roles_and_keeps_system_first():
    view = user_view(PROMPTS[1], "An apple.")
    assert view == [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Name a fruit."},
                    {"role": "user", "content": "An apple."}]


def test_defaults_empty_shard_and_bad_options(model):
    step = ScoreFLR(model=model, backend="transformers", device="cpu")
    assert step.config.positive == DEFAULT_POSITIVE and step.config.negative == DEFAULT_NEGATIVE
    assert [r.name for r in step.models()] == [model]  # the model identity enters the fingerprint
    assert step.process(_table().slice(0, 0)).column_names == ["prompt", "response", "score_flr"]
    with pytest.raises(ValueError, match=r"score_flr: option 'negative' must be a non-empty list"):
        ScoreFLR(negative=[])
    with pytest.raises(ValueError, match=r"score_flr: follow-ups \['Ok.'\] are in both"):
        ScoreFLR(positive=["Ok."], negative=["Ok."])
    with pytest.raises(ValueError, match="option 'reduction' must be 'sum' or 'mean'"):
        ScoreFLR(reduction="max")
