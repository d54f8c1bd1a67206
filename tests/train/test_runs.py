"""A run folder belongs to one run: resume checks identity, new runs do not mix in, rotation is safe."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from prefdata.train.checkpoints import rotate
from prefdata.train.config import config_from
from prefdata.train.trainer import main, train

from test_trainer import cfg_for


def one_step(data, model, out, **over):
    return train(cfg_for(data, model, out, max_steps=1, eval_fraction=0.0, **over))


def test_resume_refuses_other_data_naming_the_fingerprint(tiny_model, pairs_file, tmp_path):
    out = tmp_path / "run"
    data = pairs_file(8, seed=1)
    one_step(data, tiny_model, out)
    shutil.copy(pairs_file(8, seed=2), data)                 # same path, other pairs
    with pytest.raises(ValueError, match=r"the data fingerprint .* differs: checkpoint '\w+', now '\w+'"):
        train(cfg_for(data, tiny_model, out, max_steps=1, eval_fraction=0.0), resume=True)


def test_resume_refuses_changed_policy_or_reference_weights(tiny_model, tiny_llama_factory, pairs_file, tmp_path):
    model = tmp_path / "policy"
    shutil.copytree(tiny_model, model)
    data, out = pairs_file(8), tmp_path / "run"
    reference = tiny_llama_factory(1)
    one_step(data, str(model), out, reference=reference)
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01                        # same name, same config, other weights
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the policy model identity \(.*policy\) differs") as err:
        train(cfg_for(data, str(model), out, max_steps=1, eval_fraction=0.0, reference=reference), resume=True)
    assert "reference model identity" not in str(err.value)
    with pytest.raises(ValueError, match=r"the reference model identity \(.*\) differs"):
        train(cfg_for(data, str(model), out, max_steps=1, eval_fraction=0.0, reference=tiny_model), resume=True)


def test_a_new_run_refuses_a_folder_with_checkpoints_unless_overwrite(tiny_model, pairs_file, tmp_path, capsys):
    data, out = pairs_file(8), tmp_path / "run"
    one_step(data, tiny_model, out)
    with pytest.raises(ValueError, match=r"holds checkpoints of another run .*--resume.*--overwrite"):
        one_step(data, tiny_model, out, lr=1e-3)
    args = ["--data", data, "--model", tiny_model, "--output", str(out), "--set", "device=cpu",
            "--set", "max_steps=2", "--set", "eval_fraction=0.0", "--set", "max_length=128"]
    assert main(args) == 2 and "holds checkpoints of another run" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert main(args + ["--overwrite", "--resume"]) == 2


def test_rotation_keeps_the_newest_of_this_run_and_leaves_others_alone(tmp_path):
    folder = tmp_path / "checkpoints"

    def ckpt(step, run_id):
        d = folder / f"step-{step:07d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
        return d

    foreign = ckpt(100, "other")            # a higher step number than anything of this run
    mine = [ckpt(s, "me") for s in (5, 10, 15)]
    rotate(folder, "me", keep=1, newest=mine[-1])
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000015", "step-0000100"]
    assert foreign.exists()
    ckpt(20, "me")
    rotate(folder, "me", keep=2, newest=folder / "step-0000020")
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000015", "step-0000020", "step-0000100"]


@pytest.mark.parametrize("setting,message", [
    ({"keep_checkpoints": 0}, "'keep_checkpoints' must be >= 1"),
    ({"log_every": 0}, "'log_every' must be >= 1"),
    ({"eval_every": -1}, "'eval_every' must be >= 0"),
    ({"lr": 0.0}, "'lr' must be > 0"),
    ({"epochs": 0}, "'epochs' must be > 0"),
    ({"warmup_ratio": 1.0}, "'warmup_ratio' must be in"),
    ({"adam_beta2": 1.0}, "'adam_beta2' must be in"),
    ({"max_grad_norm": -1.0}, "'max_grad_norm' must be >= 0"),
    ({"rdpo_eps": "sometimes"}, "'rdpo_eps' must be one of"),
    ({"rdpo_eps": 0.46}, "'rdpo_eps' must be in"),
])
def test_impossible_settings_fail_at_start(setting, message):
    with pytest.raises(ValueError, match=message):
        config_from({"data": "d.parquet", "model": "m", **setting})


def test_a_resumed_run_keeps_its_run_id_and_the_newest_checkpoint(tiny_model, pairs_file, tmp_path):
    data, out = pairs_file(12), tmp_path / "run"
    common = dict(max_steps=4, save_every=1, keep_checkpoints=1, eval_fraction=0.0, batch_size=2, micro_batch_size=2)
    train(cfg_for(data, tiny_model, out, **common), stop_after=2)
    run_id = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())["run_id"]
    train(cfg_for(data, tiny_model, out, **common), resume=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["run_id"] == run_id and set(state["identity"]) >= {"data_fingerprint", "policy_model",
                                                                    "reference_model"}
    assert (out / "checkpoints" / "step-0000004" / "model.safetensors").stat().st_size > 0
