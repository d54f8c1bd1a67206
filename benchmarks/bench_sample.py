"""The `sample` step against distilabel's TransformersLLM and against the step as it was.

Same prompts, N, max_new_tokens, temperature, top_p and SmolLM2 weights (float32, CPU) for
every engine; runs alternate (ours, distilabel, baseline, forward ceiling) so a noisy
neighbour slows them alike. Tokens are counted the same way for all: each reply's text
re-tokenized (padding, eos and anything after it never count).

- ours: the ``sample`` step (continuous batching, one prefill per prompt).
- baseline: the step before it (``baseline_transformers_backend``: static batches through
  ``model.generate``) at its default batch size then (16; the step now defaults to 32 slots).
- distilabel: ``TransformersLLM.generate`` (1.5.3; the transformers text-generation
  pipeline, one prompt at a time with ``num_return_sequences=N``), repetition penalty
  1.0 and top_k 0 so it samples from the same distribution. A benchmark-only dependency:
  ``pip install "distilabel[hf-transformers]==1.5.3" requests``; skipped with a message
  when missing.
- forward ceiling: a plain batched forward (logits at every position) over as many tokens,
  the rate no generator can beat on this machine; each engine is also shown as a share of
  it.

The prompt mix: half ask for a single word or number (replies of ~2-10 tokens), half for a
paragraph (replies that run to ``max_new_tokens``), so a static batch keeps computing
finished short rows while its long rows go on.

    python benchmarks/bench_sample.py --threads 1 [--rounds 2] [--max-new-tokens 64] [--skip-extras] [--slots 64]

``--slots 64`` adds runs of the step with 64 slots beside its default (same seeds, so the
same replies: the script checks it).

On a shared machine pass ``--threads 1``: with more torch threads than free cores, torch's
worker threads wait on each other and every number turns to noise. The last line is the
ratio to distilabel.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from prefdata import schema
from prefdata.models import Sampling, hub, load_model
from prefdata.steps.sample import Sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline_transformers_backend as baseline  # noqa: E402

SHORT = [
    "Answer with one word: what colour is a ripe banana?",
    "What is 17 times 3? Reply with the number only.",
    "Name the capital of Japan. One word.",
    "Give me a synonym for 'happy'. One word only.",
    "How many legs does a spider have? Just the number.",
    "Translate 'good morning' into Spanish. Only the translation.",
    "Which planet is called the red planet? One word.",
    "Yes or no: is the sun a star?",
]
LONG = [
    "Write a paragraph about why people enjoy autumn.",
    "Explain photosynthesis to a ten-year-old in a paragraph.",
    "Describe the colour blue to someone who cannot see.",
    "Write a short story about a lighthouse keeper.",
    "Give me a detailed plan for learning to cook at home.",
    "Explain how a compiler works, step by step.",
    "Write a paragraph on the history of the bicycle.",
    "Describe a walk through a busy market in the morning.",
]
N, TEMPERATURE, TOP_P, SEED = 4, 0.8, 0.95, 0
BASELINE_BATCH_SIZE = 16  # the step's default before continuous batching (now 32 slots)


def conversations() -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in SHORT + LONG]


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)


def run_ours(table: pa.Table, max_new: int, slots: int | None) -> tuple[float, list[str]]:
    extra = {} if slots is None else {"batch_size": slots}  # None: the step's default
    step = Sample(n=N, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=max_new, seed=SEED,
                  backend="transformers", device="cpu", **extra)
    step.setup()
    start = time.perf_counter()
    out = step.process(table)
    return time.perf_counter() - start, out.column("response").to_pylist()


def run_baseline(lm, convs, max_new: int) -> tuple[float, list[str]]:
    sampling = Sampling(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=max_new, seed=SEED)
    start = time.perf_counter()
    replies = lm.generate(convs, N, sampling)
    return time.perf_counter() - start, [t for row in replies for t in row]


def load_distilabel():
    """distilabel's TransformersLLM on the same local weights, or None (with the reason)."""
    try:
        from distilabel.models.llms import TransformersLLM
    except ImportError as exc:
        return None, f"distilabel is not installed ({exc}); pip install \"distilabel[hf-transformers]==1.5.3\" requests"
    llm = TransformersLLM(model=hub.resolve(hub.SMOLLM2), torch_dtype="float32", device="cpu")
    llm.load()
    return llm, None


def run_distilabel(llm, convs, max_new: int) -> tuple[float, list[str]]:
    torch.manual_seed(SEED)
    start = time.perf_counter()
    outputs = llm.generate(inputs=convs, num_generations=N, max_new_tokens=max_new, temperature=TEMPERATURE,
                           top_p=TOP_P, top_k=0, repetition_penalty=1.0, do_sample=True)
    return time.perf_counter() - start, [t or "" for out in outputs for t in out["generations"]]


def run_ceiling(model, tokens: int) -> tuple[float, int]:
    """Seconds for a plain forward (logits everywhere) over about ``tokens`` tokens."""
    width = 128
    rows = max(1, round(tokens / width))
    ids = torch.randint(100, 10000, (rows, width))
    with torch.inference_mode():
        model(ids[:1, :16])  # warm-up
        start = time.perf_counter()
        for row in range(0, rows, 8):
            model(ids[row:row + 8])
    return time.perf_counter() - start, rows * width


def time_gguf_load() -> tuple[float, float]:
    """Seconds for a first load (GGUF conversion) and for a cached load."""
    old = os.environ.get("PREFDATA_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFDATA_CACHE"] = tmp
        try:
            start = time.perf_counter()
            hub.load_causal_lm(hub.SMOLLM2, device="cpu")
            first = time.perf_counter() - start
            start = time.perf_counter()
            hub.load_causal_lm(hub.SMOLLM2, device="cpu")
            cached = time.perf_counter() - start
        finally:
            if old is None:
                os.environ.pop("PREFDATA_CACHE")
            else:
                os.environ["PREFDATA_CACHE"] = old
    return first, cached


def time_quickstart_rerun() -> tuple[float, bool]:
    """Finish a small quickstart (3 prompts) in a temp workdir, then time the re-run."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "prefdata.cli", "run", str(root / "pipelines/quickstart.yaml"), "--no-progress",
               "--limit", "3", "--workdir", f"{tmp}/work", "--output", f"{tmp}/out/pairs.parquet",
               "--set", f"load_prompts.path={root / 'pipelines/data/quickstart_prompts.jsonl'}",
               "--set", "sample.max_new_tokens=16"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp)
        seconds = time.perf_counter() - start
    return seconds, "loading smollm2" in proc.stderr or "Loading weights" in proc.stderr


def _report(round_index: int, name: str, seconds: float) -> None:
    load = os.getloadavg()[0]
    print(f"  round {round_index + 1}: {name} {seconds:.1f} s (load {load:.2f})", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each engine")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--slots", default="",
                        help="comma-separated slot counts for extra runs of the step beside its default, e.g. 64")
    parser.add_argument("--skip-extras", action="store_true",
                        help="skip timing the GGUF conversion and the re-run of a finished quickstart")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"({os.cpu_count()} cores), torch threads={torch.get_num_threads()}")
    if not args.skip_extras:
        first, cached = time_gguf_load()
        print(f"smollm2 load: first (GGUF conversion) {first:.1f} s, cached {cached:.2f} s")
        rerun_s, loaded = time_quickstart_rerun()
        print(f"re-run of a finished quickstart: {rerun_s:.2f} s, model loaded: {loaded}")

    convs = conversations()
    table = pa.table({"prompt_id": [schema.prompt_id(c) for c in convs], "prompt": convs,
                      "source": ["bench"] * len(convs)}, schema=schema.PROMPT)
    ours_lm = load_model(hub.SMOLLM2, backend="transformers", device="cpu")
    tok = ours_lm.tokenizer
    old = baseline.TransformersLM(hub.SMOLLM2, device="cpu", batch_size=BASELINE_BATCH_SIZE)
    peer, why = load_distilabel()
    if peer is None:
        print(f"distilabel: skipped: {why}")

    default_slots = Sample().config.batch_size
    variants = {"ours": None} | {f"ours@{k}": k for k in map(int, filter(None, args.slots.split(",")))
                                 if k != default_slots}
    # untimed warm-up of each engine (first touch of the mapped weights, allocator, kernels)
    run_ours(table.slice(0, 2), 4, None)
    run_baseline(old, convs[:2], 4)
    if peer is not None:
        run_distilabel(peer, convs[:1], 4)
    totals = {name: [0.0, 0] for name in (*variants, "distilabel", "baseline", "ceiling")}
    short_lens, replies = [], {}
    for _ in range(args.rounds):
        for name, slots in variants.items():
            seconds, texts = run_ours(table, args.max_new_tokens, slots)
            totals[name][0] += seconds
            totals[name][1] += count_tokens(tok, texts)
            replies.setdefault(name, texts)
            _report(_, name, seconds)
        short_lens += [len(ids) for ids in tok(texts[:len(SHORT) * N], add_special_tokens=False).input_ids]
        if peer is not None:
            seconds, texts = run_distilabel(peer, convs, args.max_new_tokens)
            totals["distilabel"][0] += seconds
            totals["distilabel"][1] += count_tokens(tok, texts)
            _report(_, "distilabel", seconds)
        seconds, texts = run_baseline(old, convs, args.max_new_tokens)
        totals["baseline"][0] += seconds
        totals["baseline"][1] += count_tokens(tok, texts)
        _report(_, "baseline", seconds)
        seconds, tokens = run_ceiling(ours_lm.model, totals["ours"][1] // (_ + 1))
        totals["ceiling"][0] += seconds
        totals["ceiling"][1] += tokens
        _report(_, "ceiling", seconds)

    rate = {name: t / s for name, (s, t) in totals.items() if s > 0}
    print(f"{len(SHORT)} one-word + {len(LONG)} paragraph prompts x n={N}, max_new_tokens={args.max_new_tokens}, "
          f"temperature={TEMPERATURE}, top_p={TOP_P}, {args.rounds} rounds; batch size: step "
          f"{default_slots} slots (default), baseline {BASELINE_BATCH_SIZE} rows, distilabel one prompt's N")
    same = all(texts == replies["ours"] for texts in replies.values())
    print(f"the step's replies are identical for every slot count run: {same}")
    print(f"short replies: median {sorted(short_lens)[len(short_lens) // 2]} tokens (ours)")
    labels = {"ours": f"sample step ({default_slots} slots)", "distilabel": "distilabel TransformersLLM",
              "baseline": "sample step before (static)", "ceiling": "forward only (ceiling)"}
    labels |= {name: f"sample step ({slots} slots)" for name, slots in variants.items() if slots}
    for name, r in rate.items():
        seconds, tokens = totals[name]
        print(f"{labels[name]:<28} {tokens:6d} tokens in {seconds:7.1f} s = {r:6.1f} tokens/s "
              f"= {r / rate['ceiling']:6.1%} of the forward-only rate")
    print(f"load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    for name in variants:
        print(f"{labels[name]}: ratio to the step before (static batches): {rate[name] / rate['baseline']:.2f}x")
    if "distilabel" in rate:
        for name in variants:
            print(f"{labels[name]}: ratio to distilabel: {rate[name] / rate['distilabel']:.2f}x")
    else:
        print("ratio to distilabel: n/a (distilabel not installed)")


if __name__ == "__main__":
    main()
