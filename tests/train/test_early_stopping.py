"""Early stopping in the trainer, run for real on a tiny Llama: the eval margin rises while the
curriculum's first iteration trains (chosen = GOOD) and falls during the second (the same
kind of pairs, labels reversed), so training must stop ``patience`` evals after the peak and
the final model must be the peak's checkpoint — also after a crash and a resume."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdata.schema import MESSAGES
from prefdata.train.config import config_from
from prefdata.train.data import split_eval
from prefdata.train.trainer import train

from train_data import GOOD

COMMON = dict(lr=2e-3, batch_size=4, micro_batch_size=4, ref_batch_size=8, eval_fraction=0.25, eval_every=1,
              save_every=0, keep_checkpoints=1, warmup_ratio=0.0, device="cpu", max_length=128, max_steps=8,
              order="curriculum", early_stopping={"metric": "margin", "patience": 2, "mode": "max"})


def rise_then_fall(path, n: int = 40, seed: int = 0) -> str:
    """Pairs whose eval prompts (the trainer's own split) prefer GOOD; training rows prefer
    GOOD in curriculum iteration 0 and the random words in iteration 1."""
    rng = random.Random(seed)
    words = "apple river stone cloud seven blue quick lamp orange window paper green".split()
    ids = [f"q{i}" for i in range(n)]
    _, eval_idx = split_eval(ids, COMMON["eval_fraction"], 256, 0)
    held_out = set(eval_idx.tolist())
    rows = {"prompt_id": ids, "prompt": [], "chosen": [], "rejected": [], "iteration": [], "curriculum_order": []}
    seen = 0
    for i in range(n):
        bad = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        reverse = i not in held_out and seen >= (n - len(held_out)) // 2
        seen += i not in held_out
        rows["prompt"].append([{"role": "user", "content": f"Question {i}: {rng.choice(words)}?"}])
        good, worse = (bad, GOOD) if reverse else (GOOD, bad)
        rows["chosen"].append([{"role": "assistant", "content": good}])
        rows["rejected"].append([{"role": "assistant", "content": worse}])
        rows["iteration"].append(int(reverse))
        rows["curriculum_order"].append(i)
    types = {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()}), path)
    return str(path)


def evals(out) -> dict:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/margin"] for r in rows if "eval/margin" in r}


def weights(path) -> dict:
    """Every tensor by name, however the tied embedding was named when saved: a checkpoint
    file is loaded into the model as the trainer does, a model folder as transformers does."""
    from transformers import AutoModelForCausalLM

    from prefdata.train.checkpoints import load_weights

    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path).state_dict()
    model = AutoModelForCausalLM.from_pretrained(path.parents[2])  # run folder = a saved model after the run
    load_weights(model, path)
    return model.state_dict()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return rise_then_fall(tmp_path_factory.mktemp("es") / "pairs.parquet")


def test_training_stops_patience_evals_after_the_best_and_keeps_it(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    summary = train(config_from(dict(data=data, model=tiny_model, output=str(out), **COMMON)))
    margin = evals(out)
    best = summary["best_step"]
    # the metric rose, then fell: the best is inside the run and training stopped 2 evals later
    assert summary["early_stopped"] is True and 1 <= best < summary["step"] == best + 2 < 8
    assert margin[best] == summary["best_value"] == max(v for s, v in margin.items() if s > 0)
    assert margin[best] > margin[0] and margin[best + 1] <= margin[best] and margin[best + 2] <= margin[best]
    assert max(margin) == best + 2                                  # no eval after the stop
    # rotation (keep_checkpoints=1) kept the best checkpoint beside the newest
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{best:07d}", f"step-{best + 2:07d}"]
    # the final model is the best checkpoint's weights, not the last step's
    final = weights(out)
    assert same(final, weights(out / "checkpoints" / f"step-{best:07d}" / "model.safetensors"))
    assert not same(final, weights(out / "checkpoints" / f"step-{best + 2:07d}" / "model.safetensors"))
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["best_step"] == best and last["best_metric"] == "eval/margin"


def test_a_crash_after_the_best_resumes_to_the_same_decision_and_model(tiny_model, data, tmp_path):
    cfg = lambda out: config_from(dict(data=data, model=tiny_model, output=str(out), **COMMON))  # noqa: E731
    full = train(cfg(tmp_path / "full"))
    crashed = tmp_path / "crashed"
    train(cfg(crashed), stop_after=full["best_step"] + 1)  # one eval without improvement, then "killed"
    # only the best step was saved (save_every=0): the resume replays the step after it
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == [f"step-{full['best_step']:07d}"]
    state = json.loads((crashed / "checkpoints" / f"step-{full['best_step']:07d}" / "state.json").read_text())
    assert state["early_stopping"]["best_step"] == full["best_step"] and state["early_stopping"]["bad_evals"] == 0
    resumed = train(cfg(crashed), resume=True)
    assert (resumed["step"], resumed["best_step"], resumed["best_value"]) == (full["step"], full["best_step"],
                                                                               full["best_value"])
    assert same(weights(crashed), weights(tmp_path / "full"))


def test_without_early_stopping_the_same_run_trains_to_the_end(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    summary = train(config_from(dict(data=data, model=tiny_model, output=str(out),
                                     **{**COMMON, "early_stopping": None})))
    assert summary["step"] == 8 and "best_step" not in summary
    margin = evals(out)
    assert margin[8] < max(margin.values())  # what early stopping avoided: the last model is worse


@pytest.mark.parametrize("change, message", [
    ({"early_stopping": {"metric": "accuracy"}}, r"metric one of \['loss'"),
    ({"early_stopping": {"metric": "margin", "patience": 0}}, "patience' must be an integer >= 1"),
    ({"early_stopping": {"metric": "margin", "mode": "up"}}, "mode' must be min or max"),
    ({"eval_fraction": 0.0}, "needs eval pairs: set 'eval_fraction' > 0"),
    ({"eval_every": 0}, "needs evals during training: set 'eval_every' >= 1"),
])
def test_bad_early_stopping_settings_are_refused_before_loading(change, message):
    values = dict(data="d.parquet", model="m", **COMMON)
    values.update(change)
    with pytest.raises(ValueError, match=message):
        config_from(values)


def test_loss_defaults_to_lower_is_better():
    from prefdata.train.early_stopping import EarlyStopping

    stopper = EarlyStopping.from_config({"metric": "eval/loss", "patience": 1})
    assert stopper.mode == "min"
    assert stopper.update(1, {"eval/loss": 0.7}) and stopper.update(2, {"eval/loss": 0.6})
    assert not stopper.update(3, {"eval/loss": 0.65}) and stopper.stopped and stopper.best_step == 2


def test_the_train_step_reports_and_keeps_the_best_step(tiny_model, data, tmp_path):
    """In a recipe the policy is ``<step dir>/model``: the best eval's weights, and the round
    report's eval metrics are that eval's, not the last one's."""
    import polars as pl

    from prefdata.steps.train import Train, model_dir

    options = {k: v for k, v in COMMON.items() if k != "device"}
    step = Train(model=tiny_model, device="cpu", **options)
    step.bind_output_dir(tmp_path)
    step.process(pl.read_parquet(data).lazy())
    meta = step.metadata
    margin = evals(model_dir(tmp_path))
    assert meta["early_stopped"] is True and meta["train_steps"] == meta["best_step"] + 2
    assert meta["eval_margin"] == meta["best_value"] == margin[meta["best_step"]] != margin[meta["train_steps"]]
    ckpt = model_dir(tmp_path) / "checkpoints" / f"step-{meta['best_step']:07d}" / "model.safetensors"
    assert same(weights(model_dir(tmp_path)), weights(ckpt))
