"""Helpers for tests of code that uses prefdata: tiny random models saved like real checkpoints.

A tiny model goes through the same loading code (``from_pretrained``, ``load_model``) as a
user's checkpoint; only the weights are random and the sizes small, so tests need no network.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(path: str | Path, seed: int = 0, *, hidden_size: int = 64, layers: int = 2,
                    max_positions: int = 512, tie_embeddings: bool = False,
                    init_range: float = 0.2, head: str = "causal_lm", num_labels: int = 1,
                    **config_overrides) -> str:
    """Save a random Llama with SmolLM2's tokenizer to ``path`` (safetensors) and return it.

    ``head``: ``causal_lm`` or ``sequence_classification`` (a reward model). The weights
    depend only on the sizes, ``init_range``, ``tie_embeddings`` and ``seed`` (torch's RNG), so
    a test that built the same Llama by hand gets the same numbers from here.
    """
    if head not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"head must be 'causal_lm' or 'sequence_classification', got {head!r}")
    import torch
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    from prefdata.models.hub import SMOLLM2, resolve

    tok = AutoTokenizer.from_pretrained(resolve(SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
        initializer_range=init_range, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **config_overrides,
    )
    if head == "sequence_classification":
        config.num_labels = num_labels
    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if head == "sequence_classification" else LlamaForCausalLM
    model = cls(config).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def make_eos_prone(base: str | Path, path: str | Path) -> str:
    """Save a copy of the tiny Llama at ``base`` whose eos has ~12% probability per step.

    A random model almost never picks eos from 49k tokens, so every reply would run to
    ``max_new_tokens``; tests of continuous batching need replies of varied lengths. A large
    constant feature in every embedding survives the layers, and only eos reads it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 30.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos, 0] = 2.3
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return str(path)
