"""The vLLM backend against the transformers backend (needs vllm and a CUDA GPU)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vllm is not installed (pip install 'prefdata[vllm]')")
if not torch.cuda.is_available():
    pytest.skip("the vLLM backend needs a CUDA GPU", allow_module_level=True)

from prefdata.models import Sampling, load_model  # noqa: E402
from prefdata.models.hub import SMOLLM2  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
]


@pytest.fixture(scope="module")
def vllm_model():
    return load_model(SMOLLM2, backend="vllm", dtype="float32", gpu_memory_utilization=0.3)


def test_generate_n_seeded(vllm_model):
    sampling = Sampling(temperature=0.8, max_new_tokens=16, seed=3)
    first = vllm_model.generate(CONVERSATIONS, 2, sampling)
    assert [len(r) for r in first] == [2, 2]
    assert all(isinstance(t, str) for r in first for t in r)
    assert vllm_model.generate(CONVERSATIONS, 2, sampling) == first


def test_logprobs_match_transformers(vllm_model):
    reference = load_model(SMOLLM2, backend="transformers", device="cuda", dtype="float32")
    responses = ["Paris is the capital of France.", "7"]
    got = vllm_model.logprobs(CONVERSATIONS, responses)
    expected = reference.logprobs(CONVERSATIONS, responses)
    for a, b in zip(got, expected):
        assert a.n_tokens == b.n_tokens
        assert a.sum == pytest.approx(b.sum, abs=0.05)


def test_draws_are_seeded_per_prompt_not_per_call(vllm_model):
    """A prompt's draws (seed, key, sample index) do not depend on the other requests."""
    sampling = Sampling(temperature=1.0, max_new_tokens=24, seed=7)
    both = vllm_model.generate_replies(CONVERSATIONS, 3, sampling, keys=["a", "b"])
    alone = vllm_model.generate_replies(CONVERSATIONS[1:], 3, sampling, keys=["b"])
    assert alone[0] == both[1]
    later = vllm_model.generate_replies(CONVERSATIONS[1:], 2, sampling, keys=["b"], first_index=[1])
    assert later[0] == both[1][1:]
    assert {g.finish_reason for row in both for g in row} <= {"stop", "length"}


def test_stop_strings_and_min_new_tokens(vllm_model):
    free = vllm_model.generate_replies(CONVERSATIONS[:1], 1, Sampling(temperature=0.0, max_new_tokens=32))
    text = free[0][0].text
    stop = text.split()[2]
    cut = vllm_model.generate_replies(CONVERSATIONS[:1], 1, Sampling(temperature=0.0, max_new_tokens=32,
                                                                      stop=(stop,)))
    assert cut[0][0].text == text[:text.index(stop)] and cut[0][0].finish_reason == "stop"
    held = vllm_model.generate_replies(CONVERSATIONS[:1], 1, Sampling(temperature=0.0, max_new_tokens=8,
                                                                       min_new_tokens=8))
    assert held[0][0].finish_reason == "length"
