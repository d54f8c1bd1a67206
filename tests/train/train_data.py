"""Plain helpers for the trainer tests (pair tables, direct log-probs); importable as
``train_data`` because a module named ``conftest`` is ambiguous across test folders."""

from __future__ import annotations

import random

import pyarrow as pa

from prefdata.schema import MESSAGES

GOOD = "Yes. The answer is 42, and here is why it holds."


def pair_rows(n: int, seed: int = 0, flip_prob: bool = True) -> dict:
    """A learnable task: the chosen reply is always GOOD, the rejected one random words."""
    rng = random.Random(seed)
    words = "apple river stone cloud seven blue quick lamp orange window paper green".split()
    rows = {"pair_id": [], "prompt": [], "chosen": [], "rejected": [], "score_chosen": [],
            "score_rejected": [], "margin": []}
    if flip_prob:
        rows["flip_prob"] = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        prompt = [{"role": "user", "content": f"Question {i}: {question}?"}]
        if i % 3 == 0:  # some multi-turn prompts
            prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] + prompt
        bad = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        rows["pair_id"].append(f"p{i}")
        rows["prompt"].append(prompt)
        rows["chosen"].append([{"role": "assistant", "content": GOOD}])
        rows["rejected"].append([{"role": "assistant", "content": bad}])
        rows["score_chosen"].append(1.0)
        rows["score_rejected"].append(0.0)
        rows["margin"].append(1.0)
        if flip_prob:
            rows["flip_prob"].append(rng.uniform(0.0, 0.3))
    return rows


def pair_table(n: int, seed: int = 0, flip_prob: bool = True) -> pa.Table:
    rows = pair_rows(n, seed, flip_prob)
    types = {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES}
    return pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()})


def direct_logps(model_path: str, data_path: str, max_length: int = 128):
    """Summed response log-probs [n, 2] of every pair by an ordinary ``model(prompt + response)``
    forward: an independent check of the trainer's packed path, cache and loss wiring."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefdata.train.data import load_examples

    tok = AutoTokenizer.from_pretrained(model_path)
    ex = load_examples(data_path, tok, max_length)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = np.zeros((len(ex), 2))
    counts = np.zeros((len(ex), 2))
    with torch.no_grad():
        for i in range(len(ex)):
            prompt, responses = ex.row(i)
            for k, resp in enumerate(responses):
                logits = model(input_ids=torch.tensor([prompt + resp])).logits[0].float()
                lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
                out[i, k] = lp.gather(-1, torch.tensor(resp)[:, None]).sum().item()
                counts[i, k] = len(resp)
    return out, counts
