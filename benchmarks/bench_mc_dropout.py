"""MC-dropout ``score_rm``: masks per row (each row's K passes as one batch of K copies, the
step's way since rows are seeded per row) next to the old per-shard way (K passes over
length-sorted batches of ``batch_size`` rows under one seed), on the same rows and model.

    python benchmarks/bench_mc_dropout.py --threads 1             # SmolLM2-135M + random head
    python benchmarks/bench_mc_dropout.py --rows 32 --passes 4

The reward model is SmolLM2-135M-Instruct loaded as a sequence classifier (random score
head, dropout 0.1 forced, as ``dropout: 0.1`` does): the forward cost is a real 135M
model's. Runs alternate, the fastest of ``--repeat`` counts; the ratio per-row / per-shard
is printed last (> 1: the per-row way is slower by that factor).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFDATA_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows(n: int) -> tuple[list, list]:
    prompts = [[{"role": "user", "content": f"Tell me something useful about the number {k}."}] for k in range(n)]
    responses = [" ".join(["The number", str(k), "is"] + ["quite interesting"] * (3 + k % 9)) + "." for k in range(n)]
    return prompts, responses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import pyarrow as pa
    import torch

    torch.set_num_threads(args.threads)
    from prefdata.models import load_reward_model
    from prefdata.models.hub import SMOLLM2, resolve
    from prefdata.steps.reward import ScoreRM

    path = resolve(SMOLLM2)
    prompts, responses = rows(args.rows)
    table = pa.table({"prompt_id": [f"p{k}" for k in range(args.rows)], "prompt": prompts,
                      "response_id": [f"r{k}" for k in range(args.rows)], "response": responses})
    rm = load_reward_model(path, device="cpu", dtype="float32", batch_size=args.batch_size)
    step = ScoreRM(model=path, mc_dropout=args.passes, dropout=0.1, device="cpu", dtype="float32",
                   batch_size=args.batch_size)
    step.setup()

    def per_shard():
        return rm.score(prompts, responses, passes=args.passes, seed=0, dropout=0.1)

    def per_row():
        return step.process(table)

    best = {"per-shard (old)": float("inf"), "per-row (step)": float("inf")}
    for _ in range(args.repeat):
        for name, run in (("per-shard (old)", per_shard), ("per-row (step)", per_row)):
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    tokens = sum(len(rm.token_ids(p, r)) for p, r in zip(prompts, responses))
    print(f"rows {args.rows}, passes {args.passes}, batch_size {args.batch_size}, threads {args.threads}, "
          f"{tokens / args.rows:.0f} tokens per row, load average {os.getloadavg()[0]:.1f}")
    for name, seconds in best.items():
        print(f"{name:>16}: {seconds:.2f} s  ({args.rows * args.passes / seconds:.1f} row-passes/s)")
    print(f"per-row / per-shard time: {best['per-row (step)'] / best['per-shard (old)']:.2f}x")


if __name__ == "__main__":
    main()
