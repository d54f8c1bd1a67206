"""An OpenAI-compatible chat-completions backend (vLLM's server, TGI, OpenAI), on the official SDK.

Implements the ``generate`` part of the ``LanguageModel`` protocol (judges and samplers
need nothing else). One ``openai.OpenAI`` client per model and API key keeps its HTTP
connections open across calls; retries (HTTP 408/409/429/5xx, timeouts, refused
connections, with the SDK's exponential backoff and ``Retry-After``) and the per-request
``timeout`` are the SDK's own (``max_retries``, ``timeout``). Requests run on a bounded
thread pool (``concurrency`` in flight at most); results come back in input order.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from prefdata.models.base import Conversation, LogProb, Sampling

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "EMPTY"  # what vLLM's docs pass to a server started without --api-key
MAX_MESSAGE = 300
MISSING = "the api backend needs the openai package: pip install 'prefdata[api]'"
REMOVED = {"backoff": "the openai SDK backs off by itself", "max_backoff": "the openai SDK backs off by itself"}
STRUCTURED_WORDS = ("response_format", "json_schema", "structured output", "guided")


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
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        """``n`` replies per conversation; draw k of conversation i is seeded ``seed + i*n + k``.

        With ``json_schema`` the server is asked to answer with JSON that follows it.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not conversations:
            return []
        key = os.environ.get(self.api_key_env) or None
        client = self._client(key)
        greedy = sampling.temperature <= 0
        jobs = []  # (conversation index, request arguments)
        for i, conv in enumerate(conversations):
            base = self._request(conv, sampling, greedy, json_schema)
            if greedy:
                jobs.append((i, dict(base, seed=sampling.seed + i * n)))
            elif self.use_n:
                jobs.append((i, dict(base, n=n, seed=sampling.seed + i * n)))
            else:
                jobs.extend((i, dict(base, seed=sampling.seed + i * n + k)) for k in range(n))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            futures = [pool.submit(self._complete, client, args, key) for _, args in jobs]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        texts: list[list[str]] = [[] for _ in conversations]
        for (i, _), choices in zip(jobs, results):
            texts[i].extend(choices)
        return [t[:1] * n if greedy else t[:n] for t in texts]

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
        if json_schema is not None:
            args["response_format"] = response_format(json_schema)
        if self.extra_body:
            args["extra_body"] = dict(self.extra_body)
        return args

    def _complete(self, client, args: dict, key: str | None) -> list[str]:
        """The choices' texts of one request (the SDK retries); else ``ApiError``."""
        import openai

        try:
            reply = client.chat.completions.create(**args)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, key, "response_format" in args) from None
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
        return [(getattr(c.message, "content", None) or "") if c.message else "" for c in choices]

    def _status_error(self, exc, key: str | None, structured: bool) -> ApiError:
        code = exc.status_code
        message = _redact(_server_message(exc), key)
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
