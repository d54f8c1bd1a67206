"""Preference-model speed: feature extraction with prompt sharing vs one forward per
(prompt, response), on the same SmolLM2 inputs (prompts 3x the responses), and head-only
training on 10,000 cached pairs (BT and GPM). One torch thread; load average printed.

    python benchmarks/bench_preference_model.py [--prompts 8] [--responses 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from prefdata.prefmodel.features import Features, extract
from prefdata.prefmodel.train import PrefModelConfig, fit_head, make_head

WORDS = ("the river runs past old stone walls while clouds drift over quiet fields and "
         "a small boat waits near the bridge for the morning light ").split()


def text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def bench_features(args) -> tuple[float, float, float]:
    from prefdata.models.transformers_backend import TransformersLM

    rng = np.random.default_rng(0)
    prompts = [[{"role": "user", "content": text(rng, 3 * args.response_words)}] for _ in range(args.prompts)]
    convs = [p for p in prompts for _ in range(args.responses)]
    resps = [text(rng, args.response_words) for _ in convs]
    lm = TransformersLM("smollm2-135m-instruct", device="cpu", dtype="float32", batch_size=args.batch_size)
    times, feats = {}, {}
    for shared in (False, True, False, True):  # interleaved, best of two
        lm.share_prompts = shared
        t0 = time.perf_counter()
        feats[shared] = extract(lm, convs, resps)
        times[shared] = min(times.get(shared, 1e9), time.perf_counter() - t0)
    diff = float((feats[True].response - feats[False].response).abs().max())
    return times[False], times[True], diff


def bench_head(args) -> dict:
    rng = np.random.default_rng(0)
    d, n_pairs = 576, 10_000  # SmolLM2's hidden size
    items = torch.tensor(rng.normal(size=(2 * n_pairs, d)), dtype=torch.float32)
    feats = Features(items, torch.tensor(rng.normal(size=(2 * n_pairs, d)), dtype=torch.float32))
    chosen, rejected = np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2)
    out = {}
    for objective in ("bt", "gpm"):
        cfg = PrefModelConfig(data="-", output="-", objective=objective, epochs=args.epochs)  # default batch
        fit_head(make_head(cfg, d), feats, chosen, rejected, np.arange(n_pairs),
                 PrefModelConfig(data="-", output="-", objective=objective, max_steps=5))  # warm-up
        head = make_head(cfg, d)
        t0 = time.perf_counter()
        steps = fit_head(head, feats, chosen, rejected, np.arange(n_pairs), cfg)
        out[objective] = (time.perf_counter() - t0, len(steps))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--responses", type=int, default=4)
    p.add_argument("--response-words", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    heads = bench_head(args)
    plain, shared, diff = bench_features(args)
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; now {os.getloadavg()[0]:.2f}; "
          f"threads {args.threads}")
    print(f"features: {args.prompts} prompts x {args.responses} responses, prompts ~3x the responses; "
          f"max |shared - plain| = {diff:.2e}")
    for name, (sec, steps) in heads.items():
        print(f"head-only {name}: 10,000 cached pairs, {steps} steps ({args.epochs:g} epochs) in {sec:.2f} s")
    print(f"feature extraction: one forward per (prompt, response) {plain:.2f} s, prompt sharing {shared:.2f} s, "
          f"ratio {plain / shared:.2f}x")
    print(f"head-only training on 10,000 cached pairs: BT {heads['bt'][0]:.2f} s, GPM {heads['gpm'][0]:.2f} s "
          f"(goal < 10 s)")


if __name__ == "__main__":
    main()
