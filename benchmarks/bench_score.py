"""CDR scoring (the `score_cdr` step) vs a naive loop, on SmolLM2-135M-Instruct.

64 prompts x 4 responses, multi-turn prompts about three times as long as the responses.
The step uses one model with a criteria prompt on the strong side, so each response is
scored twice (with and without the criteria). The naive loop does the same work the
obvious way: one forward per (side, prompt+response), batch 1, logits at every position.
The step groups the four responses of a prompt, runs the prompt once and continues the
responses from its KV cache, computes logits only at response positions, and batches by
length (padding only to a batch's own longest member).

Also measures the machine's fp32 matmul GFLOP/s in the same run (best of a few shapes,
same thread count; the 2048^3 product is the fastest here) and prints MFU = 2 x
non-embedding params x computed tokens/s / peak — against the peak probed before each
shard (what a shared machine offered at that moment) and against the best of the run.
"item tokens/s" counts prompt+response tokens of every scored item (the same numerator
for both, so its ratio is the speed-up); "computed tokens/s" counts the tokens each
method actually runs through the model.

    python benchmarks/bench_score.py [--threads 1] [--prompts 64] [--batch-size 16] [--chunk 8]

The table is processed shard by shard (``--chunk`` prompts, as the pipeline would), the
step and the naive loop alternating on each shard, so a change in machine load during
the run hits both. On a shared machine pass ``--threads 1``: with more torch threads than
free cores every number turns to noise. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import pyarrow as pa
import torch

from prefdata import schema
from prefdata.steps.cdr import DEFAULT_CRITERIA, ScoreCDR, with_criteria

WORDS = (
    "the a model answer question data river city music light table garden system value "
    "because however small large quickly carefully explain describe compare history science "
    "energy water mountain language computer network people problem simple complex result "
    "method reason example morning evening market travel health story winter summer idea "
    "number bridge window school doctor engine planet ocean forest signal memory pattern"
).split()


def text(rng: random.Random, words: int) -> str:
    out = [rng.choice(WORDS) for _ in range(words)]
    for k in range(9, words, 10):
        out[k] += "."
    return " ".join(out).capitalize() + "."


def make_table(n_prompts: int, n_responses: int, seed: int = 0) -> pa.Table:
    """Multi-turn prompts (user, assistant, user) ~3x as long as the responses, in tokens."""
    rng = random.Random(seed)
    rows = {"prompt_id": [], "prompt": [], "response": []}
    for _ in range(n_prompts):
        prompt = [
            {"role": "user", "content": text(rng, rng.randint(45, 75))},
            {"role": "assistant", "content": text(rng, rng.randint(35, 55))},
            {"role": "user", "content": text(rng, rng.randint(10, 30))},
        ]
        for _ in range(n_responses):
            rows["prompt_id"].append(schema.prompt_id(prompt))
            rows["prompt"].append(prompt)
            rows["response"].append(text(rng, rng.randint(35, 70)))
    return pa.table(rows)


SHAPES = ((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048))


def matmul_peak(seconds: float = 1.0, shapes=SHAPES) -> float:
    """Best fp32 matmul GFLOP/s over a few shapes (the MFU denominator)."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def naive_cdr(lm, prompts, responses, criteria: str) -> tuple[list[float], int]:
    """One full forward (all logits) per side per item; returns scores and tokens run."""
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token_id
    scores, tokens = [], 0
    with torch.inference_mode():
        for prompt, response in zip(prompts, responses):
            answer = tok(response, add_special_tokens=False).input_ids + [eos]
            sides = []
            for conv in (with_criteria(prompt, criteria), prompt):
                ids = list(tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"])
                seq = torch.tensor([ids + answer])
                logits = lm.model(seq).logits[0]
                logp = torch.log_softmax(logits.float(), dim=-1)
                pos = torch.arange(len(ids) - 1, len(ids) + len(answer) - 1)
                sides.append(float(logp[pos, seq[0, len(ids):]].double().sum()))
                tokens += seq.shape[1]
            scores.append(sides[0] - sides[1])
    return scores, tokens


def token_counts(lm, prompts, responses, criteria: str) -> tuple[int, int]:
    """(item tokens over both sides, tokens the shared path runs: each prompt once per side)."""
    tok = lm.tokenizer
    items, seen, computed = 0, set(), 0
    for prompt, response in zip(prompts, responses):
        n_answer = len(tok(response, add_special_tokens=False).input_ids) + 1
        for conv in (with_criteria(prompt, criteria), prompt):
            ids = tuple(tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"])
            items += len(ids) + n_answer
            if ids not in seen:
                seen.add(ids)
                computed += len(ids)
            computed += n_answer - 1
    return items, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--responses", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8, help="prompts per shard; the methods alternate per shard")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    table = make_table(args.prompts, args.responses)
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    step = ScoreCDR(strong="smollm2-135m-instruct", criteria=DEFAULT_CRITERIA, backend="transformers",
                    device="cpu", dtype="float32", batch_size=args.batch_size)
    step.setup()
    lm = step.strong
    params = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    items, computed = token_counts(lm, prompts, responses, DEFAULT_CRITERIA)
    n_prompt = np.mean([len(lm._prompt_ids(p)) for p in prompts])
    n_resp = np.mean([len(lm._response_ids(r)) for r in responses])
    print(f"{args.prompts} prompts x {args.responses} responses; mean prompt {n_prompt:.0f} tokens "
          f"(+ criteria on the strong side), mean response {n_resp:.0f} tokens (ratio {n_prompt / n_resp:.1f}); "
          f"non-embedding params {params / 1e6:.1f}M")

    peak_before = matmul_peak()
    print(f"fp32 matmul peak: {peak_before:.1f} GFLOP/s")

    step.process(table.slice(0, args.responses * 2))  # warm-up
    # Interleave the two methods shard by shard, so load changes on a shared machine hit
    # both, and probe the matmul peak before each shard: MFU is then measured against the
    # peak the machine offered while that shard ran (``available``), and also against the
    # best peak of the whole run (``best``, the conservative figure).
    rows = args.chunk * args.responses
    ours, naive, t_ours, t_naive, naive_tokens = [], [], 0.0, 0.0, 0
    peak_seconds_ours = peak_seconds_naive = 0.0  # sum of seconds x probed GFLOP/s
    peaks = [peak_before]
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        peaks.append(matmul_peak(seconds=0.3, shapes=((2048, 2048, 2048),)))
        t = time.perf_counter()
        ours.extend(step.process(part).column("score_cdr").to_pylist())
        dt = time.perf_counter() - t
        t_ours += dt
        peak_seconds_ours += dt * peaks[-1]
        t = time.perf_counter()
        scores, tokens = naive_cdr(lm, part.column("prompt").to_pylist(), part.column("response").to_pylist(),
                                   DEFAULT_CRITERIA)
        dt = time.perf_counter() - t
        t_naive += dt
        peak_seconds_naive += dt * peaks[-1]
        naive.extend(scores)
        naive_tokens += tokens
    peaks.append(matmul_peak())
    best = max(peaks)
    print(f"fp32 matmul peak after: {peaks[-1]:.1f} GFLOP/s; probed per shard: "
          f"{min(peaks[1:-1]):.0f}-{max(peaks[1:-1]):.0f}; best of the run {best:.1f}")

    diff = float(np.max(np.abs(np.array(ours) - np.array(naive))))
    flops = lambda tokens: 2 * params * tokens / 1e9  # noqa: E731
    print(f"max |score difference| step vs naive: {diff:.2e}")
    for label, seconds, tokens, peak_seconds, total in (
        ("naive", t_naive, naive_tokens, peak_seconds_naive, naive_tokens),
        ("step ", t_ours, computed, peak_seconds_ours, computed),
    ):
        print(f"{label}: {seconds:7.1f} s  item tokens/s {items / seconds:5.0f}  computed tokens/s "
              f"{total / seconds:5.0f}  MFU {flops(tokens) / peak_seconds:.0%} of the available peak, "
              f"{flops(tokens) / seconds / best:.0%} of the best")
    print(f"work saved: {naive_tokens / computed:.2f}x fewer tokens through the model")
    load_after = os.getloadavg()
    print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"speed-up: {t_naive / t_ours:.2f}x")


if __name__ == "__main__":
    main()
