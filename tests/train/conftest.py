"""Fixtures for the trainer tests: a tiny random Llama with the SmolLM2 tokenizer, and pair files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from train_data import GOOD, direct_logps, pair_rows, pair_table  # noqa: F401  (re-exported)


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


@pytest.fixture
def pairs_file(tmp_path):
    import pyarrow.parquet as pq

    def make(n: int = 24, seed: int = 0, flip_prob: bool = True, table: pa.Table | None = None):
        path = tmp_path / "data" / f"pairs-{n}-{seed}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table if table is not None else pair_table(n, seed, flip_prob), path)
        return str(path)

    return make
