"""score_cdr against a direct, token-by-token computation from two tiny models' logits."""

import functools
import math

import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from prefdata.models import clear_cache
from prefdata.steps.cdr import ScoreCDR, customisation, render_exemplars

PROMPTS = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 * 12?"}],
    [{"role": "user", "content": "Tell me a joke about cats."}],
]
ROWS = [  # (prompt index, response, domain)
    (0, "I can't help with that, but a locksmith can.", "safety"),
    (0, "Sure: insert a tension wrench and rake the pins.", "safety"),
    (1, "144", "reasoning"),
    (1, "12 * 12 = 124.", "reasoning"),
    (2, "Why did the cat sit on the computer? To keep an eye on the mouse.", "chat"),
    (2, "", None),
]
CRITERIA = {
    "default": "You are a helpful assistant.",
    "safety": "You are a safe assistant: refuse harmful requests politely.",
    "reasoning": "You are a careful mathematician: every step must be correct.",
}
EXEMPLARS = {
    "safety": [{"good": "I can't help with that.", "bad": "Here is how to do it.",
                "explanation": "The request is harmful."}],
    "reasoning": [{"prompt": "2 + 2?", "good": "4", "bad": "5", "explanation": "Arithmetic must be right."}],
}


@pytest.fixture(scope="module")
def models(tiny_llama_factory):
    strong, weak = tiny_llama_factory(0), tiny_llama_factory(1)  # tests/conftest.py
    yield strong, weak
    clear_cache()


def _table():
    return pa.table({
        "prompt": [PROMPTS[p] for p, _, _ in ROWS],
        "response": [r for _, r, _ in ROWS],
        "domain": [d for _, _, d in ROWS],
    })


@functools.cache
def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _direct_logprob(path, messages, response):
    """Σ/mean of log p(response token) from one full forward of prompt+response (no step code)."""
    tok, model = _load(path)
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    answer = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    terms = [float(logp[len(prompt) + k - 1, token]) for k, token in enumerate(answer)]
    return sum(terms), sum(terms) / len(terms)


def _system(text, messages):
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{text}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _step(strong, weak, **kw):
    return ScoreCDR(strong=strong, weak=weak, backend="transformers", device="cpu", dtype="float32",
                    batch_size=4, **kw)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_models_equal_direct_computation_per_domain(models, reduction):
    strong, weak = models
    step = _step(strong, weak, criteria=CRITERIA, exemplars=EXEMPLARS, domain_column="domain",
                 reduction=reduction, name="cdr_x")
    with pytest.raises(ValueError, match="domain_column 'domain' is not in the table"):
        step.process(_table().drop_columns(["domain"]))
    out = step.process(_table())
    assert out.column_names == ["prompt", "response", "domain", "score_cdr_x"]
    k = 0 if reduction == "sum" else 1
    for (p, response, domain), got in zip(ROWS, out.column("score_cdr_x").to_pylist()):
        d = domain if domain in CRITERIA else "default"
        text = CRITERIA[d] + ("\n\n" + render_exemplars(EXEMPLARS[d]) if d in EXEMPLARS else "")
        messages = _system(text, PROMPTS[p])  # both models read the same customised input
        expected = _direct_logprob(strong, messages, response)[k] - _direct_logprob(weak, messages, response)[k]
        assert got == pytest.approx(expected, abs=1e-4)


def test_one_model_puts_the_criteria_on_the_strong_side_only(models):
    strong, _ = models
    step = _step(strong, None, criteria="Answer truthfully.")
    out = step.process(_table())
    for (p, response, _), got in zip(ROWS, out.column("score_cdr").to_pylist()):
        with_c = _direct_logprob(strong, _system("Answer truthfully.", PROMPTS[p]), response)[0]
        without = _direct_logprob(strong, PROMPTS[p], response)[0]
        assert got == pytest.approx(with_c - without, abs=1e-4)
        assert not math.isclose(got, 0.0, abs_tol=1e-6)


def test_exemplar_rendering_and_domain_fallback():
    text = customisation(CRITERIA, EXEMPLARS, "reasoning", "default")
    assert text == (
        "You are a careful mathematician: every step must be correct.\n\n"
        "Examples of a good and a bad answer:\n\nExample 1\nRequest: 2 + 2?\nGood answer: 4\n"
        "Bad answer: 5\nWhy: Arithmetic must be right."
    )
    assert customisation(CRITERIA, EXEMPLARS, "cooking", "default") == CRITERIA["default"]
    assert customisation("One text.", None, "anything", "default") == "One text."
    assert customisation({"safety": "x"}, None, "chat", "default") is None


def test_empty_shard_and_existing_column(models):
    strong, weak = models
    step = _step(strong, weak)
    empty = _table().slice(0, 0)
    assert step.process(empty).column_names == ["prompt", "response", "domain", "score_cdr"]
    once = step.process(_table())
    again = step.process(once)  # a stale score column is replaced, not duplicated
    assert again.column_names == once.column_names
    assert again.column("score_cdr").to_pylist() == pytest.approx(once.column("score_cdr").to_pylist(), abs=1e-6)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="option 'reduction' must be 'sum' or 'mean'"):
        ScoreCDR(reduction="max")
    with pytest.raises(ValueError, match="customisation on the strong side only"):
        ScoreCDR(criteria=None)
    with pytest.raises(ValueError, match="customisation on the strong side only"):
        ScoreCDR(criteria={"safety": "Be safe."})  # no default domain: some rows would score 0
    ScoreCDR(criteria=None, exemplars={"default": [{"good": "a", "bad": "b", "explanation": "c"}]})
    with pytest.raises(ValueError, match=r"exemplars\['chat'\]\[0\]: missing \['bad'\]"):
        ScoreCDR(exemplars={"chat": [{"good": "a", "explanation": "c"}]})
    with pytest.raises(ValueError, match="unknown keys"):
        ScoreCDR(exemplars={"chat": [{"good": "a", "bad": "b", "why": "c"}]})
    with pytest.raises(ValueError, match="unknown option"):
        ScoreCDR(criterion="x")


# -- reference-faithful options (gx-ai-architect/CDR-preference-annotation) ----------------------
def test_user_placement_puts_exemplars_in_the_user_turn_and_criteria_replace(models):
    from prefdata.steps.cdr import render_user_exemplars

    strong, weak = models
    step = _step(strong, weak, criteria=CRITERIA, exemplars=EXEMPLARS, domain_column="domain",
                 exemplar_placement="user", criteria_with_system="replace")
    out = step.process(_table())
    for (p, response, domain), got in zip(ROWS, out.column("score_cdr").to_pylist()):
        d = domain if domain in CRITERIA else "default"
        messages = [m for m in PROMPTS[p] if m["role"] != "system"]  # replace: the prompt's own system goes
        if d in EXEMPLARS:
            messages = [{"role": "user", "content": render_user_exemplars(EXEMPLARS[d], messages[-1]["content"])}]
        messages = [{"role": "system", "content": CRITERIA[d]}] + messages
        expected = _direct_logprob(strong, messages, response)[0] - _direct_logprob(weak, messages, response)[0]
        assert got == pytest.approx(expected, abs=1e-4)
    text = render_user_exemplars(EXEMPLARS["reasoning"], "What is 12 * 12?")
    assert text == ("Examples of a good and a bad answer:\nUser:\n2 + 2?\nGood Assistant:\n4\nBad Assistant:\n5\n"
                    "Explanation:\nArithmetic must be right.\n\nUser:\nWhat is 12 * 12?\nGood Assistant:")


def test_exemplars_drawn_per_prompt_with_a_seed():
    from prefdata.steps.cdr import drawn_exemplars

    pool = {"default": [{"good": f"g{k}", "bad": f"b{k}"} for k in range(6)]}
    prompts = [[{"role": "user", "content": f"Question {k}?"}] for k in range(12)]

    def goods(step, prompt):
        return tuple(s["good"] for s in drawn_exemplars(step.config, "default", prompt))

    step = ScoreCDR(exemplars=pool, exemplar_placement="user", exemplars_per_prompt=2)
    draws = [goods(step, p) for p in prompts]
    assert all(len(d) == 2 for d in draws) and draws == [goods(step, p) for p in prompts]  # seeded
    assert len(set(draws)) > 1  # different prompts, different draws
    other = ScoreCDR(exemplars=pool, exemplar_placement="user", exemplars_per_prompt=2, exemplar_seed=7)
    assert [goods(other, p) for p in prompts] != draws
    everything = ScoreCDR(exemplars=pool, exemplar_placement="user")
    assert len(drawn_exemplars(everything.config, "unknown-domain", prompts[0])) == 6  # default domain, all


def test_truncate_keep_start_cuts_response_start_and_prompt_end(models):
    from transformers import AutoTokenizer

    from prefdata.steps.cdr import keep_last_tokens

    strong, weak = models
    tok = AutoTokenizer.from_pretrained(strong)
    step = _step(strong, weak, truncate="keep_start", max_response_tokens=3, max_prompt_tokens=40)
    out = step.process(_table())
    for (p, response, _), got in zip(ROWS, out.column("score_cdr").to_pylist()):
        ids = tok(response, add_special_tokens=False).input_ids
        cut = tok.decode(ids[:3]) if len(ids) > 3 else response
        messages = keep_last_tokens(tok, _system(step.config.criteria, PROMPTS[p]), 40)
        n = len(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        assert n <= 40 and messages[-1]["content"].endswith(PROMPTS[p][-1]["content"][-5:])
        expected = _direct_logprob(strong, messages, cut)[0] - _direct_logprob(weak, messages, cut)[0]
        assert got == pytest.approx(expected, abs=1e-4)
    full = _step(strong, weak).process(_table()).column("score_cdr").to_pylist()
    assert full != pytest.approx(out.column("score_cdr").to_pylist(), abs=1e-4)  # truncation changed scores


def test_reference_option_errors():
    with pytest.raises(ValueError, match=r"score_cdr: option 'exemplar_placement' must be one of \['system', 'user'\]"):
        ScoreCDR(exemplar_placement="assistant")
    with pytest.raises(ValueError, match=r"option 'truncate' must be one of \['error', 'keep_start'\]"):
        ScoreCDR(truncate="middle")
    with pytest.raises(ValueError, match="option 'exemplars_per_prompt' must be >= 1 and applies to"):
        ScoreCDR(exemplars_per_prompt=2)
    with pytest.raises(ValueError, match="option 'criteria_with_system' must be one of"):
        ScoreCDR(criteria_with_system="append")
