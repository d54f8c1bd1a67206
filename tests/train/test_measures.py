"""Training measures what it claims: eval on unseen prompts, no dropout noise, one tokenizer."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from prefdata.train.config import config_from
from prefdata.train.data import DataError, load_examples, split_eval
from prefdata.train.trainer import load_policy, train

from train_data import pair_table
from test_trainer import cfg_for


def test_eval_split_never_shares_a_prompt_with_train():
    groups = [f"q{i // 3}" for i in range(60)]            # 20 prompts, 3 pairs each
    for seed in range(5):
        train_idx, eval_idx = split_eval(groups, 0.2, 256, seed)
        assert sorted(np.concatenate([train_idx, eval_idx])) == list(range(60))
        seen = {groups[i] for i in train_idx}
        assert not seen & {groups[i] for i in eval_idx}
        assert 12 <= len(eval_idx) <= 15                   # about 20%, whole prompts
    assert len(split_eval(["a"] * 10, 0.5, 256, 0)[1]) == 0  # one prompt: nothing to hold out


def test_the_trainer_splits_by_prompt_id(tiny_model, pairs_file, tmp_path):
    from transformers import AutoTokenizer

    t = pair_table(12)
    t = t.append_column("prompt_id", pa.array([f"q{i // 4}" for i in range(12)]))   # 3 prompts x 4 pairs
    path = pairs_file(table=t)
    ex = load_examples(path, AutoTokenizer.from_pretrained(tiny_model), 128)
    assert ex.groups == [f"q{i // 4}" for i in range(12)]
    train(cfg_for(path, tiny_model, tmp_path / "run", max_steps=1, eval_fraction=0.25))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["train_examples"], run["eval_examples"]) == (8, 4)         # one whole prompt held out


def _train_mode_outputs_differ(model) -> bool:
    model.train()
    ids = torch.arange(10, 40)[None]
    with torch.no_grad():
        return not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dropout_is_off_in_the_policy_unless_kept(tiny_llama_factory):
    path = tiny_llama_factory(0, attention_dropout=0.5)
    cfg = config_from({"data": "d", "model": path, "device": "cpu"})
    model, _ = load_policy(path, cfg, "cpu")
    assert not _train_mode_outputs_differ(model)
    cfg = config_from({"data": "d", "model": path, "device": "cpu", "keep_dropout": True})
    model, _ = load_policy(path, cfg, "cpu")
    assert _train_mode_outputs_differ(model)


def test_a_reference_with_another_tokenizer_is_an_error(tiny_model, pairs_file, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<prefdata_extra>"])
    tok.save_pretrained(other)
    with pytest.raises(DataError, match=r"different tokenizers \(e.g. '<prefdata_extra>'->\d+\)"):
        train(cfg_for(pairs_file(8), tiny_model, tmp_path / "run", max_steps=1, reference=str(other)))
