"""The training loop on a tiny random Llama: learning, exact resume, the reference cache, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata.schema import MESSAGES
from prefdata.train import reference
from prefdata.train.config import config_from
from prefdata.train.data import DataError
from prefdata.train.trainer import main, train


def cfg_for(data, model, output, **over):
    values = dict(data=data, model=model, output=str(output), lr=2e-3, batch_size=4, micro_batch_size=4,
                  ref_batch_size=8, eval_fraction=0.25, eval_every=0, save_every=0, warmup_ratio=0.1,
                  device="cpu", max_length=128)
    values.update(over)
    return config_from(values)


def log_rows(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_thirty_steps_lower_loss_and_raise_reward_accuracy(tiny_model, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(cfg_for(pairs_file(32), tiny_model, out, max_steps=30, eval_every=15))
    rows = log_rows(out)
    evals = [r for r in rows if "eval/loss" in r]
    steps = [r for r in rows if "loss" in r]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1
    assert evals[0]["eval/reward_accuracy"] == 0.0 and evals[-1]["eval/reward_accuracy"] >= 0.75
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5])
    assert "eval/chosen_logp_change" in evals[-1]                      # the displacement monitor
    assert AutoModelForCausalLM.from_pretrained(out) is not None        # final model loads as is


def test_resume_after_a_crash_gives_the_same_next_loss(tiny_model, pairs_file, tmp_path):
    data = pairs_file(24)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    common = dict(max_steps=6, save_every=3, batch_size=2, micro_batch_size=1, grad_accum=2, eval_fraction=0.0)
    train(cfg_for(data, tiny_model, full, **common))
    train(cfg_for(data, tiny_model, crashed, **common), stop_after=4)   # checkpoint at 3, "killed" in step 4
    assert [p.name for p in (crashed / "checkpoints").iterdir()] == ["step-0000003"]
    summary = train(cfg_for(data, tiny_model, crashed, **common), resume=True)
    assert summary["step"] == 6
    want = {r["step"]: r["loss"] for r in log_rows(full)}
    got = {r["step"]: r["loss"] for r in log_rows(crashed)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]                            # step 4 of the crash was dropped
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]  # exactly, not approximately


def test_resume_refuses_changed_settings(tiny_model, pairs_file, tmp_path):
    data = pairs_file(8)
    train(cfg_for(data, tiny_model, tmp_path / "r", max_steps=1, eval_fraction=0.0))
    with pytest.raises(ValueError, match=r"setting lr changed: 0.002 -> 0.0001"):
        train(cfg_for(data, tiny_model, tmp_path / "r", max_steps=1, eval_fraction=0.0, lr=1e-4), resume=True)
    # a longer run would reshape the cosine schedule: refused, not silently continued
    with pytest.raises(ValueError, match=r"setting max_steps changed: 1 -> 2 \(the learning-rate schedule"):
        train(cfg_for(data, tiny_model, tmp_path / "r", max_steps=2, eval_fraction=0.0), resume=True)


def test_reference_cache_is_reused(tiny_model, pairs_file, tmp_path):
    data = pairs_file(12, seed=7)
    before = reference.FORWARDS["count"]
    first = train(cfg_for(data, tiny_model, tmp_path / "a", max_steps=1, eval_fraction=0.0))
    computed = reference.FORWARDS["count"]
    second = train(cfg_for(data, tiny_model, tmp_path / "b", max_steps=1, eval_fraction=0.0))
    assert first["reference_cache"] == "miss" and computed > before
    assert second["reference_cache"] == "hit" and reference.FORWARDS["count"] == computed
    # a different max_length changes the tokens, hence the key
    third = train(cfg_for(data, tiny_model, tmp_path / "c", max_steps=1, eval_fraction=0.0, max_prompt_length=32))
    assert third["reference_cache"] == "miss"


def logsig(x):
    return -np.logaddexp(0.0, -x)


def test_first_step_loss_of_every_loss_is_its_value_on_the_data(tiny_model, pairs_file, tmp_path):
    """Step 1's logged loss (before any update: policy = reference) against each formula on
    log-probs computed here by ordinary forwards."""
    from train_data import direct_logps

    data = pairs_file(8)
    lp, n = direct_logps(tiny_model, data)
    c, r, nc, nr = lp[:, 0], lp[:, 1], n[:, 0], n[:, 1]
    beta, alpha, sb, sg, w = 0.1, 1.0, 2.0, 0.5, 0.05
    rc, rr = c / nc, r / nr
    expected = {
        "dpo": np.log(2), "cdpo": np.log(2), "rdpo": np.log(2),   # h = 0 at step 1
        "ipo": (1 / (2 * beta)) ** 2,
        "rpo": np.log(2) + alpha * np.mean(-c / nc),
        "simpo": np.mean(-logsig(sb * (rc - rr) - sg)),
        "pro": np.mean(-(rc - np.logaddexp(rc, rr)) + w * (-c / nc)),   # scores 1, 0: 1/T = 1
    }
    for loss, want in expected.items():
        out = tmp_path / loss
        train(cfg_for(data, tiny_model, out, loss=loss, max_steps=1, eval_fraction=0.0, batch_size=8,
                      rdpo_eps=0.2, beta=beta, rpo_alpha=alpha, simpo_beta=sb, simpo_gamma=sg, pro_sft_weight=w))
        assert log_rows(out)[-1]["loss"] == pytest.approx(want, rel=1e-4), loss


def test_pro_trains_on_lists_and_lists_need_a_list_loss(tiny_model, tmp_path):
    lists = pa.table({
        "prompt": pa.array([[{"role": "user", "content": f"q{i}"}] for i in range(6)], MESSAGES),
        "responses": pa.array([[{"role": "assistant", "content": t} for t in ["best", "ok", "bad"][: 2 + i % 2]]
                               for i in range(6)], MESSAGES),
        "scores": [[2.0, 1.0, 0.0][: 2 + i % 2] for i in range(6)],
    })
    path = tmp_path / "lists.parquet"
    pq.write_table(lists, path)
    train(cfg_for(str(path), tiny_model, tmp_path / "pro-lists", loss="pro", max_steps=2, eval_fraction=0.0))
    assert [r["step"] for r in log_rows(tmp_path / "pro-lists")] == [1, 2]
    with pytest.raises(DataError, match="ranked lists"):
        train(cfg_for(str(path), tiny_model, tmp_path / "dpo-lists", max_steps=1))


def _table_without(column, rows=4):
    from train_data import pair_table

    t = pair_table(rows)
    return t.drop_columns([column])


def test_bad_data_gives_clear_errors(tiny_model, pairs_file, tmp_path, capsys):
    from train_data import pair_table

    base = ["--model", tiny_model, "--output", str(tmp_path / "bad"), "--set", "device=cpu"]
    # missing column
    path = pairs_file(table=_table_without("rejected"))
    assert main(["--data", path] + base) == 2
    assert "missing column(s) ['rejected']" in capsys.readouterr().err
    # empty chosen
    t = pair_table(4)
    chosen = t.column("chosen").to_pylist()
    chosen[2] = []
    path = pairs_file(n=5, table=t.set_column(t.column_names.index("chosen"), "chosen", pa.array(chosen, MESSAGES)))
    assert main(["--data", path] + base) == 2
    assert "row 2 (pair_id=p2): 'chosen' is empty" in capsys.readouterr().err
    # prompt longer than max_length
    path = pairs_file(6)
    assert main(["--data", path, "--set", "max_length=20"] + base) == 2
    err = capsys.readouterr().err
    assert "leave no room for a response within max_length=20" in err and "max_prompt_length" in err
    # rdpo: no dataset ε in the file's metadata; per_pair without flip_prob
    path = pairs_file(n=7, flip_prob=False)
    assert main(["--data", path, "--loss", "rdpo"] + base) == 2
    err = capsys.readouterr().err
    assert "rdpo_eps: dataset needs the noise step's ε" in err and "prefdata_step:noise" in err
    assert main(["--data", path, "--loss", "rdpo", "--set", "rdpo_eps=per_pair"] + base) == 2
    assert "needs a complete 'flip_prob' column" in capsys.readouterr().err


def test_truncation_keeps_prompt_end_and_counts(tiny_model, pairs_file):
    from transformers import AutoTokenizer

    from prefdata.train.data import load_examples

    tok = AutoTokenizer.from_pretrained(tiny_model)
    full = load_examples(pairs_file(6), tok, max_length=512)
    cut = load_examples(pairs_file(6), tok, max_length=24, max_prompt_length=16)
    assert cut.stats["prompts_truncated"] == 6 and cut.stats["responses_truncated"] > 0
    for a, b in zip(full.prompts, cut.prompts):
        assert b == a[-16:]                                   # the prompt's end is kept
    for a, b in zip(full.responses, cut.responses):
        assert all(y == x[: len(y)] and len(y) <= 8 for x, y in zip(a, b))   # responses keep their start


def test_cli_is_strict_and_reads_yaml(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  data: d.parquet\n  model: m\n  lr: 1e-5\n  bogus: 1\n")
    assert main(["--config", str(recipe)]) == 2
    assert "unknown option(s) ['bogus']" in capsys.readouterr().err
    recipe.write_text("data: d.parquet\nmodel: m\nlr: 1e-5\n")
    assert main(["--config", str(recipe), "--set", "batch_size=two"]) == 2
    assert "batch_size" in capsys.readouterr().err
    cfg = config_from({"data": "d", "model": "m", "lr": "1e-5", "max_steps": 3})
    assert cfg.lr == 1e-5 and cfg.max_steps == 3
    with pytest.raises(ValueError, match="not one of"):
        config_from({"data": "d", "model": "m", "loss": "kto"})


def test_bf16_checkpointing_and_micro_batches(tiny_model, pairs_file, tmp_path):
    out = tmp_path / "bf16"
    train(cfg_for(pairs_file(8), tiny_model, out, max_steps=2, precision="bf16", gradient_checkpointing=True,
                  micro_batch_size=2, grad_accum=2, eval_fraction=0.25, attn_implementation="eager"))
    rows = log_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert rows[1]["loss"] == pytest.approx(np.log(2), abs=0.02)        # step 1: policy = reference, bf16 noise


def test_push_to_hub_without_a_token_or_a_network_is_a_clear_error(tiny_model, pairs_file, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "run"
    args = ["--data", pairs_file(6), "--model", tiny_model, "--output", str(out), "--set", "device=cpu",
            "--set", "max_steps=1", "--set", "eval_fraction=0.0", "--set", "max_length=128",
            "--push-to-hub", "me/tiny-dpo"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub needs HF_TOKEN" in err and f"the model is saved in {out}" in err
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_0123456789")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens: offline
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from prefdata.train.publish import push_model

    with pytest.raises(ValueError, match=r"could not push .* to the Hub repo me/tiny-dpo .*huggingface-cli upload") as e:
        push_model(out, "me/tiny-dpo")
    assert "hf_not_a_real_token" not in str(e.value)
