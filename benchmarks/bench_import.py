"""Import HH-RLHF-style transcript pairs from JSONL.gz into a parquet response table.

Ours: ``import_pairs`` (pyarrow's multi-threaded JSON parser, a tight split loop,
Arrow arrays built column-wise). Baseline: ``datasets.load_dataset("json")`` followed by
the same conversion with ``Dataset.map(batched=True, num_proc=1)`` and ``to_parquet``.
Both read the same synthetic file (multi-turn transcripts, one pair per prompt) in one
run and must give the same rows. Each side runs in its own child process, so its peak
resident memory (``ru_maxrss``) is its own; the load average is printed with the figures
(the machine is shared) and the time ratio is printed last.

    python benchmarks/bench_import.py            # 500k pairs
    python benchmarks/bench_import.py --n 200000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefdata.io import write_parquet  # noqa: E402
from prefdata.schema import pair_id, prompt_id, response_id  # noqa: E402
from prefdata.steps.import_pairs import HH_ROLES, HH_TURN, ImportPairs  # noqa: E402

WORDS = ("the a model answer question why how river light data quickly small large explain give "
         "example number water city history music code python list sort time night").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))).capitalize() + "."


def make_file(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with gzip.open(path, "wt", compresslevel=1) as fh:
        for i in range(n):
            turns = [("Human", f"[{i}] " + sentence(rng, 5, 20))]
            for _ in range(rng.choice((0, 0, 1, 2))):
                turns += [("Assistant", sentence(rng, 5, 30)), ("Human", sentence(rng, 3, 15))]
            head = "".join(f"\n\n{r}: {t}" for r, t in turns)
            row = {"chosen": head + "\n\nAssistant: " + sentence(rng, 5, 40),
                   "rejected": head + "\n\nAssistant: " + sentence(rng, 5, 40)}
            fh.write(json.dumps(row) + "\n")


def ours(src: Path, dst: Path) -> int:
    out = ImportPairs(path=str(src), format="hh_transcript").read()
    write_parquet(out.table, dst)
    return out.table.num_rows


def baseline(src: Path, dst: Path, cache: Path) -> int:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(cache))

    def split(text: str) -> list[dict]:
        parts = HH_TURN.split(text)
        return [{"role": HH_ROLES[parts[k]], "content": parts[k + 1]} for k in range(1, len(parts), 2)]

    def convert(batch: dict) -> dict:
        out = {k: [] for k in ("prompt_id", "prompt", "source", "response_id", "response", "generator",
                               "sample_index", "score_original", "label_source", "original_pair")}
        for good, worse in zip(batch["chosen"], batch["rejected"]):
            c, r = split(good), split(worse)
            if c[:-1] != r[:-1]:
                continue
            pid = prompt_id(c[:-1])
            ids = [response_id(pid, "original", c[-1]["content"], 0),
                   response_id(pid, "original", r[-1]["content"], 1)]
            op = pair_id(*ids)
            for k, msgs in enumerate((c, r)):
                out["prompt_id"].append(pid)
                out["prompt"].append(c[:-1])
                out["source"].append(src.name)
                out["response_id"].append(ids[k])
                out["response"].append(msgs[-1]["content"])
                out["generator"].append("original")
                out["sample_index"].append(k)
                out["score_original"].append(1.0 - k)
                out["label_source"].append("original")
                out["original_pair"].append(op)
        return out

    ds = ds.map(convert, batched=True, batch_size=1000, num_proc=1, remove_columns=ds.column_names)
    ds.to_parquet(str(dst))
    return ds.num_rows


def child(side: str, src: Path, dst: Path) -> None:
    """Run one side in this (child) process; print its seconds, rows and peak RSS as JSON."""
    t = time.perf_counter()
    rows = ours(src, dst) if side == "ours" else baseline(src, dst, dst.parent / "hf_cache")
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_mib": peak}))


def run_side(side: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, str(src), str(dst)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000, help="number of transcript pairs")
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "hh.jsonl.gz"
        t = time.perf_counter()
        make_file(src, args.n)
        print(f"pairs: {args.n:,}  file: {src.stat().st_size / 1e6:.1f} MB gzip  "
              f"(written in {time.perf_counter() - t:.1f}s)", flush=True)
        a = run_side("ours", src, tmp / "ours.parquet")
        print(f"ours (import_pairs):                         {a['seconds']:6.1f}s  peak RSS {a['peak_mib']:6.0f} MiB"
              f"  {a['rows']:,} response rows  ({a['seconds'] / args.n * 1e6:.1f}s per 1M pairs)", flush=True)
        b = run_side("baseline", src, tmp / "base.parquet")
        print(f"datasets.load_dataset('json') + Dataset.map: {b['seconds']:6.1f}s  peak RSS {b['peak_mib']:6.0f} MiB"
              f"  {b['rows']:,} response rows", flush=True)
        x = pq.read_table(tmp / "ours.parquet", columns=["response_id", "response"])
        y = pq.read_table(tmp / "base.parquet", columns=["response_id", "response"])
        same = x.num_rows == y.num_rows and sorted(x["response_id"].to_pylist()) == sorted(y["response_id"].to_pylist())
        print(f"same response ids: {same}")
        print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"ratio (baseline / ours): {b['seconds'] / a['seconds']:.1f}x")


if __name__ == "__main__":
    main()
