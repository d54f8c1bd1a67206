"""The vLLM backend: the same protocol on a CUDA GPU, for sampling at scale.

Prompts are templated with the model's own tokenizer and passed as token ids, so vLLM
and the transformers backend see exactly the same tokens. Each draw is its own request
with ``SamplingParams(seed=draw_seed(seed, key, sample_index))``, so a prompt's replies do
not depend on the other requests of a call; vLLM's prefix caching computes the shared
prompt once for its N draws. Log-probabilities come from
``prompt_logprobs`` over the prompt+response sequence, prompt positions excluded.
``generate(..., json_schema=...)`` constrains decoding to JSON that follows the schema
(vLLM's structured outputs, called guided decoding before vLLM 0.10.2), for the judges.
"""

from __future__ import annotations

import logging

import numpy as np

from prefdata.models import hub
from prefdata.models.base import (Conversation, Generation, LogProb, Sampling, draw_keys, draw_seed,
                                  first_indices)

log = logging.getLogger(__name__)

MISSING = (
    "the vLLM backend needs the vllm package and a CUDA GPU: pip install 'prefdata[vllm]' "
    "(or use backend='transformers')"
)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMModel:
    """A vLLM engine behind the ``LanguageModel`` protocol."""

    supports_json_schema = True

    def __init__(
        self,
        name: str,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
    ):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(MISSING) from exc
        if device not in ("auto", "cuda", "cuda:0"):
            raise ValueError(
                f"vLLM runs on the visible GPU(s), got device={device!r}; choose a GPU with "
                "CUDA_VISIBLE_DEVICES and pass device='auto' or 'cuda'"
            )
        self.name = name
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=hub.resolve(name),
            dtype=DTYPES.get(dtype, dtype),
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
        self.tokenizer = self.llm.get_tokenizer()
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"model '{name}': the tokenizer has no eos token, so replies could not end; set "
                "tokenizer.eos_token (and save it with the model) or use a chat model that defines one"
            )
        config = getattr(self.llm.llm_engine, "model_config", None)
        self.max_length = getattr(config, "max_model_len", None)

    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling,
                 keys=None, first_index=None, json_schema: dict | None = None) -> list[list[str]]:
        """``n`` replies per conversation; see ``generate_replies``."""
        replies = self.generate_replies(conversations, n, sampling, keys, first_index, json_schema)
        return [[g.text for g in row] for row in replies]

    def generate_replies(self, conversations: list[Conversation], n: int, sampling: Sampling,
                         keys=None, first_index=None, json_schema: dict | None = None) -> list[list[Generation]]:
        """``n`` replies per conversation with finish reasons; draw k of conversation i is
        one request seeded by ``draw_seed(seed, keys[i], first_index[i] + k)``. With
        ``json_schema`` decoding is constrained to JSON that follows it."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not conversations:
            return []
        keys, starts = draw_keys(conversations, keys), first_indices(conversations, first_index)
        prompts = [self._prompt_ids(c) for c in conversations]
        for i, ids in enumerate(prompts):
            self._check_length(i, len(ids) + sampling.max_new_tokens, "prompt + max_new_tokens")
        per = 1 if sampling.temperature <= 0 else n
        requests = [{"prompt_token_ids": p} for p in prompts for _ in range(per)]
        extra = {} if json_schema is None else json_schema_params(json_schema)
        params = [self._params(sampling, draw_seed(sampling.seed, keys[i], starts[i] + k), extra)
                  for i in range(len(prompts)) for k in range(per)]
        outputs = self.llm.generate(requests, params, use_tqdm=len(requests) > 1)
        replies = [Generation(o.outputs[0].text, "length" if o.outputs[0].finish_reason == "length" else "stop")
                   for o in outputs]
        return [replies[i * per:(i + 1) * per] * (n // per) for i in range(len(prompts))]

    def _params(self, sampling: Sampling, seed: int, extra: dict):
        greedy = sampling.temperature <= 0
        return self._vllm.SamplingParams(
            n=1, temperature=max(sampling.temperature, 0.0), top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
            stop=list(sampling.stop) or None, seed=seed,
            stop_token_ids=[self.tokenizer.eos_token_id], **extra,
        )

    def logprobs(self, conversations: list[Conversation], responses: list[str]) -> list[LogProb]:
        """Sum and mean of log p(response token) over response tokens (eos included)."""
        if len(conversations) != len(responses):
            raise ValueError(f"got {len(conversations)} conversations but {len(responses)} responses")
        prompts = [self._prompt_ids(c) for c in conversations]
        answers = [
            self.tokenizer(r, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            for r in responses
        ]
        for i, (p, a) in enumerate(zip(prompts, answers)):
            self._check_length(i, len(p) + len(a), "prompt + response")
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self.llm.generate(
            [{"prompt_token_ids": p + a} for p, a in zip(prompts, answers)], params,
            use_tqdm=len(prompts) > 1,
        )
        result = []
        for p, a, out in zip(prompts, answers, outputs):
            steps = out.prompt_logprobs[len(p):]
            values = np.array([step[t].logprob for step, t in zip(steps, a)], dtype=np.float64)
            result.append(LogProb(sum=float(values.sum()), mean=float(values.mean()), n_tokens=len(a)))
        return result

    def hidden_states(self, conversations: list[Conversation], responses: list[str]) -> list[np.ndarray]:
        raise NotImplementedError(
            "the vLLM backend does not expose hidden states; use backend='transformers' "
            "for steps that need them (CHES)"
        )

    def hidden_state_sums(self, conversations: list[Conversation], responses: list[str]):
        return self.hidden_states(conversations, responses)

    def _prompt_ids(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _check_length(self, index: int, length: int, what: str) -> None:
        if self.max_length is not None and length > self.max_length:
            raise ValueError(
                f"model '{self.name}': item {index} needs {length} tokens ({what}) but the "
                f"model's context is {self.max_length}; shorten that item or lower max_new_tokens"
            )


def json_schema_params(schema: dict) -> dict:
    """``SamplingParams`` keywords that constrain decoding to ``schema``, for the installed vLLM:
    ``structured_outputs`` (0.10.2 and later) or ``guided_decoding`` (earlier)."""
    import importlib

    params = importlib.import_module("vllm.sampling_params")
    if hasattr(params, "StructuredOutputsParams"):
        return {"structured_outputs": params.StructuredOutputsParams(json=schema)}
    if hasattr(params, "GuidedDecodingParams"):
        return {"guided_decoding": params.GuidedDecodingParams(json=schema)}
    raise ImportError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams; "
                      "upgrade vllm, or set structured: off on the judge step")
