"""Reference log-probs, computed once in batches and cached next to the data.

The cache key is (data fingerprint, reference model fingerprint, precision): the data
fingerprint hashes every token id after templating and truncation, so a change of data,
tokenizer, chat template or max_length recomputes; the same run again — or a resumed one
— reads the cache and never holds a reference model.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prefdata.io import write_parquet
from prefdata.models.identity import model_identity_digest
from prefdata.models.hub import resolve
from prefdata.train.data import DataError, Examples, micro_batches
from prefdata.train.packing import packed_logps

log = logging.getLogger(__name__)

# Counts reference forward passes in this process (tests read it).
FORWARDS = {"count": 0}


def model_fingerprint(name: str) -> str:
    """The reference model's full identity: Hub commit sha, or the full-file content hash
    of a local folder (memoised by path, size and mtime), or the embedded package + GGUF."""
    return model_identity_digest(name)


def cache_path(data: str | Path, cache_dir: str | Path | None, data_fp: str, ref_fp: str,
               precision: str) -> Path:
    folder = Path(cache_dir) if cache_dir else Path(data).resolve().parent / ".prefdata-cache"
    return folder / f"ref-logps-{data_fp}-{ref_fp}-{precision}.parquet"


def load_cached(path: Path, n: int) -> np.ndarray | None:
    """The cached [n, K] log-probs (NaN where a list is shorter), or None."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if table.num_rows != n:
        return None
    rows = table.column("logps").to_pylist()
    width = max(len(r) for r in rows)
    out = np.full((n, width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def compute(model, examples: Examples, batch_size: int, device, autocast, logps_fn=packed_logps,
            progress: bool = True) -> np.ndarray:
    """Summed response log-probs of every example under ``model``, no gradients."""
    from tqdm.auto import tqdm

    n = len(examples)
    width = max(len(r) for r in examples.responses)
    out = np.full((n, width), np.nan)
    lengths = examples.lengths()
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="reference log-probs", unit="ex", disable=not progress)
    with torch.inference_mode(), autocast():
        for idx in micro_batches(np.arange(n), lengths, batch_size):
            sums, counts = logps_fn(model, [examples.row(i) for i in idx], device)
            FORWARDS["count"] += 1
            for b, i in enumerate(idx):
                k = len(examples.responses[i])
                out[i, :k] = sums[b, :k].double().cpu().numpy()
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out


def check_same_tokenizer(policy_tokenizer, reference: str, policy: str) -> None:
    """The cached reference log-probs score the policy's token ids, so both models must read
    them as the same tokens."""
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(resolve(reference))
    a, b = policy_tokenizer.get_vocab(), ref_tok.get_vocab()
    if a == b:
        return
    differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    raise DataError(
        f"the policy ({policy}, {len(a)} tokens) and the reference ({reference}, {len(b)} tokens) have "
        f"different tokenizers (e.g. {', '.join(f'{t!r}->{i}' for t, i in differ)}); the reference would "
        "score other tokens than the policy. Use a reference model with the policy's tokenizer"
    )


def reference_logps(examples: Examples, cfg, policy, device, autocast, load_model,
                    policy_logps=packed_logps) -> tuple[np.ndarray, dict]:
    """Cached reference log-probs; computed with ``policy`` when it is still the reference.

    ``policy`` is the freshly loaded (untrained) policy, or None, and ``policy_logps`` the
    log-prob function checked for it (verify.py); ``load_model(name)`` loads another
    reference model and returns it with its own checked function; it is freed as soon as
    its log-probs are written. Unpacked log-probs are cached under their own key.
    """
    ref_name = cfg.reference or cfg.model
    ref_fp = model_fingerprint(ref_name)
    same = cfg.reference is None or cfg.reference == cfg.model
    mode = "" if policy_logps is packed_logps else "-unpacked"
    path = cache_path(cfg.data, cfg.ref_cache_dir, examples.fingerprint, ref_fp, cfg.precision + mode)
    cached = load_cached(path, len(examples))
    if cached is not None:
        log.info("reference log-probs: cache hit %s", path)
        return cached, {"reference_cache": "hit", "reference_cache_path": str(path)}
    log.info("reference log-probs: computing with %s (once)", ref_name)
    t0 = time.perf_counter()
    if policy is not None and same:
        logps = compute(policy, examples, cfg.ref_batch_size, device, autocast, policy_logps, cfg.progress)
    else:
        ref_model, ref_logps_fn = load_model(ref_name)
        logps = compute(ref_model, examples, cfg.ref_batch_size, device, autocast, ref_logps_fn, cfg.progress)
        del ref_model
        gc.collect()
    rows = [[float(x) for x in r if not np.isnan(x)] for r in logps]
    table = pa.table({"id": examples.ids, "logps": pa.array(rows, pa.list_(pa.float64()))})
    meta = {"data_fingerprint": examples.fingerprint, "reference": ref_name,
            "reference_fingerprint": ref_fp, "precision": cfg.precision}
    try:
        write_parquet(table, path, metadata={"prefdata_reference": json.dumps(meta)})
    except OSError as exc:
        raise OSError(
            f"cannot write the reference cache {path} ({exc}); set ref_cache_dir to a writable folder"
        ) from None
    return logps, {"reference_cache": "miss", "reference_cache_path": str(path),
                   "reference_seconds": time.perf_counter() - t0}
