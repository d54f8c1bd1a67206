"""LoRA adapters (``peft``): train a low-rank update, keep the base weights frozen.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. The
reference is the base model without the adapter — the same weights, so no second copy is
ever loaded: reference log-probs are computed from the base before the adapter is added
(and cached, as for full fine-tuning). Checkpoints hold only the trainable (adapter)
weights and their optimizer state; the final folder is a ``peft`` adapter that loads with
``PeftModel.from_pretrained(base, folder)`` or ``AutoPeftModelForCausalLM``.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def require_peft():
    try:
        import peft
    except ImportError:
        raise ValueError("lora_r > 0 needs the peft package: pip install 'prefdata[peft]'") from None
    return peft


def add_lora(model, cfg):
    """Wrap ``model`` with a fresh LoRA adapter (B = 0, so it starts equal to the base)."""
    peft = require_peft()
    targets = cfg.lora_target_modules or "all-linear"
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=targets, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("lora: r=%d, alpha=%g on %s: %d trainable parameters of %d (%.2f%%)", cfg.lora_r, cfg.lora_alpha,
             targets, trainable, total, 100 * trainable / total)
    return wrapped


def backbone(model):
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model
