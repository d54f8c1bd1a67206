"""Every language-model backend takes the same generate arguments the steps pass.

The vLLM backend cannot run here (no GPU), so its signature is checked against what the
judges and `sample` call it with: a backend that claims ``supports_json_schema`` but whose
``generate`` lacks the argument fails at run time on the GPU, far from the change that broke it.
"""

import inspect

import pytest

from prefdata.models.api_backend import ApiLM
from prefdata.models.transformers_backend import TransformersLM
from prefdata.models.vllm_backend import VLLMModel

BACKENDS = [ApiLM, TransformersLM, VLLMModel]


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", ["generate", "generate_replies"])
def test_generate_takes_the_per_draw_seed_arguments(cls, method):
    params = inspect.signature(getattr(cls, method)).parameters
    assert {"conversations", "n", "sampling", "keys", "first_index"} <= set(params), (cls, method)


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", ["generate", "generate_replies"])
def test_a_backend_that_can_constrain_decoding_takes_json_schema(cls, method):
    takes = "json_schema" in inspect.signature(getattr(cls, method)).parameters
    assert takes == bool(getattr(cls, "supports_json_schema", False)), (cls, method)
