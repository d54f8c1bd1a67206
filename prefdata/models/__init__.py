"""Language-model backends behind one protocol, and a process-level cache of loaded models.

Steps ask ``load_model`` for a model by name; within a step, the strong and weak side (or
any two callers) that name the same model, backend, device and dtype share one copy of
the weights. The cache lives only as long as the step: the local executor runs a
model-holding step in a worker process that exits with it, and empties the cache after
each step when it runs in-process (``clear_cache``), so only the running step's models
are ever in memory. ``backend="api"`` talks to an OpenAI-compatible chat-completions server (vLLM,
TGI, a hosted API) instead of loading weights. ``load_reward_model`` does the same for
sequence-classification reward models.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from typing import Any

from prefdata.models.base import LanguageModel, LogProb, Sampling

__all__ = ["LanguageModel", "LogProb", "Sampling", "load_model", "load_reward_model", "clear_cache",
           "check_backend"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "vllm", "api")
VLLM_MISSING = "the vLLM backend needs vllm and a CUDA GPU: pip install 'prefdata[vllm]'"

_CACHE: dict[tuple, Any] = {}


def check_backend(backend: str) -> None:
    """Fail early (when a step is created) on an unknown or uninstalled backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ImportError(VLLM_MISSING)
    if backend == "api" and importlib.util.find_spec("openai") is None:
        raise ImportError("the api backend needs the openai package: pip install 'prefdata[api]'")


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` is vLLM when it is installed and a GPU is present (device auto or cuda)."""
    check_backend(backend)
    if backend != "auto":
        return backend
    if device not in ("auto", "cuda"):
        return "transformers"
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def load_model(
    name: str,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    **kw: Any,
) -> LanguageModel:
    """A loaded model, shared with every earlier caller that asked for the same weights.

    ``batch_size`` (transformers only; vLLM schedules its own batches) is not part of the
    identity: a caller with another batch size gets a light copy sharing the weights.
    With ``backend="api"`` the keyword arguments (``base_url``, ``api_key_env``,
    ``concurrency``, ``timeout``, ``max_retries`` …) go to ``ApiLM``; device and dtype are
    ignored.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    backend = resolve_backend(backend, device)
    if backend == "api":
        from prefdata.models.api_backend import ApiLM

        key = (name, backend, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in _CACHE:
            _CACHE[key] = ApiLM(name, **kw)
        return _CACHE[key]
    if backend == "transformers":
        from prefdata.models.transformers_backend import TransformersLM as cls
        from prefdata.models.transformers_backend import resolve_device

        device = resolve_device(device)
    else:
        from prefdata.models.vllm_backend import VLLMModel as cls

    key = (name, backend, device, dtype, tuple(sorted(kw.items())))
    if key not in _CACHE:
        log.info("loading %s (%s, %s, %s)", name, backend, device, dtype)
        _CACHE[key] = cls(name, device=device, dtype=dtype, **kw)
    model = _CACHE[key]
    if batch_size is not None and backend == "transformers" and model.batch_size != batch_size:
        model = copy.copy(model)
        model.batch_size = batch_size
    return model


def load_reward_model(
    name: str, device: str = "auto", dtype: str = "auto", batch_size: int | None = None, **kw: Any
):
    """A loaded sequence-classification reward model, shared like ``load_model``'s."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from prefdata.models.reward_backend import RewardModel
    from prefdata.models.transformers_backend import resolve_device

    device = resolve_device(device)
    key = (name, "reward", device, dtype, tuple(sorted(kw.items())))
    if key not in _CACHE:
        log.info("loading reward model %s (%s, %s)", name, device, dtype)
        _CACHE[key] = RewardModel(name, device=device, dtype=dtype, **kw)
    model = _CACHE[key]
    if batch_size is not None and model.batch_size != batch_size:
        model = copy.copy(model)
        model.batch_size = batch_size
    return model


def progress_disabled() -> bool:
    """True under ``--no-progress`` (``PREFDATA_NO_PROGRESS=1``): backends show no bars."""
    import os

    return os.environ.get("PREFDATA_NO_PROGRESS", "") not in ("", "0")


def clear_cache() -> None:
    """Drop every cached model (and free GPU memory, when there is a GPU).

    With nothing cached this returns at once: a full ``gc.collect()`` over a heap holding
    torch and transformers takes about a second, and the local executor calls this after
    every in-process step."""
    if not _CACHE:
        return
    _CACHE.clear()
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
