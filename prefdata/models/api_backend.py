"""An OpenAI-compatible chat-completions backend: vLLM's server, TGI, hosted APIs.

Implements the ``generate`` part of the ``LanguageModel`` protocol (judges and samplers
need nothing else). Requests run on a bounded thread pool (``concurrency``), each with a
``timeout``; HTTP 429 and 5xx answers, timeouts and refused connections are retried with
exponential backoff (``Retry-After`` honoured, capped at ``max_backoff``), other errors
stop at once with the server's message. The API key is read from the environment
variable named by ``api_key_env`` when a call starts — never from a config file — and is
never logged: every message that could echo it is redacted. Only the standard library is
used (``urllib`` + ``concurrent.futures``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from prefdata.models.base import Conversation, LogProb, Sampling

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 425, 429}
MAX_MESSAGE = 300


class ApiError(RuntimeError):
    """A request that failed for good: what happened, where, and what to do."""


class ApiLM:
    """A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        name: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 16.0,
        use_n: bool = False,
        extra_body: dict[str, Any] | None = None,
    ):
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError("api backend: need concurrency >= 1, timeout > 0, max_retries >= 0, backoff >= 0")
        self.name = name
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout = concurrency, float(timeout)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.use_n = use_n
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"ApiLM({self.name!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    # -- the protocol ---------------------------------------------------------------------
    def generate(self, conversations: list[Conversation], n: int, sampling: Sampling) -> list[list[str]]:
        """``n`` replies per conversation; draw k of conversation i is seeded ``seed + i*n + k``."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not conversations:
            return []
        key = os.environ.get(self.api_key_env) or None
        greedy = sampling.temperature <= 0
        jobs = []  # (conversation index, body)
        for i, conv in enumerate(conversations):
            base = {"model": self.name, "messages": [dict(m) for m in conv],
                    "max_tokens": sampling.max_new_tokens,
                    "temperature": max(sampling.temperature, 0.0),
                    **({} if greedy else {"top_p": sampling.top_p}), **self.extra_body}
            if greedy:
                jobs.append((i, dict(base, seed=sampling.seed + i * n)))
            elif self.use_n:
                jobs.append((i, dict(base, n=n, seed=sampling.seed + i * n)))
            else:
                jobs.extend((i, dict(base, seed=sampling.seed + i * n + k)) for k in range(n))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            futures = [pool.submit(self._complete, body, key) for _, body in jobs]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
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

    # -- one request, with retries ----------------------------------------------------------
    def _complete(self, body: dict, key: str | None) -> list[str]:
        """The choices' texts of one request; retried on 429/5xx/timeouts, else ApiError."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        attempts = self.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            wait = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                return self._choices(payload, key)
            except urllib.error.HTTPError as exc:
                message = _redact(_server_message(exc), key)
                if exc.code in (401, 403):
                    raise ApiError(
                        f"{self.url}: authentication failed (HTTP {exc.code}: {message}); check the "
                        f"API key in the environment variable {self.api_key_env}"
                        + ("" if key else " (it is not set)")
                    ) from None
                if exc.code not in RETRY_STATUS and exc.code < 500:
                    raise ApiError(f"{self.url}: HTTP {exc.code}: {message}") from None
                problem = f"HTTP {exc.code}: {message}"
                wait = _retry_after(exc.headers)
            except (TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                    problem = f"timed out after {self.timeout:g} s"
                else:
                    problem = f"could not connect ({_redact(str(reason), key)})"
            if attempt + 1 < attempts:
                delay = min(self.max_backoff, wait if wait is not None else self.backoff * 2 ** attempt)
                delay *= 1.0 if wait is not None else random.uniform(0.5, 1.0)
                log.warning("%s: %s; retry %d/%d in %.2f s", self.url, problem, attempt + 1,
                            self.max_retries, delay)
                time.sleep(delay)
        raise ApiError(
            f"{self.url}: gave up after {attempts} attempt(s): {problem}; raise timeout/max_retries "
            "or check the server"
        )

    def _choices(self, payload: bytes, key: str | None) -> list[str]:
        try:
            choices = json.loads(payload)["choices"]
            return [(c.get("message") or {}).get("content") or "" for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError):
            text = _redact(payload[:MAX_MESSAGE].decode("utf-8", "replace"), key)
            raise ApiError(f"{self.url}: the answer is not a chat completion (no 'choices'): {text!r}") from None


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()[:4096].decode("utf-8", "replace")
    except Exception:
        return exc.reason or ""
    try:
        err = json.loads(raw)
        if isinstance(err, dict):
            inner = err.get("error", err)
            raw = inner.get("message", raw) if isinstance(inner, dict) else str(inner)
    except ValueError:
        pass
    return str(raw).strip()[:MAX_MESSAGE] or str(exc.reason)


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _redact(text: str, key: str | None) -> str:
    """The text with the key (and its tail, if a server echoes only part of it) blanked."""
    if not key or not text:
        return text
    text = text.replace(key, "[redacted]")
    if len(key) >= 12:
        text = text.replace(key[-8:], "[redacted]")
    return text
