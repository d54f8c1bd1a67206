"""build_pairs at scale, next to a pandas groupby implementation of the same pairs.

    python benchmarks/bench_build.py                    # 1M prompts x 4 responses
    python benchmarks/bench_build.py --prompts 100000   # quicker
    python benchmarks/bench_build.py --ches-pairs 0     # skip the CHES throughput

Synthetic data: 1M prompts x 4 responses, scores rounded to 0.1 (so ties happen), 2% of
responses repeat another response's text. Each (implementation, strategy) runs in its own
process, so its peak RSS is its own; the timed part starts from the response table in
memory (an Arrow table) and ends with the pair table as Arrow in the PAIR schema; each runs
``--repeat`` times (default 2) and the fastest run counts (timeit's rule). The
pandas version is vectorised groupby/merge code — ``to_pandas``, sort, ``groupby.head``,
a self-merge for all pairs, message lists built in Python, ``from_pandas`` — and uses the
same stable hashes for tie-breaks, the random choice and pair ids, so both produce the
same pairs; the run checks that they do. Also measured: CHES throughput (pairs/s) with
the packaged SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefdata.pairs import combine_unordered, fmix64, hash64, hex16  # noqa: E402
from prefdata.schema import PAIR  # noqa: E402

SCORE = "score_rm"
STRATEGIES = {"best_vs_random": 0.0, "all_pairs": 0.5}  # strategy -> min_margin


def make_responses(n_prompts: int, k: int = 4, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = n_prompts * k
    p = np.repeat(np.arange(n_prompts), k)
    j = np.tile(np.arange(k), n_prompts)
    p_str = pa.array(np.arange(n_prompts).astype(str))
    questions = pc.binary_join_element_wise(pa.repeat(pa.scalar("question"), n_prompts), p_str, " ")
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(n_prompts + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([pa.repeat(pa.scalar("user"), n_prompts), questions], names=["role", "content"]))
    variant = np.where((rng.random(n) < 0.02) & (j > 0), 0, j)  # 2% identical texts
    text = pc.binary_join_element_wise(
        pa.repeat(pa.scalar("answer"), n), pa.array(variant.astype(str)), pa.array(p.astype(str)), " ")
    rows = pa.array(p), pa.array(np.arange(n).astype(str))
    return pa.table({
        "prompt_id": hex16(hash64(p_str, seed=1)).take(rows[0]),
        "prompt": messages.take(rows[0]),
        "source": pa.repeat(pa.scalar("bench"), n),
        "response_id": hex16(hash64(rows[1], seed=2)),
        "response": text,
        SCORE: np.round(rng.normal(size=n), 1),
    })


# -- the two implementations --------------------------------------------------------------
def run_polars(table: pa.Table, strategy: str, margin: float) -> pa.Table:
    from prefdata.steps.build import BuildPairsConfig, build_pairs

    return build_pairs(table, BuildPairsConfig(score=SCORE, strategy=strategy, min_margin=margin)).table


def run_pandas(table: pa.Table, strategy: str, margin: float, seed: int = 0) -> pa.Table:
    import pandas as pd

    df = table.to_pandas()
    df = df[df[SCORE].notna()]
    df["_r"] = hash64(pa.array(df["response_id"].to_numpy(), pa.string()))
    df = df.sort_values(["prompt_id", SCORE, "_r"], ascending=[True, False, True], kind="stable")
    slim = df[["prompt_id", "response_id", "response", SCORE, "_r"]]
    if strategy == "best_vs_random":
        best = slim.groupby("prompt_id", sort=False).head(1)
        m = slim.merge(best, on="prompt_id", suffixes=("_r", "_c"))
        m = m[(m["response_id_r"] != m["response_id_c"]) & (m[f"{SCORE}_r"] < m[f"{SCORE}_c"])
              & (m[f"{SCORE}_c"] - m[f"{SCORE}_r"] >= margin) & (m["response_r"] != m["response_c"])]
        m = m.assign(_key=fmix64(m["_r_r"].to_numpy() ^ fmix64(np.uint64(seed))))
        pairs = m.sort_values(["prompt_id", "_key"]).groupby("prompt_id", sort=False).head(1)
    else:
        m = slim.merge(slim, on="prompt_id", suffixes=("_c", "_r"))
        pairs = m[(m[f"{SCORE}_c"] > m[f"{SCORE}_r"]) & (m[f"{SCORE}_c"] - m[f"{SCORE}_r"] >= margin)
                  & (m["response_c"] != m["response_r"])]
    prompts = df.drop_duplicates("prompt_id")[["prompt_id", "prompt", "source"]]
    pairs = pairs.merge(prompts, on="prompt_id")
    out = pd.DataFrame({
        "pair_id": hex16(combine_unordered(pairs["_r_c"].to_numpy(), pairs["_r_r"].to_numpy())).to_pylist(),
        "prompt_id": pairs["prompt_id"].to_numpy(),
        "prompt": pairs["prompt"].to_numpy(),
        "chosen": [[{"role": "assistant", "content": t}] for t in pairs["response_c"]],
        "rejected": [[{"role": "assistant", "content": t}] for t in pairs["response_r"]],
        "chosen_id": pairs["response_id_c"].to_numpy(),
        "rejected_id": pairs["response_id_r"].to_numpy(),
        "score_chosen": pairs[f"{SCORE}_c"].to_numpy(),
        "score_rejected": pairs[f"{SCORE}_r"].to_numpy(),
        "margin": (pairs[f"{SCORE}_c"] - pairs[f"{SCORE}_r"]).to_numpy(),
        "pair_strategy": strategy,
        "label_source": "ai",
        "source": pairs["source"].to_numpy(),
    })
    return pa.Table.from_pandas(out, schema=pa.schema(list(PAIR) + [("source", pa.string())]), preserve_index=False)


def checksum(table: pa.Table) -> str:
    """Order-free digest of (pair_id, chosen_id): equal iff both built the same pairs."""
    h = combine_unordered(hash64(table.column("pair_id")), hash64(table.column("chosen_id")))
    return f"{int(np.bitwise_xor.reduce(h)) if len(h) else 0:016x}-{table.num_rows}"


def worker(impl: str, strategy: str, path: str, repeat: int) -> None:
    table = pq.read_table(path)
    rss_before = _peak_rss_gb()
    build = run_polars if impl == "polars" else run_pandas
    times, out = [], None
    for _ in range(repeat):
        out = None  # free the previous run's output first
        start = time.perf_counter()
        out = build(table, strategy, STRATEGIES[strategy])
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(times), "times": times, "peak_rss_gb": _peak_rss_gb(),
                      "rss_after_load_gb": rss_before, "pairs": out.num_rows, "checksum": checksum(out)}))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def ches_throughput(n_pairs: int) -> dict:
    from prefdata.models import load_model
    from prefdata.steps.ches import ches_scores

    model = load_model("smollm2-135m-instruct", backend="transformers", device="cpu", dtype="float32", batch_size=16)
    sentences = ["The capital of France is Paris, a city on the Seine.",
                 "Water boils at one hundred degrees Celsius at sea level.",
                 "A prime number has exactly two divisors: one and itself.",
                 "Photosynthesis turns light, water and carbon dioxide into sugar."]
    rows = []
    for i in range(n_pairs):
        a = " ".join(sentences[(i + k) % 4] for k in range(3))
        b = " ".join(sentences[(i + 2 * k + 1) % 4] for k in range(3))
        rows.append({"prompt": [{"role": "user", "content": f"Tell me three facts (#{i})."}],
                     "chosen": [{"role": "assistant", "content": a}],
                     "rejected": [{"role": "assistant", "content": b}],
                     "chosen_id": f"c{i}", "rejected_id": f"r{i}"})
    table = pa.Table.from_pylist(rows)
    ches_scores(model, table.slice(0, 2))  # warm-up
    start = time.perf_counter()
    ches, _ = ches_scores(model, table)
    seconds = time.perf_counter() - start
    assert np.isfinite(ches).all()
    return {"pairs": n_pairs, "seconds": seconds, "pairs_per_s": n_pairs / seconds, "threads": _threads()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per implementation; the fastest counts")
    ap.add_argument("--ches-pairs", type=int, default=64)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "STRATEGY", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, repeat=args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "responses.parquet")
        t = time.perf_counter()
        data = make_responses(args.prompts, args.responses)
        pq.write_table(data, path)
        print(f"data: {args.prompts:,} prompts x {args.responses} responses = {data.num_rows:,} rows "
              f"({time.perf_counter() - t:.1f}s to make); {os.cpu_count()} CPUs")
        del data
        results = {}
        for strategy in STRATEGIES:
            for impl in ("polars", "pandas"):
                proc = subprocess.run([sys.executable, __file__, "--worker", impl, strategy, path,
                                       "--repeat", str(args.repeat)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{impl}/{strategy} failed:\n{proc.stderr}")
                results[impl, strategy] = r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs = "/".join(f"{x:.2f}" for x in r["times"])
                print(f"{impl:7s} {strategy:15s} {r['seconds']:7.2f}s (runs {runs})  peak RSS {r['peak_rss_gb']:.2f} GB "
                      f"(data loaded: {r['rss_after_load_gb']:.2f} GB)  {r['pairs']:,} pairs")
            same = results["polars", strategy]["checksum"] == results["pandas", strategy]["checksum"]
            print(f"        {strategy:15s} same pairs from both: {same}")
            if not same:
                sys.exit("the two implementations disagree")

    if args.ches_pairs:
        r = ches_throughput(args.ches_pairs)
        print(f"CHES on SmolLM2-135M (CPU, {r['threads']} threads): {r['pairs']} pairs in {r['seconds']:.1f}s "
              f"= {r['pairs_per_s']:.1f} pairs/s")
    for strategy in STRATEGIES:
        pol, pan = results["polars", strategy], results["pandas", strategy]
        print(f"ratio {strategy}: pandas {pan['seconds']:.2f}s / polars {pol['seconds']:.2f}s = "
              f"{pan['seconds'] / pol['seconds']:.1f}x (polars peak RSS {pol['peak_rss_gb']:.2f} GB)")


if __name__ == "__main__":
    main()
