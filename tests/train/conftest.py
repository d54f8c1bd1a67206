"""Fixtures for the trainer tests: a tiny random Llama with the SmolLM2 tokenizer, and pair files."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from prefdata.schema import MESSAGES

GOOD = "Yes. The answer is 42, and here is why it holds."


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama (random weights) saved as safetensors with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prefdata.models.hub import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


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


@pytest.fixture
def pairs_file(tmp_path):
    import pyarrow.parquet as pq

    def make(n: int = 24, seed: int = 0, flip_prob: bool = True, table: pa.Table | None = None):
        path = tmp_path / "data" / f"pairs-{n}-{seed}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table if table is not None else pair_table(n, seed, flip_prob), path)
        return str(path)

    return make


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
