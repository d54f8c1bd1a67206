"""Sequence-classification reward models (any HF id or local path), batched by length.

Each (conversation, response) is formatted with the reward model's own chat template and
tokenised once. Decoder reward models (``*ForSequenceClassification`` with a ``score``
head: Llama, Mistral, Qwen, Gemma, GPT-2 …) run their base model on right-padded batches
and the head reads the state of the sequence's last non-pad token — the token
transformers pools on an unpadded sequence — so padding never changes a score. Other
architectures (encoders with first-token pooling) run whole, with their attention mask.

MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation: Representing
Model Uncertainty in Deep Learning"): ``passes`` forward passes with dropout on, from a
seeded RNG, give one score per pass; the ``score_rm`` step turns them into a mean and a
std (see ``prefdata/steps/reward.py`` for the UPO reference).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np

from prefdata.models import hub
from prefdata.models.base import Conversation

log = logging.getLogger(__name__)


class RewardModel:
    """A sequence-classification model that scores (conversation, response) pairs."""

    def __init__(
        self,
        name: str,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 16,
        trust_remote_code: bool = False,
        max_length: int | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.name, self.device, self.batch_size = name, device, batch_size
        path = hub.resolve(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"reward model '{name}' has no chat template; the prompt and response must be "
                "formatted the way the model was trained — use a checkpoint that ships one"
            )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=hub._dtype(dtype, device), use_safetensors=True,
            trust_remote_code=trust_remote_code,
        ).to(device).eval()
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id
        self.num_labels = int(self.model.config.num_labels)
        self.max_length = max_length or _context_length(self.model.config, self.tokenizer)
        self.decoder = hasattr(self.model, "score") and hasattr(self.model, self.model.base_model_prefix)
        self._torch = torch

    def score(
        self,
        conversations: list[Conversation],
        responses: list[str],
        label: int = 0,
        passes: int = 0,
        seed: int = 0,
        dropout: float | None = None,
    ) -> np.ndarray:
        """Scores ``[n]`` (deterministic), or ``[passes, n]`` with dropout on when passes > 0."""
        import torch

        if len(conversations) != len(responses):
            raise ValueError(f"got {len(conversations)} conversations but {len(responses)} responses")
        if not 0 <= label < self.num_labels:
            raise ValueError(f"reward model '{self.name}' has {self.num_labels} label(s); label {label} does not exist")
        seqs = [self.token_ids(c, r) for c, r in zip(conversations, responses)]
        for i, s in enumerate(seqs):
            if len(s) > self.max_length:
                raise ValueError(
                    f"reward model '{self.name}': item {i} is {len(s)} tokens but the model takes "
                    f"{self.max_length}; shorten that item or set max_length"
                )
        runs = max(passes, 1)
        out = np.zeros((runs, len(seqs)), dtype=np.float64)
        if not seqs:
            return out if passes else out[0]
        stochastic = _stochastic(self.model, dropout) if passes else contextlib.nullcontext()
        rng = torch.random.fork_rng(devices=_rng_devices(self.device)) if passes else contextlib.nullcontext()
        with torch.inference_mode(), stochastic, rng:
            if passes:
                torch.manual_seed(seed)
            for batch, ids, mask, last in self._batches(seqs):
                for k in range(runs):
                    out[k, batch] = self._forward(ids, mask, last)[:, label].double().cpu().numpy()
        return out if passes else out[0]

    def dropout_rate(self, override: float | None = None) -> float:
        """The largest dropout probability a stochastic pass would use (0: passes agree)."""
        if override is not None:
            return override if _dropout_sites(self.model) else 0.0
        return max((getattr(m, a) for m, a in _dropout_sites(self.model)), default=0.0)

    def token_ids(self, conversation: Conversation, response: str) -> list[int]:
        """The conversation plus the response as the last assistant turn, in the RM's template."""
        messages = list(conversation) + [{"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # -- internals ------------------------------------------------------------------------
    def _batches(self, seqs: list[list[int]]) -> Iterator:
        torch = self._torch
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        pad = self.pad_id if self.pad_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(seqs[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            last = torch.zeros(len(batch), dtype=torch.long)
            for row, i in enumerate(batch):
                s = seqs[i]
                ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[row, :len(s)] = 1
                last[row] = _pooled_index(s, self.pad_id)
            yield batch, ids.to(self.device), mask.to(self.device), last.to(self.device)

    def _forward(self, ids, mask, last):
        torch = self._torch
        if not self.decoder:
            return self.model(input_ids=ids, attention_mask=mask).logits.float()
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        picked = hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return self.model.score(picked).float()


def _pooled_index(seq: list[int], pad_id: int | None) -> int:
    """The rightmost token that is not the pad id (what transformers pools on)."""
    if pad_id is None:
        return len(seq) - 1
    for k in range(len(seq) - 1, -1, -1):
        if seq[k] != pad_id:
            return k
    return 0


def _dropout_sites(model) -> list[tuple[object, str]]:
    """(module, attribute) of every dropout probability: nn.Dropout.p and float rates
    that attention modules apply functionally (``attention_dropout``, ``dropout``)."""
    import torch

    sites = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            sites.append((m, "p"))
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                sites.append((m, attr))
    return sites


@contextlib.contextmanager
def _stochastic(model, rate: float | None):
    """Dropout on (train mode), optionally at ``rate`` everywhere; restored on exit."""
    saved = []
    if rate is not None:
        if not 0 <= rate < 1:
            raise ValueError(f"dropout must be in [0, 1), got {rate}")
        for module, attr in _dropout_sites(model):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, float(rate))
    model.train()
    try:
        yield
    finally:
        model.eval()
        for module, attr, value in saved:
            setattr(module, attr, value)


def _rng_devices(device: str) -> list:
    if device.startswith("cuda"):
        import torch

        return [torch.device(device).index or 0]
    return []


def _context_length(config, tokenizer) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1 << 30 else 1 << 30
