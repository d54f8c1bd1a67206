"""The `sample` step vs a naive loop (one generate call per prompt per sample, batch 1).

Same 16 prompts, same settings, same SmolLM2 weights. Generated tokens are counted the
same way for both: each decoded reply re-tokenized (padding and anything after eos never
count). Also times the first load of the GGUF-shipped model (conversion to safetensors in
a fresh temporary cache) against a cached load. The last line is the speed-up.

    python benchmarks/bench_sample.py [--threads N]

On a shared machine pass ``--threads 1``: with more torch threads than free cores, torch's
worker threads wait on each other and every number turns to noise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow as pa
import torch

from prefdata import schema
from prefdata.models import hub, load_model
from prefdata.steps.sample import Sample

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn.",
    "What is 17 times 23?",
    "Why do cats purr?",
    "Suggest a name for a small bakery.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Translate 'good morning' into Spanish.",
    "Name two planets with rings.",
    "What does a compiler do?",
    "Give me a synonym for 'happy'.",
    "How many legs does a spider have?",
    "Describe the color blue to someone who cannot see.",
    "What is a healthy breakfast?",
]
N, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, SEED = 4, 48, 0.8, 0.95, 0


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


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)


def run_step(table: pa.Table) -> tuple[float, list[str]]:
    step = Sample(n=N, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=MAX_NEW_TOKENS,
                  seed=SEED, backend="transformers", device="cpu")
    step.setup()
    start = time.perf_counter()
    out = step.process(table)
    return time.perf_counter() - start, out.column("response").to_pylist()


def run_naive(conversations) -> tuple[float, list[str]]:
    lm = load_model(hub.SMOLLM2, backend="transformers", device="cpu")
    model, tok = lm.model, lm.tokenizer
    torch.manual_seed(SEED)
    texts = []
    start = time.perf_counter()
    with torch.inference_mode():
        for conv in conversations:
            ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            for _ in range(N):
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                    temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                )
                texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return time.perf_counter() - start, texts


def time_quickstart_rerun() -> tuple[float, bool]:
    """Finish a small quickstart (3 prompts) in a temp workdir, then time the re-run."""
    import subprocess
    import sys
    from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first, cached = time_gguf_load()
    print(f"smollm2 load: first (GGUF conversion) {first:.1f} s, cached {cached:.2f} s")
    rerun_s, loaded = time_quickstart_rerun()
    print(f"re-run of a finished quickstart: {rerun_s:.2f} s, model loaded: {loaded}")

    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    table = pa.table(
        {"prompt_id": [schema.prompt_id(c) for c in conversations], "prompt": conversations,
         "source": ["bench"] * len(conversations)},
        schema=schema.PROMPT,
    )
    tok = load_model(hub.SMOLLM2, backend="transformers", device="cpu").tokenizer
    step_s, step_texts = run_step(table)
    naive_s, naive_texts = run_naive(conversations)
    step_tps = count_tokens(tok, step_texts) / step_s
    naive_tps = count_tokens(tok, naive_texts) / naive_s
    print(f"{len(QUESTIONS)} prompts x n={N}, max_new_tokens={MAX_NEW_TOKENS}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"sample step: {count_tokens(tok, step_texts)} tokens in {step_s:.1f} s = {step_tps:.1f} tokens/s")
    print(f"naive loop:  {count_tokens(tok, naive_texts)} tokens in {naive_s:.1f} s = {naive_tps:.1f} tokens/s")
    print(f"ratio: {step_tps / naive_tps:.2f}x")


if __name__ == "__main__":
    main()
