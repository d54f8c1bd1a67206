"""Connecting to Argilla: credentials, the server version check, retries and quiet SDK logs.

Everything goes through the public ``argilla`` SDK (``rg.Argilla``, datasets, records, users).
The SDK raises its own exception classes from a private module; we recognise them by the
HTTP status they carry (``status_code``) and the ``httpx`` errors under them, so nothing here
imports SDK internals. Retries of idempotent calls (upserts keyed by record id, reads) use
``tenacity``: exponential backoff with jitter on connection errors and 5xx answers.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

log = logging.getLogger(__name__)

# argilla SDK 2.8 speaks the v1 REST API of argilla-server 2.x; ChatField needs server >= 2.2
SUPPORTED_SERVER = ((2, 2), (3, 0))  # [low, high)
SUPPORTED_TEXT = ">=2.2, <3.0"
CHATTY_LOGGERS = ("httpx", "httpcore", "argilla", "argilla.sdk", "urllib3")


class ArgillaError(RuntimeError):
    """Argilla refused or could not be reached; the message says where and what to do."""


class DatasetMissing(ArgillaError):
    """The dataset to pull from does not exist (yet)."""


def require_sdk():
    try:
        import argilla as rg
    except ImportError:
        raise ImportError("Argilla support needs the argilla SDK: pip install 'prefdata[argilla]'") from None
    quiet_sdk_logs()
    return rg


# -- logs -------------------------------------------------------------------------------------
class _SdkChatter(logging.Filter):
    """Drops the SDK's ``Argilla: Logged in as ...`` line, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or logging.getLogger("prefdata").isEnabledFor(logging.DEBUG):
            return True
        return not str(record.msg).startswith("Argilla: ")


_FILTER = _SdkChatter()


def quiet_sdk_logs() -> None:
    """httpx and SDK INFO lines (one per request) only with ``-v`` (prefdata logger at DEBUG)."""
    debug = logging.getLogger("prefdata").isEnabledFor(logging.DEBUG)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)


# -- errors and retries -----------------------------------------------------------------------
def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an SDK or httpx error (following ``__cause__``/``__context__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "status_code", None)
        if isinstance(code, int):
            return code
        response = getattr(exc, "response", None)
        if response is not None and isinstance(getattr(response, "status_code", None), int):
            return response.status_code
        exc = exc.__cause__ or exc.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection failed, or the server answered 5xx."""
    import httpx

    if isinstance(exc, httpx.TransportError):
        return True
    status = status_of(exc)
    return status is not None and status >= 500


def with_retries(call: Callable[[], Any], retries: int, what: str, url: str = "",
                 on_retry: Callable[[], None] | None = None, max_wait: float = 30.0) -> Any:
    """Run ``call``, retrying transient failures ``retries`` times with exponential backoff.

    Only for idempotent calls. After the last attempt: an ``ArgillaError`` that says to run
    the command again (work already done is kept). A 401 becomes the API-key message.
    """
    import tenacity

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        log.warning("%s: %s, retrying in %.1f s (%d/%d)", what, _reason(exc), state.next_action.sleep,
                    state.attempt_number, retries)
        if on_retry is not None:
            on_retry()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_random_exponential(multiplier=0.5, max=max_wait),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(call)
    except ArgillaError:
        raise
    except Exception as exc:
        if status_of(exc) == 401:
            raise ArgillaError(f"Argilla at {url} refused the API key (401 Unauthorized): "
                               "check ARGILLA_API_KEY") from None
        if is_transient(exc):
            raise ArgillaError(f"{what} failed after {retries + 1} attempts ({_reason(exc)}) at {url}; "
                               "run the same command again once the server is back: "
                               "work already done is kept and not repeated") from None
        if status_of(exc) is not None:
            detail = str(exc).split("Details: ", 1)[-1][:500]
            raise ArgillaError(f"{what}: Argilla at {url} refused the request (HTTP {status_of(exc)}): {detail}") \
                from exc
        raise


def _reason(exc: BaseException) -> str:
    status = status_of(exc)
    return f"HTTP {status}" if status else type(exc).__name__


# -- connecting -------------------------------------------------------------------------------
def credentials(api_url: str | None = None, api_key: str | None = None) -> tuple[str, str]:
    """(url, key): arguments, then ARGILLA_API_URL / ARGILLA_API_KEY, then a running dev server."""
    url = api_url or os.environ.get("ARGILLA_API_URL")
    key = api_key or os.environ.get("ARGILLA_API_KEY")
    if not url or not key:
        from prefdata.argilla_dev.server import running_server

        dev = running_server()
        if dev is not None and (not url or url.rstrip("/") == dev[0]):
            url, key = dev[0], key or dev[1]
    if not url:
        raise ArgillaError("no Argilla server: set ARGILLA_API_URL (and ARGILLA_API_KEY), "
                           "or start a local one with `prefdata argilla serve`")
    if not key:
        raise ArgillaError(f"no API key for Argilla at {url}: set ARGILLA_API_KEY")
    return url.rstrip("/"), key


def server_version(url: str, timeout: float = 10.0) -> str:
    """The version argilla-server reports at ``/api/v1/version`` (a public, unauthenticated route)."""
    import httpx

    try:
        response = httpx.get(f"{url}/api/v1/version", timeout=timeout)
    except httpx.TransportError as exc:
        raise ArgillaError(f"cannot reach Argilla at {url} ({type(exc).__name__}: {exc}); is the server running? "
                           "(`prefdata argilla serve`, or set ARGILLA_API_URL)") from None
    try:
        version = response.json()["version"] if response.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        version = None
    if not isinstance(version, str):
        raise ArgillaError(f"{url} does not answer like an Argilla server (GET /api/v1/version gave HTTP "
                           f"{response.status_code}); check ARGILLA_API_URL")
    return version


def check_server_version(version: str, url: str = "") -> None:
    """Refuse a server outside SUPPORTED_SERVER, naming what was found and what is supported."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        found = None
    low, high = SUPPORTED_SERVER
    if found is None or not low <= found < high:
        raise ArgillaError(f"Argilla server {url} runs version {version}; prefdata supports argilla-server "
                           f"{SUPPORTED_TEXT} (the argilla SDK 2.x). Upgrade or downgrade the server, or use "
                           "`prefdata argilla serve` for a local one of a supported version")


def connect(api_url: str | None = None, api_key: str | None = None, timeout: int = 60, retries: int = 2):
    """An ``argilla.Argilla`` client for a server of a supported version, with clear errors.

    ``retries`` are the SDK's immediate reconnects; longer outages are ``with_retries``' job.
    """
    rg = require_sdk()
    url, key = credentials(api_url, api_key)
    check_server_version(server_version(url), url)
    try:
        return rg.Argilla(api_url=url, api_key=key, timeout=timeout, retries=retries)
    except Exception as exc:
        import httpx

        if status_of(exc) == 401:
            raise ArgillaError(f"Argilla at {url} refused the API key (401 Unauthorized): "
                               "check ARGILLA_API_KEY") from None
        if isinstance(exc, httpx.TransportError):
            raise ArgillaError(f"cannot reach Argilla at {url} ({type(exc).__name__}: {exc}); is the server "
                               "running? (`prefdata argilla serve`, or set ARGILLA_API_URL)") from None
        raise
