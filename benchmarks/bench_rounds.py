"""Two rounds of the tiny iterative DPO recipe: time per phase, and the rounds machinery's
overhead as a share of round time.

Run from the repository root:

    python benchmarks/bench_rounds.py [--model PATH] [--prompts 4] [--steps 5] [--threads 1]

Phases come from ``<workdir>/rounds.jsonl`` (each step's wall time, the eval, and the
dataset card with its plots, made once after the last round). The overhead — everything
except model forward/backward, generation and model loading — is measured in two parts:
the rounds machinery, as the time of an immediate rerun of the same recipe where every
step is cached (expanding rounds, resolving model identities by content hash,
fingerprints, reading markers and shards, the report; the card is unchanged, so it is
left as it is), plus the card and plots as timed in the computing run. Baseline side by
side: the first (computing) run; the ratio is printed last. Also timed: loading a round's
trained policy folder for sampling (safetensors, no conversion).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recipe(tmp: Path, model: str, prompts: int, steps: int) -> Path:
    data = yaml.safe_load((ROOT / "pipelines/iterative_dpo.yaml").read_text())
    data.update(workdir=str(tmp / "work"), output=str(tmp / "out/pairs.parquet"), shard_size=2)
    data["rounds"].update(policy=model, prompts_per_round=prompts)
    data["eval_prompts"] = {"path": str(ROOT / "pipelines/data/onpolicy_eval_prompts.jsonl"), "limit": 2}
    by = {s["step"]: s for s in data["steps"]}
    by["load_prompts"]["path"] = str(ROOT / by["load_prompts"]["path"])
    by["sample"].update(n=2, max_new_tokens=16)
    by["score_cdr"]["strong"] = model
    by["train"].update(max_steps=steps, save_every=steps, batch_size=2, max_length=128, eval_fraction=0.25)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path) -> tuple[float, list[dict]]:
    from prefdata.cli import main

    t0 = time.perf_counter()
    code = main(["run", str(path), "--in-process", "--no-progress"])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"prefdata run failed ({code})")
    rows = [json.loads(x) for x in (path.parent / "work/rounds.jsonl").read_text().splitlines()]
    return seconds, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="round 0's policy (default: a tiny random Llama, hidden 64)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per round")
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ["PREFDATA_NO_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from prefdata.testing import make_tiny_llama

            model = make_tiny_llama(tmp / "tiny", seed=0, hidden_size=64, layers=2)
        path = recipe(tmp, model, args.prompts, args.steps)
        full, rows = run(path)
        cached, _ = run(path)
        from prefdata.models.hub import load_causal_lm

        t0 = time.perf_counter()
        load_causal_lm(rows[-1]["policy_out"], device="cpu", dtype="float32")
        load_s = time.perf_counter() - t0
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; threads {args.threads}; model {args.model or 'tiny llama (hidden 64, 2 layers)'}")
    phases = ("load_prompts", "round_prompts", "sample", "score_cdr", "build_pairs", "train", "eval", "card")
    print(f"{'round':>6}" + "".join(f"{p:>14}" for p in phases) + f"{'round':>10}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['round']:>6}" + "".join(f"{s.get(p, 0.0):>13.2f}s" for p in phases) + f"{s['round']:>9.2f}s")
    print(f"loading the trained policy folder (safetensors): {load_s:.2f} s")
    card = rows[-1]["seconds"].get("card", 0.0)
    print(f"full run (2 rounds, computing): {full:.2f} s; cached rerun (the machinery alone): {cached:.2f} s; "
          f"card and plots (once, in the full run): {card:.2f} s")
    print(f"machinery = cached rerun / full run = {cached / full:.3f}; card = {card / full:.3f}")
    print(f"overhead share of round time = (cached rerun + card) / full run = {(cached + card) / full:.3f} "
          "(goal < 0.05)")


if __name__ == "__main__":
    main()
