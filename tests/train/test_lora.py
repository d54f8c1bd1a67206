"""LoRA adapters: the base stays frozen (it is the reference), checkpoints hold the adapter,
resume is exact, and the saved adapter loads with peft."""

import numpy as np
import pytest
import torch

from prefdata.train.trainer import train

from test_trainer import cfg_for, log_rows

peft = pytest.importorskip("peft")


def test_lora_trains_an_adapter_that_peft_loads(tiny_model, pairs_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = pairs_file(16)
    common = dict(lora_r=4, lora_alpha=8.0, lr=5e-3, max_steps=4, save_every=2, eval_fraction=0.0, batch_size=4,
                  micro_batch_size=2)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(cfg_for(data, tiny_model, full, **common))
    rows = log_rows(full)
    assert rows[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)   # adapter starts at 0: policy = base = reference
    assert rows[-1]["loss"] < rows[0]["loss"]
    # checkpoints hold the adapter only (and resume from it exactly)
    ckpt = load_file(full / "checkpoints" / "step-0000004" / "model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)
    train(cfg_for(data, tiny_model, crashed, **common), stop_after=3)
    train(cfg_for(data, tiny_model, crashed, **common), resume=True)
    assert [r["loss"] for r in log_rows(crashed)][2:] == [r["loss"] for r in rows][2:]
    # the final folder is a peft adapter over the untouched base
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tuned = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(full)).eval()
    ids = torch.arange(20, 50)[None]
    with torch.no_grad():
        changed = (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item()
        with tuned.disable_adapter():
            same = (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item()
    assert changed > 1e-3 and same == 0.0
