"""score_flr against a direct token-by-token computation of follow-up likelihoods (tiny model)."""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefdata.models import clear_cache
from prefdata.flr_followups import ASPECTS, NEGATIVE, POSITIVE
from prefdata.steps.flr import ScoreFLR, follow_ups, user_view

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


def test_defaults_are_the_reference_codes_six_aspect_lists(model):
    """github.com/e0397123/FLR utils.py: ten positive and ten negative follow-ups per aspect."""
    step = ScoreFLR(model=model, backend="transformers", device="cpu")
    assert step.config.aspects == list(ASPECTS) == ["understanding", "relevance", "correctness", "engagingness",
                                                    "informativeness", "following"]
    pos, neg = follow_ups(step.config)
    assert len(pos) == len(neg) == 60 and all(len(POSITIVE[a]) == len(NEGATIVE[a]) == 10 for a in ASPECTS)
    assert pos[0] == "You\u2019re very clear and easy to understand." and neg[-1] == "You didn't stick to my instructions."
    assert pos.count("That makes perfect sense!") == 2  # the reference repeats it: it counts twice
    assert [r.name for r in step.models()] == [model]  # the model identity enters the fingerprint
    assert step.process(_table().slice(0, 0)).column_names == ["prompt", "response", "score_flr"]


def test_aspects_average_their_positive_minus_negative_scores(model):
    """score = mean over aspects of (mean ℓ over the aspect's positives − mean over its negatives),
    repeated follow-ups counted as often as listed (``understanding`` and ``informativeness`` repeat one)."""
    aspects = ["understanding", "informativeness"]
    step = ScoreFLR(model=model, aspects=aspects, backend="transformers", device="cpu", dtype="float32",
                    batch_size=8)
    rows = ROWS[:2]
    table = pa.table({"prompt": [PROMPTS[p] for p, _ in rows], "response": [r for _, r in rows]})
    got = step.process(table).column("score_flr").to_pylist()
    for (p, response), value in zip(rows, got):
        cache = {}

        def lp(f):
            if f not in cache:
                cache[f] = _follow_up_logprob(model, PROMPTS[p], response, f)[1]
            return cache[f]

        per_aspect = [np.mean([lp(f) for f in POSITIVE[a]]) - np.mean([lp(f) for f in NEGATIVE[a]]) for a in aspects]
        assert value == pytest.approx(np.mean(per_aspect), abs=1e-4)


def test_bad_options_name_the_step_and_option(model):
    with pytest.raises(ValueError, match=r"score_flr: option 'negative' must be a non-empty list"):
        ScoreFLR(negative=[])
    with pytest.raises(ValueError, match=r"score_flr: follow-ups \['Ok.'\] are in both"):
        ScoreFLR(positive=["Ok."], negative=["Ok."])
    with pytest.raises(ValueError, match="option 'reduction' must be 'sum' or 'mean'"):
        ScoreFLR(reduction="max")
    with pytest.raises(ValueError, match=r"score_flr: option 'aspects' must list some of \['understanding'"):
        ScoreFLR(aspects=["politeness"])
    with pytest.raises(ValueError, match=r"option 'aspects' must list some of"):
        ScoreFLR(aspects=[], positive=["Great."])
    ScoreFLR(aspects=[], positive=["Great."], negative=["Bad."])  # own lists need no aspect
