"""Step versions are enforced: each model-holding step's output on fixed inputs, with a tiny
random model, must equal the output stored for the step's current ``version``.

A step's ``version`` is part of its fingerprint, so a change that alters what a step
writes without bumping it would let old cached shards mix with new ones. The expected
outputs live in ``tests/golden/<step>.json``, one entry per version, as values (texts
exactly, floats within 1e-4), plus the run's counters (e.g. missing-judgment reasons).

Regenerate after a deliberate change (bump the version first):
``PREFDATA_UPDATE_GOLDEN=1 pytest tests/test_step_versions.py`` (or ``-k <step>``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pytest

from prefdata.models import clear_cache
from prefdata.step import Output
from prefdata.steps import step_class

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PREFDATA_UPDATE_GOLDEN", "").strip() not in ("", "0")
TOLERANCE = 1e-4
MODULES = {"sample": "sample", "score_cdr": "cdr", "score_rm": "reward", "score_flr": "flr",
           "score_gpm": "gpm", "judge_rubric": "judge", "judge_pairwise": "judge", "rationale": "rationale",
           "ches": "ches"}

PROMPTS = ["Name a fruit.", "How many legs does a spider have?"]
RESPONSES = [["An apple.", "Carrots are vegetables."], ["Eight legs.", "Six, I think."]]


def prompts() -> pa.Table:
    return pa.table({"prompt_id": ["p0", "p1"],
                     "prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})


def responses() -> pa.Table:
    rows = [(i, k) for i in range(len(PROMPTS)) for k in range(2)]
    return pa.table({
        "prompt_id": [f"p{i}" for i, _ in rows],
        "prompt": [[{"role": "user", "content": PROMPTS[i]}] for i, _ in rows],
        "response_id": [f"r{i}{k}" for i, k in rows],
        "response": [RESPONSES[i][k] for i, k in rows],
    })


def pairs() -> pa.Table:
    n = len(PROMPTS)
    return pa.table({
        "pair_id": [f"pair{i}" for i in range(n)],
        "prompt_id": [f"p{i}" for i in range(n)],
        "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
        "chosen": [[{"role": "assistant", "content": RESPONSES[i][0]}] for i in range(n)],
        "rejected": [[{"role": "assistant", "content": RESPONSES[i][1]}] for i in range(n)],
        "chosen_id": [f"r{i}0" for i in range(n)],
        "rejected_id": [f"r{i}1" for i in range(n)],
    })


# step name -> (config, input table); models are named by relative paths (see ``models``)
# so that ids and the ``generator`` column do not depend on where pytest puts temp files.
CASES = {
    "sample": (dict(model="tiny-lm", n=2, max_new_tokens=8, temperature=1.0, seed=3,
                    backend="transformers", device="cpu"), prompts),
    "score_cdr": (dict(strong="tiny-lm", weak="tiny-lm-2", device="cpu", backend="transformers"), responses),
    "score_rm": (dict(model="tiny-rm", device="cpu"), responses),
    "score_flr": (dict(model="tiny-lm", device="cpu", backend="transformers"), responses),
    "score_gpm": (dict(model="tiny-gpm", device="cpu"), responses),
    "judge_rubric": (dict(model="tiny-lm", max_new_tokens=16, max_attempts=2, backend="transformers",
                          device="cpu"), responses),
    "judge_pairwise": (dict(model="tiny-lm", max_new_tokens=16, max_attempts=2, backend="transformers",
                            device="cpu"), pairs),
    "rationale": (dict(model="tiny-lm", max_new_tokens=16, retries=1, backend="transformers",
                       device="cpu"), pairs),
    "ches": (dict(model="tiny-lm", device="cpu"), pairs),
}


@pytest.fixture(scope="module")
def models(tiny_llama_factory, tmp_path_factory):
    """A folder holding ``tiny-lm``, ``tiny-lm-2``, ``tiny-rm`` (links to session models) and
    ``tiny-gpm``; the tests run with it as the working directory."""
    folder = tmp_path_factory.mktemp("golden-models")
    made = {"tiny-lm": tiny_llama_factory(0), "tiny-lm-2": tiny_llama_factory(1),
            "tiny-rm": tiny_llama_factory(2, head="sequence_classification")}
    for name, path in made.items():
        (folder / name).symlink_to(path, target_is_directory=True)
    made["tiny-gpm"] = tiny_gpm(folder / "tiny-gpm", backbone="tiny-lm")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield {name: Path(path) for name, path in made.items()}
    clear_cache()


def tiny_gpm(path: Path, backbone: str) -> str:
    """A GPM folder (random head, seed 5) over the ``backbone`` tiny Llama, as train-rm writes it."""
    import torch

    from prefdata.prefmodel.heads import GPMHead
    from prefdata.prefmodel.io import save_gpm

    torch.manual_seed(5)
    save_gpm(path, GPMHead(64, dim=4), {"backbone": backbone, "tau": 0.1})
    return str(path)


def run_step(name: str) -> dict:
    """setup → process → teardown on the fixed input; the output as plain values."""
    import torch

    config, make_input = CASES[name]
    step = step_class(name)(**config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order: the same floats on any core count
    try:
        step.setup()
        result = step.process(make_input())
    finally:
        step.teardown()
        torch.set_num_threads(threads)
    out = result if isinstance(result, Output) else Output(result)
    return {
        "columns": out.table.column_names,
        "rows": out.table.to_pylist(),
        "counts": dict(sorted(out.counts.items())),
        "quarantine": out.quarantine.to_pylist() if out.quarantine is not None else None,
    }


def weights_digest(paths) -> dict:
    """sha256 of each tiny model's weights: tells a changed step from a changed test model."""
    out = {}
    for name, path in sorted(paths.items()):
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            h.update(f.read_bytes())
        out[name] = h.hexdigest()[:16]
    return out


def differences(expected, actual, where: str = "") -> list[str]:
    """Where two plain values differ: texts exactly, floats within ``TOLERANCE``."""
    if isinstance(expected, float) or isinstance(actual, float):
        if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and not (
                isinstance(expected, bool) or isinstance(actual, bool)):
            if math.isnan(expected) and math.isnan(actual):
                return []
            if math.isclose(expected, actual, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
                return []
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if sorted(expected) != sorted(actual):
            return [f"{where}: keys {sorted(expected)} != {sorted(actual)}"]
        return [d for k in expected for d in differences(expected[k], actual[k], f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items expected, got {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{where}[{i}]")]
    return [] if expected == actual else [f"{where}: expected {expected!r}, got {actual!r}"]


def check_golden(step_name: str, version: str, stored: dict, actual: dict, weights: dict) -> str | None:
    """None when ``actual`` matches the stored entry of ``version``, else what to do."""
    module = MODULES.get(step_name, step_name)
    entry = stored.get("entries", {}).get(version)
    if entry is None:
        return (f"step {step_name} has no golden output for version {version!r} "
                f"(tests/golden/{step_name}.json); regenerate with "
                f"PREFDATA_UPDATE_GOLDEN=1 pytest tests/test_step_versions.py -k {step_name}")
    if any(weights.get(name) != digest for name, digest in entry.get("weights", {}).items()):
        return (f"the tiny test models differ from those the golden output of {step_name} was "
                f"recorded with ({entry['weights']} != {weights}; torch or transformers changed?): "
                "the step may be fine; regenerate with PREFDATA_UPDATE_GOLDEN=1 after checking")
    diffs = differences({k: entry[k] for k in ("columns", "rows", "counts", "quarantine")}, actual)
    if not diffs:
        return None
    shown = "\n  ".join(diffs[:8]) + (f"\n  ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
    return (f"step {step_name} output changed without bumping its version "
            f"(prefdata/steps/{module}.py `version`, now {version!r}); bump it and regenerate with "
            f"PREFDATA_UPDATE_GOLDEN=1 pytest tests/test_step_versions.py -k {step_name}\n  {shown}")


def write_golden(path: Path, step_name: str, version: str, actual: dict, weights: dict) -> None:
    import torch
    import transformers

    stored = json.loads(path.read_text()) if path.is_file() else {"step": step_name, "entries": {}}
    stored["entries"][version] = {
        "weights": weights, "torch": torch.__version__, "transformers": transformers.__version__,
        **actual,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1, ensure_ascii=False, sort_keys=False) + "\n")
    tmp.replace(path)


@pytest.mark.parametrize("step_name", sorted(CASES))
def test_step_output_matches_its_version(step_name, models):
    version = step_class(step_name).version
    actual = json.loads(json.dumps(run_step(step_name)))  # the JSON round trip the file takes
    weights = weights_digest(models)
    path = GOLDEN / f"{step_name}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        write_golden(path, step_name, version, actual, weights)
        return
    stored = json.loads(path.read_text()) if path.is_file() else {}
    problem = check_golden(step_name, version, stored, actual, weights)
    assert problem is None, problem


def test_every_model_holding_step_has_a_case():
    """Every map step that runs a model; global steps that train one (train, train_rm) are
    checked by the trainer's own tests (exact resume, fixed-seed losses), not here."""
    from prefdata.step import MapStep, Step
    from prefdata.steps import STEPS

    holding = {name for name in STEPS if step_class(name).models is not Step.models
               and issubclass(step_class(name), MapStep)}
    assert holding <= set(CASES), f"add golden cases for {sorted(holding - set(CASES))}"


def test_a_step_that_loads_a_model_declares_it():
    """``models()`` feeds the fingerprint and the worker-process decision: a step that loads
    weights without declaring them would cache across model changes."""
    import inspect
    import re

    from prefdata.step import Step
    from prefdata.steps import STEPS

    undeclared = [name for name in STEPS
                  if re.search(r"load_(reward_)?model\(|from_pretrained\(", inspect.getsource(step_class(name)))
                  and step_class(name).models is Step.models]
    assert not undeclared, f"steps {undeclared} load models but do not override Step.models()"


# -- the checker itself, on literal values ---------------------------------------------------
ENTRY = {"columns": ["x", "s"], "rows": [{"x": 1.0, "s": "a"}], "counts": {"n": 1}, "quarantine": None}


def test_same_version_changed_output_fails_with_what_to_do():
    actual = {**ENTRY, "rows": [{"x": 1.5, "s": "a"}]}
    problem = check_golden("ches", "2", {"entries": {"2": ENTRY}}, actual, {})
    assert "step ches output changed without bumping its version" in problem
    assert "prefdata/steps/ches.py" in problem and "PREFDATA_UPDATE_GOLDEN=1" in problem
    assert "[0].x: expected 1.0, got 1.5" in problem


def test_float_noise_below_tolerance_passes_and_texts_compare_exactly():
    assert check_golden("ches", "2", {"entries": {"2": ENTRY}},
                        {**ENTRY, "rows": [{"x": 1.0 + 1e-6, "s": "a"}]}, {}) is None
    assert check_golden("ches", "2", {"entries": {"2": ENTRY}},
                        {**ENTRY, "rows": [{"x": 1.0, "s": "a "}]}, {}) is not None
    assert check_golden("ches", "2", {"entries": {"2": ENTRY}},
                        {**ENTRY, "counts": {"n": 2}}, {}) is not None


def test_a_version_without_an_entry_asks_to_regenerate():
    problem = check_golden("sample", "3", {"entries": {"2": ENTRY}}, ENTRY, {})
    assert "no golden output for version '3'" in problem and "PREFDATA_UPDATE_GOLDEN=1" in problem
