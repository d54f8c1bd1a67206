"""rationale: degenerate outputs are retried, then recorded as missing; a real tiny judge runs."""

from __future__ import annotations

import pyarrow as pa
import pytest

from prefdata.models import clear_cache
from prefdata.steps.rationale import Rationale, RationaleConfig, degenerate, write_rationales

CHOSEN = "Paris is the capital of France and its largest city."
REJECTED = "The capital of France is Lyon."


def pair_table(n: int) -> pa.Table:
    return pa.table({
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt": [[{"role": "user", "content": f"What is the capital of France? ({i})"}] for i in range(n)],
        "chosen": [[{"role": "assistant", "content": CHOSEN}]] * n,
        "rejected": [[{"role": "assistant", "content": REJECTED}]] * n,
    })


class ScriptedJudge:
    """Answers each call from a script: {pair index: [first attempt, retry 1, ...]}."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, conversations, n, sampling):
        self.calls.append((len(conversations), sampling))
        out = []
        for conv in conversations:
            index = int(conv[-1]["content"].split("(")[1].split(")")[0])
            attempt = len(self.calls) - 1
            answers = self.script[index]
            out.append([answers[min(attempt, len(answers) - 1)]])
        return out


def test_degenerate_outputs_are_retried_then_recorded_missing():
    judge = ScriptedJudge({
        0: ["A names the right city; B is wrong."],
        1: ["", "A is correct while B names the wrong city."],  # empty, then fine
        2: [CHOSEN, "x" * 700, "   "],  # repeats the answer, too long, empty: missing
    })
    cfg = RationaleConfig(retries=2, max_chars=600)
    rationales, counts = write_rationales(judge, pair_table(3), cfg)
    assert rationales == ["A names the right city; B is wrong.", "A is correct while B names the wrong city.", None]
    assert counts == {"rationale_retries": 3, "rationales": 2, "rationale_missing": 1,
                      "rationale_missing_empty": 1}
    assert [n for n, _ in judge.calls] == [3, 2, 1]  # only the degenerate ones go again
    first, retry = judge.calls[0][1], judge.calls[1][1]
    assert first.temperature == 0.0 and retry.temperature == 0.7 and retry.seed != first.seed


def test_prompt_template_is_configurable_and_checked():
    seen = []

    class Recorder:
        def generate(self, conversations, n, sampling):
            seen.extend(conversations)
            return [["Because it is right and the other is not."] for _ in conversations]

    cfg = RationaleConfig(system=None, template="Q: {prompt}\nGood: {chosen}\nBad: {rejected}\nWhy?")
    write_rationales(Recorder(), pair_table(1), cfg)
    assert seen == [[{"role": "user", "content":
                      f"Q: What is the capital of France? (0)\nGood: {CHOSEN}\nBad: {REJECTED}\nWhy?"}]]
    with pytest.raises(ValueError, match="unknown field"):
        Rationale(template="{chosen} {rejected} {answer}")
    with pytest.raises(ValueError, match="must include"):
        Rationale(template="{prompt} only")


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("ok", "empty"), ("y" * 601, "too long"),
    (f"Because: {CHOSEN}", "repeats answer"), ("The capital of France", "repeats answer"),
    ("A gives the right capital, B does not.", None),
])
def test_degenerate_rules(text, reason):
    assert degenerate(text, CHOSEN, REJECTED, min_chars=10, max_chars=600) == reason


@pytest.fixture(scope="module")
def tiny(tiny_llama_factory):
    yield tiny_llama_factory(0, init_range=0.02)  # tests/conftest.py
    clear_cache()


def test_a_real_tiny_judge_through_the_step(tiny):
    step = Rationale(model=tiny, backend="transformers", device="cpu", dtype="float32",
                     max_new_tokens=12, min_chars=1, retries=1)
    step.setup()
    out = step.process(pair_table(3))
    step.teardown()
    texts = out.table.column("rationale").to_pylist()
    assert out.table.num_rows == 3 and out.table.column_names[-1] == "rationale"
    assert out.counts["rationales"] + out.counts["rationale_missing"] == 3
    for text in texts:
        assert text is None or degenerate(text, CHOSEN, REJECTED, 1, 600) is None
    assert sum(t is not None for t in texts) == out.counts["rationales"]
