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
