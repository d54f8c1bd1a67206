"""Reference log-probs, computed once in batches and cached next to the data.

The cache key is (data fingerprint, reference model fingerprint, precision): the data
fingerprint hashes every token id after templating and truncation, so a change of data,
tokenizer, chat template or max_length recomputes; the same run again — or a resumed one
— reads the cache and never holds a reference model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prefdata.io import write_parquet
from prefdata.models.hub import resolve
from prefdata.train.data import Examples, micro_batches
from prefdata.train.packing import collate, response_logps

log = logging.getLogger(__name__)

# Counts reference forward passes in this process (tests read it).
FORWARDS = {"count": 0}


def model_fingerprint(name: str) -> str:
    """Name, config and a sample of each weight file: cheap, and changes when weights do."""
    path = Path(resolve(name))
    h = hashlib.sha256(str(name).encode())
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for f in sorted(path.glob("*.safetensors")):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


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


def compute(model, examples: Examples, batch_size: int, device, autocast) -> np.ndarray:
    """Summed response log-probs of every example under ``model``, no gradients."""
    n = len(examples)
    width = max(len(r) for r in examples.responses)
    out = np.full((n, width), np.nan)
    lengths = examples.lengths()
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast():
        for idx in micro_batches(np.arange(n), lengths, batch_size):
            batch = collate([examples.row(i) for i in idx], pad_id=0)
            sums, counts = response_logps(model, batch, device)
            FORWARDS["count"] += 1
            for b, i in enumerate(idx):
                k = len(examples.responses[i])
                out[i, :k] = sums[b, :k].double().cpu().numpy()
    model.train(was_training)
    return out


def reference_logps(examples: Examples, cfg, policy, device, autocast, load_model) -> tuple[np.ndarray, dict]:
    """Cached reference log-probs; computed with ``policy`` when it is still the reference.

    ``policy`` is the freshly loaded (untrained) policy, or None; ``load_model(name)``
    loads another reference model, which is freed as soon as its log-probs are written.
    """
    ref_name = cfg.reference or cfg.model
    ref_fp = model_fingerprint(ref_name)
    path = cache_path(cfg.data, cfg.ref_cache_dir, examples.fingerprint, ref_fp, cfg.precision)
    cached = load_cached(path, len(examples))
    if cached is not None:
        log.info("reference log-probs: cache hit %s", path)
        return cached, {"reference_cache": "hit", "reference_cache_path": str(path)}
    log.info("reference log-probs: computing with %s (once)", ref_name)
    t0 = time.perf_counter()
    if policy is not None and (cfg.reference is None or cfg.reference == cfg.model):
        logps = compute(policy, examples, cfg.ref_batch_size, device, autocast)
    else:
        ref_model = load_model(ref_name)
        logps = compute(ref_model, examples, cfg.ref_batch_size, device, autocast)
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
