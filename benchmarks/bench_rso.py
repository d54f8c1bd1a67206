"""build_pairs strategy rso (statistical rejection sampling, a per-prompt loop) next to the
vectorised best_vs_random on the same responses.

    python benchmarks/bench_rso.py                     # 100k prompts x 8 responses
    python benchmarks/bench_rso.py --prompts 20000

Single-threaded (torch is not involved; numpy/polars threads limited by env below). Each
strategy runs ``--repeat`` times and the fastest counts; the ratio rso / best_vs_random is
printed last.
"""

from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefdata.steps.build import BuildPairs  # noqa: E402


def make_responses(n_prompts: int, k: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = n_prompts * k
    p = np.repeat(np.arange(n_prompts), k)
    prompt_ids = pa.array(np.char.add("p", p.astype(str)))
    return pa.table({
        "prompt_id": prompt_ids,
        "prompt": pa.array([[{"role": "user", "content": "q"}]] * n),
        "response_id": pa.array(np.char.add("r", np.arange(n).astype(str))),
        "response": pa.array(np.char.add("answer ", np.arange(n).astype(str))),
        "score_rm": pa.array(rng.normal(size=n)),
    })


def best_time(step: BuildPairs, table: pa.Table, repeat: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = step.process(table).table.num_rows
        times.append(time.perf_counter() - t0)
    return min(times), rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    table = make_responses(args.prompts, args.k)
    base, n_base = best_time(BuildPairs(score="score_rm", strategy="best_vs_random"), table, args.repeat)
    rso, n_rso = best_time(BuildPairs(score="score_rm", strategy="rso", rso_beta=1.0, pairs_per_prompt=2,
                                      label_prob=True), table, args.repeat)
    print(f"load average: {os.getloadavg()}")
    print(f"{args.prompts} prompts x {args.k} responses")
    print(f"best_vs_random: {base:.2f} s ({n_base} pairs, {args.prompts / base:,.0f} prompts/s)")
    print(f"rso (2 pairs):  {rso:.2f} s ({n_rso} pairs, {args.prompts / rso:,.0f} prompts/s)")
    print(f"ratio rso / best_vs_random: {rso / base:.1f}x")


if __name__ == "__main__":
    main()
