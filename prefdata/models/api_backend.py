"""An OpenAI-compatible chat-completions backend (vLLM's server, TGI, OpenAI), on the official SDK.

Implements the ``generate`` / ``generate_replies`` part of the ``LanguageModel`` protocol
(judges and samplers need nothing else). One ``openai.OpenAI`` client per model and API
key keeps its HTTP connections open across calls; retries (HTTP 408/409/429/5xx, timeouts, refused
connections, with the SDK's exponential backoff and ``Retry-After``) and the per-request
``timeout`` are the SDK's own (``max_retries``, ``timeout``). Requests run on a bounded
thread pool (``concurrency`` in flight at most); results come back in input order.

Each draw is its own request whose ``seed`` is ``draw_seed(seed, key, sample_index)`` — the
derivation the transformers and vLLM backends use — so the seed a draw is sent with does
not depend on the other conversations of a call, their order or the concurrency. (A server
may still not be deterministic for a given seed: OpenAI documents ``seed`` as best effort;
vLLM's server honours it.) ``use_n: true`` asks for a conversation's ``n`` draws in one
request with one seed (fewer requests, but draw k then depends on ``n``). The API's
``finish_reason`` maps to ``stop`` (``stop``; also TGI's ``eos_token``) or ``length``;
anything else (``content_filter``, ``tool_calls`` …) is left null with a warning.

``stop`` strings go out as the API's ``stop``. ``min_new_tokens`` has no OpenAI
parameter: it is sent as vLLM's ``min_tokens`` extension (in the request body), which
vLLM's OpenAI server honours; a server that rejects it (OpenAI: "Unrecognized request
argument") raises an error naming the setting, and a server that ignores it is caught when
a single-draw reply ends (``stop``) with fewer completion tokens than asked.

``generate(..., json_schema=...)`` asks for structured output — OpenAI's
``response_format={"type": "json_schema", ...}``, which vLLM's OpenAI server also honours —
so a judge's answer is JSON that follows the schema. A server that rejects the request
(HTTP 400/422 about ``response_format``) raises ``StructuredOutputUnsupported``, whose
message names the judge setting to change (``structured: off``).

The API key is read from the environment variable named by ``api_key_env`` when a call
starts — never from a config file — and is never logged; every message that could echo it
is redacted. Install with ``pip install 'prefdata[api]'``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from prefdata.models.base import (Conversation, Generation, LogProb, Sampling, draw_keys, draw_seed,
                                  first_indices)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "EMPTY"  # what vLLM's docs pass to a server started without --api-key
MAX_MESSAGE = 300
MISSING = "the api backend needs the openai package: pip install 'prefdata[api]'"
REMOVED = {"backoff": "the openai SDK backs off by itself", "max_backoff": "the openai SDK backs off by itself"}
STRUCTURED_WORDS = ("response_format", "json_schema", "structured output", "guided")
FINISH = {"stop": "stop", "eos_token": "stop", "eos": "stop", "length": "length"}
MIN_TOKENS = "min_tokens"  # vLLM's extension of the chat-completions request


class ApiError(RuntimeError):
    """A request that failed for good: what happened, where, and what to do."""


class StructuredOutputUnsupported(ApiError):
    """The server refused a JSON-schema ``response_format``."""


def require_openai() -> None:
    """Fail early, naming the extra, when the ``openai`` package is not installed."""
    if importlib.util.find_spec("openai") is None:
        raise ImportError(MISSING)


class ApiLM:
    """A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    supports_json_schema = True

    def __init__(
        self,
        name: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        use_n: bool = False,
        extra_body: dict[str, Any] | None = None,
        **removed: Any,
    ):
        for option in removed:
            why = REMOVED.get(option)
            raise TypeError(f"api backend: unknown option {option!r}"
                            + (f" (no longer used: {why}; remove it from model_options)" if why else ""))
        if concurrency < 1 or timeout <= 0 or max_retries < 0:
            raise ValueError("api backend: need concurrency >= 1, timeout > 0 and max_retries >= 0")
        require_openai()
        self.name = name
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout, self.max_retries = concurrency, float(timeout), max_retries
        self.use_n = use_n
        self.extra_body = dict(extra_body or {})
        self._clients: dict[str | None, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ApiLM({self.name!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def __getstate__(self) -> dict:  # clients hold sockets and locks; rebuilt after unpickling
        state = dict(self.__dict__)
        state["_clients"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- the protocol ---------------------------------------------------------------------
    def generate(
        self,
        conversations: list[Conversation],
        n: int,
        sampling: Sampling,
        keys: Sequence[str] | None = None,
        first_index: Sequence[int] | int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        """``n`` replies per conversation; see ``generate_replies``."""
        replies = self.generate_replies(conversations, n, sampling, keys, first_index, json_schema)
        return [[g.text for g in row] for row in replies]

    def generate_replies(
        self,
        conversations: list[Conversation],
        n: int,
        sampling: Sampling,
        keys: Sequence[str] | None = None,
        first_index: Sequence[int] | int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[Generation]]:
        """``n`` replies per conversation with their finish reasons.

        Draw k of conversation i is one request with ``seed = draw_seed(sampling.seed,
        keys[i], first_index[i] + k)`` (keys default to each conversation's hash). Greedy
        replies are all the same: one request per conversation. With ``json_schema`` the
        server is asked to answer with JSON that follows it.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not conversations:
            return []
        keys, starts = draw_keys(conversations, keys), first_indices(conversations, first_index)
        key = os.environ.get(self.api_key_env) or None
        client = self._client(key)
        greedy = sampling.temperature <= 0
        per = 1 if greedy or self.use_n else n
        jobs = []  # (conversation index, request arguments)
        for i, conv in enumerate(conversations):
            base = self._request(conv, sampling, greedy, json_schema)
            if self.use_n and not greedy:
                base["n"] = n
            jobs.extend((i, dict(base, seed=draw_seed(sampling.seed, keys[i], starts[i] + k))) for k in range(per))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            futures = [pool.submit(self._complete, client, args, key) for _, args in jobs]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        replies: list[list[Generation]] = [[] for _ in conversations]
        unmapped: Counter = Counter()
        for (i, _), (choices, raw) in zip(jobs, results):
            replies[i].extend(choices)
            unmapped.update(str(r) for r, g in zip(raw, choices) if g.finish_reason is None)
        _warn_unmapped(unmapped)
        return [r[:1] * n if greedy else r[:n] for r in replies]

    def logprobs(self, conversations: list[Conversation], responses: list[str]) -> list[LogProb]:
        raise NotImplementedError(
            "the api backend cannot score log-probabilities: chat-completions endpoints do not "
            "return log-probs of a given response; use backend='transformers' or 'vllm' for CDR"
        )

    def hidden_states(self, conversations: list[Conversation], responses: list[str]) -> list[np.ndarray]:
        raise NotImplementedError(
            "the api backend has no hidden states; use backend='transformers' for CHES"
        )

    # -- the client and one request -------------------------------------------------------
    def _client(self, key: str | None):
        """One SDK client per key (a key changed in the environment gets a new one)."""
        with self._lock:
            if key not in self._clients:
                import openai

                _quiet_http_logs()
                self._clients[key] = openai.OpenAI(
                    api_key=key or NO_KEY, base_url=self.base_url, timeout=self.timeout,
                    max_retries=self.max_retries,
                )
            return self._clients[key]

    def _request(self, conv: Conversation, sampling: Sampling, greedy: bool, json_schema: dict | None) -> dict:
        args: dict[str, Any] = {
            "model": self.name, "messages": [dict(m) for m in conv],
            "max_tokens": sampling.max_new_tokens, "temperature": max(sampling.temperature, 0.0),
        }
        if not greedy:
            args["top_p"] = sampling.top_p
        if sampling.stop:
            args["stop"] = list(sampling.stop)
        if json_schema is not None:
            args["response_format"] = response_format(json_schema)
        extra = dict(self.extra_body)
        if sampling.min_new_tokens:
            extra[MIN_TOKENS] = sampling.min_new_tokens
        if extra:
            args["extra_body"] = extra
        return args

    def _complete(self, client, args: dict, key: str | None) -> tuple[list[Generation], list]:
        """The choices of one request (the SDK retries) with mapped finish reasons, and the
        reasons as the server wrote them; else ``ApiError``."""
        import openai

        try:
            reply = client.chat.completions.create(**args)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, key, args) from None
        except openai.APITimeoutError:
            raise ApiError(f"{self.url}: timed out after {self.timeout:g} s, {self.max_retries + 1} "
                           "attempt(s); raise timeout/max_retries or check the server") from None
        except openai.APIConnectionError as exc:
            cause = _redact(str(exc.__cause__ or exc), key)
            raise ApiError(f"{self.url}: could not connect after {self.max_retries + 1} attempt(s) "
                           f"({cause}); check base_url and that the server is up") from None
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list):
            text = _redact(str(reply)[:MAX_MESSAGE], key)
            raise ApiError(f"{self.url}: the answer is not a chat completion (no 'choices'): {text!r}")
        raw = [getattr(c, "finish_reason", None) for c in choices]
        out = [Generation((getattr(c.message, "content", None) or "") if c.message else "", FINISH.get(r))
               for c, r in zip(choices, raw)]
        self._check_min_tokens(reply, out, args)
        return out, raw

    def _check_min_tokens(self, reply, out: list[Generation], args: dict) -> None:
        """A server that silently ignores ``min_tokens`` is an error, not short replies."""
        wanted = args.get("extra_body", {}).get(MIN_TOKENS, 0)
        used = getattr(getattr(reply, "usage", None), "completion_tokens", None)
        if not wanted or len(out) != 1 or out[0].finish_reason != "stop" or not isinstance(used, int):
            return
        if used < wanted:
            raise ApiError(
                f"{self.url}: a reply ended after {used} token(s) although min_new_tokens is {wanted}: "
                f"the server ignores vLLM's '{MIN_TOKENS}' request field for model {self.name!r}; set "
                "min_new_tokens: 0 or serve the model with vLLM")

    def _status_error(self, exc, key: str | None, args: dict) -> ApiError:
        code = exc.status_code
        message = _redact(_server_message(exc), key)
        structured = "response_format" in args
        if code in (400, 422) and MIN_TOKENS in message and MIN_TOKENS in args.get("extra_body", {}):
            return ApiError(
                f"{self.url}: the server does not accept vLLM's '{MIN_TOKENS}' request field (HTTP "
                f"{code}: {message}), which is how min_new_tokens is sent; set min_new_tokens: 0 "
                "or serve the model with vLLM")
        if code in (401, 403):
            return ApiError(
                f"{self.url}: authentication failed (HTTP {code}: {message}); check the API key in "
                f"the environment variable {self.api_key_env}" + ("" if key else " (it is not set)")
            )
        if structured and code in (400, 422) and any(w in message.lower() for w in STRUCTURED_WORDS):
            return StructuredOutputUnsupported(
                f"{self.url}: the server rejected the JSON-schema response_format (HTTP {code}: "
                f"{message}); it does not support structured output for model {self.name!r} — set "
                "`structured: off` on the judge step to parse free text instead"
            )
        if code in (408, 409, 429) or code >= 500:
            return ApiError(f"{self.url}: gave up after {self.max_retries + 1} attempt(s): HTTP {code}: "
                            f"{message}; raise max_retries or check the server")
        return ApiError(f"{self.url}: HTTP {code}: {message}")


def _warn_unmapped(reasons: Counter) -> None:
    """Say once per call which finish reasons were neither stop nor length (left null)."""
    if reasons:
        total = sum(reasons.values())
        log.warning("api: %d repl%s ended with finish_reason %s (neither stop nor length): "
                    "finish_reason left null", total, "y" if total == 1 else "ies",
                    ", ".join(f"{k!r} ({v})" for k, v in sorted(reasons.items())))


def _quiet_http_logs() -> None:
    """httpx logs every request at INFO: 100k lines for 100k prompts. Unless a user set a
    level for it, keep it to warnings (the SDK's own retry messages stay)."""
    for name in ("httpx", "httpx2"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def response_format(schema: dict) -> dict:
    """OpenAI's structured-output request for a JSON schema (named by its ``title``)."""
    return {"type": "json_schema",
            "json_schema": {"name": schema.get("title", "output"), "schema": schema, "strict": True}}


def _server_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") if isinstance(inner, dict) else inner
        if text:
            return str(text).strip()[:MAX_MESSAGE]
    if isinstance(body, str) and body.strip():
        return body.strip()[:MAX_MESSAGE]
    return str(getattr(exc, "message", exc)).strip()[:MAX_MESSAGE]


def _redact(text: str, key: str | None) -> str:
    """The text with the key (and its tail, if a server echoes only part of it) blanked."""
    if not key or not text:
        return text
    text = text.replace(key, "[redacted]")
    if len(key) >= 12:
        text = text.replace(key[-8:], "[redacted]")
    return text
