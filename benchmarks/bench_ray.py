"""The same scoring pipeline on the local executor and on Ray (a local 2-CPU cluster).

load_prompts (pipelines/data/quickstart_prompts.jsonl) → 4 canned responses per prompt
→ score_cdr on the embedded SmolLM2-135M-Instruct. The first two steps are computed
beforehand (untimed) in both workdirs, so each timed run computes only score_cdr: local in
this process (torch on all cores), Ray on an actor pool of 2 actors (0.5 CPU each, one
torch thread each — Ray sets OMP_NUM_THREADS=1 in its workers), each loading the model
once. Both timed runs include model loading; the Ray run also pays for its actors
(start, imports, model load per actor). ``ray.init`` is timed apart, as a one-off cost.
Rows must match: every column exactly, and score_cdr bit for bit when local torch runs
with one thread like the actors (with more threads float32 sums may differ in the 5th
significant digit; the largest difference is printed). The last line is the ratio of the
wall times (ray / local).

    python benchmarks/bench_ray.py [--prompts N] [--shard-size S] [--threads T]

On a shared machine, compare ``--threads 1`` too: a torch process with more threads than
free cores slows down badly, while Ray's one-thread actors do not.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pyarrow as pa

from prefdata import schema
from prefdata.executors import LocalExecutor
from prefdata.executors.ray import RayExecutor
from prefdata.models import clear_cache, load_model
from prefdata.pipeline import Pipeline
from prefdata.step import MapStep
from prefdata.steps.cdr import ScoreCDR
from prefdata.steps.load_prompts import LoadPrompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "pipelines" / "data" / "quickstart_prompts.jsonl"
MODEL = dict(backend="transformers", device="cpu", dtype="float32")
TEMPLATES = [
    "Here is a short answer. {q} The key point is to be clear, accurate and brief.",
    "I am not sure, but I think the answer depends on context. Could you say more about: {q}",
    "Sure! Let me explain step by step. First, read the question carefully: {q} Then think about "
    "what is being asked, list the facts you know, and combine them into a final answer. "
    "Finally, check the answer against the question before you give it.",
    "No.",
]


@dataclass
class CannedConfig:
    n: int = 4


class CannedResponses(MapStep):
    """Stands in for sampling: ``n`` fixed replies per prompt, so only scoring is timed."""

    name = "canned_responses"
    Config = CannedConfig

    def input_columns(self):
        return ["prompt_id", "prompt"]

    def output_columns(self, columns):
        return list(columns) + ["response_id", "response", "sample_index"]

    def process(self, table: pa.Table) -> pa.Table:
        n = self.config.n
        out = table.take(pa.array(np.repeat(np.arange(table.num_rows), n)))
        questions = [p[-1]["content"] for p in out.column("prompt").to_pylist()]
        index = np.tile(np.arange(n), table.num_rows)
        texts = [TEMPLATES[k % len(TEMPLATES)].format(q=q) for q, k in zip(questions, index)]
        ids = [schema.response_id(pid, "canned", t, int(k))
               for pid, t, k in zip(out.column("prompt_id").to_pylist(), texts, index)]
        return (out.append_column("response_id", pa.array(ids, pa.string()))
                .append_column("response", pa.array(texts, pa.string()))
                .append_column("sample_index", pa.array(index, pa.int64())))


def steps(limit: int | None):
    return [LoadPrompts(path=str(PROMPTS), limit=limit), CannedResponses(n=4), ScoreCDR(**MODEL)]


def timed_run(workdir: Path, limit: int | None, shard_size: int, executor) -> tuple[float, pa.Table]:
    """Prepare the response table untimed, then time the run that scores it."""
    Pipeline(steps(limit)[:2], workdir=workdir, shard_size=shard_size, progress=False).run()
    pipeline = Pipeline(steps(limit), workdir=workdir, shard_size=shard_size, executor=executor, progress=False)
    start = time.perf_counter()
    table = pipeline.run()
    return time.perf_counter() - start, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="the first N of the 21 prompts (default 8)")
    parser.add_argument("--shard-size", type=int, default=2, help="prompts per shard (4 responses each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the local run (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    load_model("smollm2-135m-instruct", **MODEL)  # convert the GGUF once, outside the timings
    clear_cache()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"local torch threads: {torch.get_num_threads()}")
    with TemporaryDirectory() as tmp:
        local_s, local_rows = timed_run(Path(tmp) / "local", args.prompts, args.shard_size, LocalExecutor())
        n_resp = local_rows.num_rows
        print(f"local: {local_s:.1f} s for {n_resp} responses")

        executor = RayExecutor(num_actors=2, num_cpus_per_actor=0.5, num_cpus=2)
        start = time.perf_counter()
        executor.connect()
        init_s = time.perf_counter() - start
        print(f"ray.init (2 CPUs): {init_s:.1f} s")
        ray_s, ray_rows = timed_run(Path(tmp) / "ray", args.prompts, args.shard_size, executor)
        print(f"ray:   {ray_s:.1f} s for {ray_rows.num_rows} responses (2 actors), "
              f"{ray_s + init_s:.1f} s with ray.init")
        import ray

        ray.shutdown()
    others = [c for c in local_rows.column_names if c != "score_cdr"]
    same = ray_rows.select(others).equals(local_rows.select(others))
    delta = np.abs(np.array(ray_rows["score_cdr"].to_pylist()) - np.array(local_rows["score_cdr"].to_pylist()))
    print(f"identical rows: {same and not delta.any()} (other columns equal: {same}; "
          f"score_cdr: {(delta > 0).sum()} of {len(delta)} differ, max |diff| {delta.max():.2g})")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"local {local_s:.1f} s, ray {ray_s:.1f} s (+{init_s:.1f} s ray.init); "
          f"ratio ray/local: {ray_s / local_s:.2f} ({(ray_s + init_s) / local_s:.2f} with ray.init)")
    if not same or delta.max() > 1e-3:
        raise SystemExit("Ray and local rows differ")


if __name__ == "__main__":
    main()
