"""The transformers backend against direct computations on a real (tiny, random) Llama."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prefdata.models import Sampling, clear_cache, load_model
from prefdata.models.hub import SMOLLM2, resolve
from prefdata.testing import make_eos_prone

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "Name three rivers in Europe and say which is longest."}],
    [{"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And times three?"}],
]
RESPONSES = ["Hello there!", "La Volga est le plus long fleuve d'Europe.", "12"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved like a user's checkpoint."""
    tok = AutoTokenizer.from_pretrained(resolve(SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    yield str(path)
    clear_cache()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir, backend="transformers", device="cpu", dtype="float32")


def _direct(lm, conversation, response):
    """Full-sequence forward pass, one unpadded sequence, response positions picked by hand."""
    tok = lm.tokenizer
    prompt = list(tok.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"])
    answer = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        out = lm.model(ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].double(), dim=-1)
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(answer)):
        total += float(logp[t - 1, ids[0, t]])
    hidden = out.hidden_states[-1][0, len(prompt) - 1: len(prompt) + len(answer) - 1].numpy()
    return total, len(answer), hidden


def test_logprobs_equal_direct_computation(tiny):
    got = tiny.logprobs(CONVERSATIONS, RESPONSES)
    for conv, resp, lp in zip(CONVERSATIONS, RESPONSES, got):
        total, count, _ = _direct(tiny, conv, resp)
        assert lp.n_tokens == count
        assert lp.sum == pytest.approx(total, abs=1e-4)
        assert lp.mean == pytest.approx(total / count, abs=1e-4)


def test_batching_does_not_change_logprobs(tiny_dir, tiny):
    one_at_a_time = load_model(tiny_dir, backend="transformers", device="cpu", dtype="float32",
                               batch_size=1)
    assert one_at_a_time.model is tiny.model  # a batch-size variant shares the weights
    convs, resps = CONVERSATIONS * 2, RESPONSES[::-1] * 2
    batched = tiny.logprobs(convs, resps)
    single = one_at_a_time.logprobs(convs, resps)
    for a, b in zip(batched, single):
        assert a.n_tokens == b.n_tokens
        assert a.sum == pytest.approx(b.sum, abs=1e-4)


def test_hidden_states_equal_direct_slices(tiny):
    got = tiny.hidden_states(CONVERSATIONS, RESPONSES)
    for conv, resp, h in zip(CONVERSATIONS, RESPONSES, got):
        _, count, expected = _direct(tiny, conv, resp)
        assert h.dtype == np.float32 and h.shape == (count, tiny.model.config.hidden_size)
        np.testing.assert_allclose(h, expected, atol=1e-4)


def test_generate_counts_seeds_and_order(tiny):
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=1)
    first = tiny.generate(CONVERSATIONS, 3, sampling)
    assert [len(r) for r in first] == [3, 3, 3]
    assert all(isinstance(t, str) for r in first for t in r)
    torch.manual_seed(1234)  # the global RNG state must not matter
    assert tiny.generate(CONVERSATIONS, 3, sampling) == first
    other = tiny.generate(CONVERSATIONS, 3, Sampling(temperature=1.0, max_new_tokens=6, seed=2))
    assert other != first
    # Greedy replies of a length-sorted, padded batch come back in input order.
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    batched = tiny.generate(CONVERSATIONS, 2, greedy)
    singles = [tiny.generate([c], 1, greedy)[0][0] for c in CONVERSATIONS]
    assert batched == [[s, s] for s in singles]


def test_too_long_input_names_the_item(tiny):
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ValueError, match="item 1"):
        tiny.logprobs([CONVERSATIONS[0], long], ["a", "b"])
    with pytest.raises(ValueError, match="item 0"):
        tiny.generate([long], 1, Sampling(max_new_tokens=4))


def test_smollm2_short_reply_is_clean_text():
    lm = load_model(SMOLLM2, backend="transformers", device="cpu")
    replies = lm.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]], 2,
        Sampling(temperature=0.0, max_new_tokens=16),
    )
    text = replies[0][0]
    assert text.strip() and replies[0][1] == text
    assert not any(s in text for s in lm.tokenizer.all_special_tokens)


def test_sampler_draws_inside_the_transformers_nucleus_and_row_by_row():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from prefdata.models.continuous import sample_next

    torch.manual_seed(0)
    scores = torch.randn(64, 1000) * 4
    scores[:8] /= 8  # flat rows: the nucleus reaches past the 16 candidates (full sort)
    nucleus = torch.isfinite(TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, scores)))
    for _ in range(20):
        u = torch.rand(64)
        tokens = sample_next(scores, u, 0.7, 0.9, candidates=16)
        assert nucleus[torch.arange(64), tokens].all()
        # a row's token depends on its own logits and uniform only
        alone = torch.cat([sample_next(scores[i:i + 1], u[i:i + 1], 0.7, 0.9, candidates=16) for i in (0, 9, 63)])
        assert alone.tolist() == tokens[[0, 9, 63]].tolist()
    # the inverse CDF follows the probabilities (top_p = 1: plain sampling)
    probs = torch.softmax(scores[:1] / 0.7, -1)[0]
    u = torch.linspace(0, 1, 20001)[:-1]
    drawn = sample_next(scores[:1].expand(len(u), -1), u, 0.7, 1.0)
    freq = torch.bincount(drawn, minlength=1000).float() / len(u)
    assert (freq - probs).abs().max() < 1e-3
    assert sample_next(scores, None, 0.0, 0.9).tolist() == scores.argmax(-1).tolist()


# -- prefix sharing: each prompt once, its responses continuing from its KV cache ------------
GROUPED = [  # several responses per prompt, lengths varied, one empty (eos only)
    (CONVERSATIONS[1], ["La Volga.", "", "Le Danube, puis le Rhin; la Volga est la plus longue."]),
    (CONVERSATIONS[0], ["Hello there!", "Hi! How can I help you today?"]),
    (CONVERSATIONS[2], ["12", "Twelve.", "4 times 3 is 12.", "36"]),
]


def _flat(grouped):
    convs = [c for c, rs in grouped for _ in rs]
    resps = [r for _, rs in grouped for r in rs]
    return convs, resps


@pytest.fixture(scope="module")
def unshared(tiny_dir):
    return load_model(tiny_dir, backend="transformers", device="cpu", dtype="float32", share_prompts=False)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_shared_prompts_equal_unshared_and_direct(tiny_dir, unshared, batch_size):
    shared = load_model(tiny_dir, backend="transformers", device="cpu", dtype="float32", batch_size=batch_size)
    assert shared.share_prompts and not unshared.share_prompts
    convs, resps = _flat(GROUPED)
    # interleave prompts so groups are not adjacent in the input
    order = [0, 3, 5, 1, 4, 6, 2, 7, 8]
    convs, resps = [convs[i] for i in order], [resps[i] for i in order]
    got, plain = shared.logprobs(convs, resps), unshared.logprobs(convs, resps)
    for conv, resp, a, b in zip(convs, resps, got, plain):
        total, count, _ = _direct(shared, conv, resp)
        assert a.n_tokens == b.n_tokens == count
        assert a.sum == pytest.approx(b.sum, abs=1e-4) and a.sum == pytest.approx(total, abs=1e-4)
    hs, hp = shared.hidden_states(convs, resps), unshared.hidden_states(convs, resps)
    for conv, resp, a, b in zip(convs, resps, hs, hp):
        _, count, expected = _direct(shared, conv, resp)
        assert a.shape == b.shape == (count, shared.model.config.hidden_size)
        np.testing.assert_allclose(a, expected, atol=1e-4)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_shared_path_runs_each_prompt_once_and_pads_only_to_its_batch(tiny):
    """Token count through the model: each distinct prompt once, responses minus their last token."""
    convs, resps = _flat(GROUPED)
    calls = []
    hook = tiny.model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        tiny.logprobs(convs, resps)
    finally:
        hook.remove()
    prompt_lens = [len(tiny._prompt_ids(c)) for c, _ in GROUPED]
    answer_lens = [len(tiny._response_ids(r)) for r in resps]
    # batch_size 16 holds everything: one prompt pass, one response pass
    assert calls[0] == (len(GROUPED), max(prompt_lens))
    assert calls[1] == (len(resps), max(answer_lens) - 1)
    assert len(calls) == 2


def test_a_prompt_with_more_responses_than_a_batch_runs_once(tiny_dir, unshared):
    small = load_model(tiny_dir, backend="transformers", device="cpu", dtype="float32", batch_size=3)
    conv = CONVERSATIONS[1]
    resps = [f"Answer number {k}." + " more" * k for k in range(7)]
    calls = []
    hook = small.model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        got = small.logprobs([conv] * 7, resps)
    finally:
        hook.remove()
    plain = unshared.logprobs([conv] * 7, resps)
    for a, b in zip(got, plain):
        assert a.sum == pytest.approx(b.sum, abs=1e-4)
    widths = sorted((len(small._response_ids(r)) - 1 for r in resps), reverse=True)
    # one prompt pass, then responses longest first, 3 at a time, each padded to its own longest
    assert calls == [(1, len(small._prompt_ids(conv))), (3, widths[0]), (3, widths[3]), (1, widths[6])]


def test_identical_items_are_computed_once_and_come_out_identical(tiny):
    convs = [CONVERSATIONS[0], CONVERSATIONS[0], CONVERSATIONS[0], CONVERSATIONS[2]]
    resps = ["Four.", "Four.", "Hi there", "Four."]
    calls = []
    hook = tiny.model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        lp = tiny.logprobs(convs, resps)
    finally:
        hook.remove()
    assert calls[0][0] == 2 and calls[1][0] == 3  # 2 distinct prompts, 3 distinct items
    assert lp[0] == lp[1] and lp[0] != lp[3]
    hs = tiny.hidden_states(convs, resps)
    assert np.array_equal(hs[0], hs[1]) and hs[0] is not hs[1]


# -- sampling: continuous batching, seeds per draw, stop strings ------------------------------
@pytest.fixture(scope="module")
def eos_prone(tiny_llama_factory, tmp_path_factory):
    """A tiny random Llama whose eos is likely (~12% a step): replies end at varied lengths."""
    return make_eos_prone(tiny_llama_factory(3), tmp_path_factory.mktemp("eos-prone"))


def _lm(path, batch_size):
    return load_model(path, backend="transformers", device="cpu", dtype="float32", batch_size=batch_size)


QUESTIONS = [[{"role": "user", "content": f"Question {i}: " + "word " * (3 * i)}] for i in range(5)]
VARIED = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=5)


def test_draws_do_not_depend_on_batch_size_or_companions(eos_prone):
    keys = [f"prompt-{i}" for i in range(len(QUESTIONS))]
    runs = {bs: _lm(eos_prone, bs).generate_replies(QUESTIONS, 4, VARIED, keys=keys) for bs in (64, 7, 1)}
    texts = [g.text for row in runs[64] for g in row]
    assert len(set(texts)) >= 15 and min(map(len, texts)) < 20 < max(map(len, texts))  # varied texts …
    reasons = [g.finish_reason for row in runs[64] for g in row]
    assert {"stop", "length"} == set(reasons)  # … and lengths
    assert runs[7] == runs[64] and runs[1] == runs[64]
    # other companions, another order, a prompt alone: the same draws
    alone = _lm(eos_prone, 7).generate_replies([QUESTIONS[2]], 4, VARIED, keys=[keys[2]])
    assert alone[0] == runs[64][2]
    shuffled = _lm(eos_prone, 5).generate_replies(QUESTIONS[::-1], 4, VARIED, keys=keys[::-1])
    assert shuffled[::-1] == runs[64]
    # draws are numbered from first_index: sample indices 2..3 are the last two of the four
    later = _lm(eos_prone, 3).generate_replies([QUESTIONS[1]], 2, VARIED, keys=[keys[1]], first_index=[2])
    assert later[0] == runs[64][1][2:]
    # the key is what seeds a prompt: another key, other draws
    assert _lm(eos_prone, 7).generate_replies([QUESTIONS[2]], 4, VARIED, keys=["other"])[0] != runs[64][2]


def _spy(monkeypatch):
    """Record each decode step's busy rows and each draw as the real scheduler runs."""
    from prefdata.models import continuous

    steps, draws = [], []
    forward, run = continuous.ContinuousBatcher._forward, continuous.ContinuousBatcher.run

    def spy_forward(self, tokens, lengths):
        steps.append(len(tokens))
        return forward(self, tokens, lengths)

    def spy_run(self):
        draws.extend(run(self))
        return draws

    monkeypatch.setattr(continuous.ContinuousBatcher, "_forward", spy_forward)
    monkeypatch.setattr(continuous.ContinuousBatcher, "run", spy_run)
    return steps, draws


def test_finished_rows_free_their_slot_and_each_prompt_runs_once(eos_prone, monkeypatch):
    lm = _lm(eos_prone, 5)
    steps, draws = _spy(monkeypatch)
    prompt_passes = []
    hook = lm.model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: prompt_passes.append(kwargs["input_ids"].shape[1])
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        replies = lm.generate_replies(QUESTIONS[:3], 4, VARIED)
    finally:
        hook.remove()
    assert prompt_passes == [len(lm._prompt_ids(q)) for q in QUESTIONS[:3]]  # one prefill per prompt
    # a draw that samples k tokens (eos included) is in k - 1 decode steps; no step runs more
    sampled = [len(d.tokens) + (d.finish_reason == "stop") for d in draws]
    assert sum(steps) == sum(k - 1 for k in sampled)
    assert max(steps) == 5
    first_short = next(i for i, b in enumerate(steps) if b < 5)
    assert steps[first_short:] == sorted(steps[first_short:], reverse=True)  # only the tail drains
    assert min(sampled) < 10 < max(sampled)  # lengths really vary
    assert [g.finish_reason for row in replies for g in row] == [d.finish_reason for d in draws]


def test_stop_strings_cut_the_same_draws_and_min_new_tokens_holds_eos(eos_prone, monkeypatch):
    lm = _lm(eos_prone, 8)
    free = lm.generate_replies(QUESTIONS[:2], 4, VARIED)
    longest = max((g for row in free for g in row), key=lambda g: len(g.text))
    stop = longest.text[len(longest.text) // 2:len(longest.text) // 2 + 3]
    assert stop.strip()
    cut = lm.generate_replies(QUESTIONS[:2], 4, replace(VARIED, stop=(stop,)))
    hits = 0
    for a, b in zip([g for row in free for g in row], [g for row in cut for g in row]):
        if stop in a.text:
            hits += 1
            assert b == type(b)(a.text[:a.text.index(stop)], "stop")
        else:
            assert b == a
    assert hits >= 1
    steps, draws = _spy(monkeypatch)
    held = lm.generate_replies(QUESTIONS[:2], 4, replace(VARIED, min_new_tokens=10))
    assert min(len(d.tokens) for d in draws) >= 10
    assert any(g.finish_reason == "stop" for row in held for g in row)
    draws.clear()
    lm.generate_replies(QUESTIONS[:2], 4, replace(VARIED, min_new_tokens=16))
    assert {d.finish_reason for d in draws} == {"length"}


def test_bad_sampling_settings_and_a_model_without_eos(tiny_llama_factory, tmp_path):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="min_new_tokens .* must not exceed max_new_tokens"):
        Sampling(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        Sampling(stop=("ok", ""))
    with pytest.raises(ValueError, match="stop must be a list"):
        Sampling(stop="\n")
    path = tmp_path / "no-eos"
    LlamaForCausalLM.from_pretrained(tiny_llama_factory(0)).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(tiny_llama_factory(0))
    tok.eos_token = None
    tok.save_pretrained(path)
    with pytest.raises(ValueError, match=f"model '{path}': the tokenizer has no eos token"):
        load_model(str(path), backend="transformers", device="cpu")


def test_generation_uses_no_deprecated_cache_argument(tiny, recwarn):
    import warnings

    warnings.simplefilter("always")
    tiny.generate(CONVERSATIONS, 2, Sampling(temperature=1.0, max_new_tokens=4, seed=1))
    tiny.logprobs(CONVERSATIONS, RESPONSES)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_hidden_state_sums_equal_float64_sums_of_the_states(tiny):
    convs, resps = _flat(GROUPED)
    sums, counts = tiny.hidden_state_sums(convs, resps)
    states = tiny.hidden_states(convs, resps)
    assert counts.tolist() == [len(h) for h in states]
    assert sums.dtype == np.float64
    np.testing.assert_allclose(sums, np.stack([h.astype(np.float64).sum(0) for h in states]), rtol=1e-12)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_mask_path_gives_the_row_exact_tokens(eos_prone, attention):
    """The GPU path (one masked attention over padded rows), run here on CPU, samples the
    same tokens as the row-exact CPU path, with SDPA (boolean mask) and eager (additive)."""
    from prefdata.models.base import draw_seed
    from prefdata.models.continuous import ContinuousBatcher, DecodeSettings, Draw

    lm = _lm(eos_prone, 4)
    model = LlamaForCausalLM.from_pretrained(eos_prone, attn_implementation=attention).eval()
    prompts = [lm._prompt_ids(q) for q in QUESTIONS[:3]]
    settings = DecodeSettings(temperature=1.0, top_p=0.95, max_new_tokens=16, min_new_tokens=0,
                              eos_ids=tuple(lm.eos_ids), slots=4)

    def run(rowwise):
        draws = [Draw(p, k, torch.Generator().manual_seed(draw_seed(5, str(p), k)))
                 for p in range(3) for k in range(3)]
        return [(d.tokens, d.finish_reason) for d in
                ContinuousBatcher(model, prompts, draws, settings, rowwise=rowwise).run()]

    exact, batched = run(True), run(False)
    assert batched == exact
    assert len({len(tokens) for tokens, _ in exact}) > 3
