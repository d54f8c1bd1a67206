"""Peak memory of a recipe with three distinct models: worker processes vs in-process.

The recipe: load_prompts -> sample (SmolLM2-135M-Instruct) -> score_cdr with two perturbed
copies of SmolLM2 (saved with save_pretrained) as strong and weak: three distinct sets of
weights. Each mode runs in a fresh process, sampled every 20 ms with psutil:

* ``in-process``: the old behaviour: every model stays in the process-wide cache until
  the run ends (so the CDR step runs with the sampler's weights still loaded);
* ``worker``: the local executor's default: each model-holding step in a worker process
  that exits with the step.

Per step it prints the peak RSS of the process that computed the step (the worker, or the
main process for steps without models); per run the peak of the whole process tree (main
process plus workers). The last line is the worker run's ``run peak / largest step peak``
(goal <= 1.2x: the run never holds more than the largest step needs, plus a small main
process). One torch thread; ``python benchmarks/bench_memory.py [--prompts 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Name three fruits.", "Say hello in Spanish.",
           "What is 2 + 2?", "Give me a colour."]


# -- models ------------------------------------------------------------------------------
def perturbed_copy(base: str, path: Path, seed: int, scale: float = 0.02) -> str:
    """SmolLM2 with Gaussian noise on every weight (relative ``scale``), saved like a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").is_file():
        return str(path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    del model
    return str(path)


# -- the measured child ---------------------------------------------------------------------
def child(mode: str, workdir: str, strong: str, weak: str, n_prompts: int, events: str) -> None:
    # One thread through OMP_NUM_THREADS (set by the driver): importing torch here only to
    # set it would put torch into the main process, which in worker mode never needs it.
    import prefdata.executors.local as local
    from prefdata.executors.local import LocalExecutor
    from prefdata.pipeline import Pipeline
    from prefdata.steps.cdr import ScoreCDR
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.sample import Sample

    if mode == "in-process":
        local.release_models = lambda: None  # the old behaviour: models stay cached until exit
    data = Path(workdir) / "prompts.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:n_prompts]))
    kw = dict(backend="transformers", device="cpu", dtype="float32", batch_size=4)
    steps = [LoadPrompts(path=str(data)),
             Sample(model="smollm2-135m-instruct", n=2, max_new_tokens=8, **kw),
             ScoreCDR(strong=strong, weak=weak, **kw)]
    log = open(events, "a")

    class Timed(Pipeline):
        def _mark(self, what, step):
            log.write(json.dumps({"t": time.time(), "event": what, "step": step}) + "\n")
            log.flush()

        def _run_source(self, step, *a, **k):
            self._mark("start", step.name)
            try:
                return super()._run_source(step, *a, **k)
            finally:
                self._mark("end", step.name)

        def _run_map(self, i, *a, **k):
            self._mark("start", self.steps[i].name)
            try:
                return super()._run_map(i, *a, **k)
            finally:
                self._mark("end", self.steps[i].name)

    pipe = Timed(steps, workdir=workdir, shard_size=2, progress=False, card=False,
                 executor=LocalExecutor(in_process=(mode == "in-process")))
    pipe.run()


# -- the driver ----------------------------------------------------------------------------
def sample_tree(pid: int, samples: list, stop: threading.Event, every: float = 0.02) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
            rss = {}
            for p in procs:
                try:
                    rss[p.pid] = p.memory_info().rss
                except psutil.Error:
                    pass
            samples.append((time.time(), rss))
        except psutil.Error:
            break
        time.sleep(every)


def measure(mode: str, strong: str, weak: str, n_prompts: int, tmp: Path) -> dict:
    workdir = tmp / f"work-{mode}"
    events = tmp / f"events-{mode}.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--strong", strong,
                             "--weak", weak, "--prompts", str(n_prompts), "--events", str(events)], env=env)
    samples: list = []
    stop = threading.Event()
    thread = threading.Thread(target=sample_tree, args=(proc.pid, samples, stop), daemon=True)
    thread.start()
    start = time.time()
    rc = proc.wait()
    stop.set()
    thread.join()
    if rc != 0:
        raise SystemExit(f"the {mode} run failed (exit {rc})")
    marks = [json.loads(line) for line in events.read_text().splitlines()]
    windows, open_ = [], {}
    for m in marks:
        if m["event"] == "start":
            open_[m["step"]] = m["t"]
        else:
            windows.append((m["step"], open_.pop(m["step"]), m["t"]))
    steps = []
    for name, t0, t1 in windows:
        inside = [rss for t, rss in samples if t0 <= t <= t1]
        workers = [max((v for p, v in rss.items() if p != proc.pid), default=0) for rss in inside]
        main = [rss.get(proc.pid, 0) for rss in inside]
        ran_in_worker = any(workers)
        step_peak = max(workers) if ran_in_worker else max(main, default=0)
        steps.append({"step": name, "peak": step_peak, "where": "worker" if ran_in_worker else "main",
                      "seconds": t1 - t0})
    run_peak = max((sum(rss.values()) for _, rss in samples), default=0)
    return {"mode": mode, "steps": steps, "run_peak": run_peak, "seconds": time.time() - start}


def mib(n: float) -> str:
    return f"{n / 2**20:7.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--workdir")
    ap.add_argument("--strong")
    ap.add_argument("--weak")
    ap.add_argument("--events")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.strong, args.weak, args.prompts, args.events)

    try:
        import psutil  # noqa: F401
    except ImportError:
        raise SystemExit("bench_memory samples memory with psutil: pip install psutil") from None
    from prefdata.models.hub import SMOLLM2, resolve

    cache = Path(tempfile.gettempdir()) / "prefdata-bench-memory"
    base = resolve(SMOLLM2)
    strong = perturbed_copy(base, cache / "smollm2-strong", seed=1)
    weak = perturbed_copy(base, cache / "smollm2-weak", seed=2)
    print(f"models: smollm2-135m-instruct (sample), {strong} and {weak} (score_cdr strong/weak); "
          f"{args.prompts} prompts, 1 thread; load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(mode, strong, weak, args.prompts, Path(tmp)) for mode in ("in-process", "worker")]
    worker_steps = {s["step"]: s["peak"] for s in results[1]["steps"]}
    largest = max(worker_steps.values())
    for r in results:
        print(f"\n{r['mode']} ({r['seconds']:.0f} s)")
        for s in r["steps"]:
            print(f"  {s['step']:<14} peak RSS {mib(s['peak'])} ({s['where']} process, {s['seconds']:.1f} s)")
        print(f"  {'run':<14} peak RSS {mib(r['run_peak'])} (main process + workers)")
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    print(f"in-process run peak / largest step peak: {results[0]['run_peak'] / largest:.2f}x")
    print(f"run peak / largest step peak: {results[1]['run_peak'] / largest:.2f}x")


if __name__ == "__main__":
    main()
