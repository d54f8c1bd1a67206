"""The sample step on a literal two-prompt table, with the real SmolLM2."""

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

from prefdata import schema
from prefdata.steps.sample import Sample, SampleConfig

PROMPTS = [
    [{"role": "user", "content": "Give me a word that rhymes with cat."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
]


def _prompt_table(prompts=PROMPTS):
    return pa.table(
        {
            "prompt_id": [schema.prompt_id(p) for p in prompts],
            "prompt": prompts,
            "source": ["test"] * len(prompts),
        },
        schema=schema.PROMPT,
    )


def _step(**overrides):
    options = dict(n=3, max_new_tokens=8, backend="transformers", device="cpu")
    return Sample(**dict(options, **overrides))


def test_sample_expands_prompts_into_response_rows():
    step = _step()
    step.setup()
    out = step.process(_prompt_table())
    assert out.num_rows == 2 * 3
    assert out.schema.equals(pa.schema(list(schema.RESPONSE) + [schema.FINISH_REASON]))
    rows = out.to_pylist()
    assert [r["prompt_id"] for r in rows] == [schema.prompt_id(PROMPTS[0])] * 3 + [
        schema.prompt_id(PROMPTS[1])] * 3
    assert [r["sample_index"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert len({r["response_id"] for r in rows}) == len(rows)
    assert all(r["generator"] == "smollm2-135m-instruct" for r in rows)
    assert all(isinstance(r["response"], str) and r["response"] for r in rows)
    assert rows[0]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8, "seed": 0,
                                   "stop": [], "min_new_tokens": 0}
    assert step.output_columns(_prompt_table().column_names) == out.column_names
    # eight tokens cannot answer "why is the sky blue": cut at max_new_tokens
    assert set(out["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert out["finish_reason"].to_pylist()[3:] == ["length"] * 3


def test_recomputing_a_shard_gives_identical_rows():
    first = _step().process(_prompt_table())
    _step().process(_prompt_table(PROMPTS[:1]))  # other work in between must not matter
    again = _step().process(_prompt_table())
    assert again.equals(first)
    reseeded = _step(seed=1).process(_prompt_table())
    assert reseeded.column("response").to_pylist() != first.column("response").to_pylist()


def test_empty_shard_and_bad_config():
    out = _step().process(_prompt_table([]))
    assert out.num_rows == 0 and out.column_names == _step().output_columns(schema.PROMPT.names)
    with pytest.raises(ValueError, match="n must be at least 1"):
        Sample(SampleConfig(n=0))
    with pytest.raises(ValueError, match="unknown option"):
        Sample(samples=3)
    with pytest.raises(ValueError, match="already has column"):
        _step().process(_prompt_table().append_column("response", pa.array(["a", "b"])))
    with pytest.raises(TypeError, match="option 'stop'.*expected a list"):
        Sample(stop="\n")
    with pytest.raises(ValueError, match="step 'sample': stop must be a list of non-empty strings"):
        Sample(stop=["\n", ""])
    with pytest.raises(ValueError, match=r"min_new_tokens \(9\) must not exceed max_new_tokens \(8\)"):
        Sample(min_new_tokens=9, max_new_tokens=8)
    Sample(backend="api", stop=["\n"], min_new_tokens=1)  # the api backend passes them on (tests/models)


def test_a_prompt_gets_the_same_responses_whatever_its_shard_and_batch():
    both = _step(temperature=1.0).process(_prompt_table())
    alone = _step(temperature=1.0, batch_size=1).process(_prompt_table(PROMPTS[1:]))
    assert alone.equals(both.slice(3, 3))
    assert len(set(both["response"].to_pylist())) == 6


def test_stop_strings_and_min_new_tokens_reach_the_model():
    free = _step(n=2, max_new_tokens=24, temperature=0.0).process(_prompt_table(PROMPTS[1:]))
    text = free["response"][0].as_py()
    stop = text.split()[3]
    cut = _step(n=2, max_new_tokens=24, temperature=0.0, stop=[stop]).process(_prompt_table(PROMPTS[1:]))
    assert cut["response"].to_pylist() == [text[:text.index(stop)]] * 2
    assert cut["finish_reason"].to_pylist() == ["stop"] * 2
    assert cut["sampling"][0].as_py()["stop"] == [stop] and free["sampling"][0].as_py()["stop"] == []
    held = _step(n=1, max_new_tokens=6, min_new_tokens=6, temperature=0.0).process(_prompt_table(PROMPTS[:1]))
    assert held["finish_reason"].to_pylist() == ["length"]
    assert held["sampling"][0].as_py()["min_new_tokens"] == 6


def test_append_adds_a_second_temperature_after_each_prompts_samples():
    first = _step(n=2, max_new_tokens=4, temperature=0.7, seed=1).process(_prompt_table())
    both = _step(n=3, max_new_tokens=4, temperature=1.0, seed=2, append=True).process(first)
    ids = [schema.prompt_id(p) for p in PROMPTS]
    assert both.num_rows == 2 * (2 + 3)
    assert both.slice(0, 2).equals(first.slice(0, 2))  # the prompt's own samples come first, unchanged
    assert both["prompt_id"].to_pylist() == [ids[0]] * 5 + [ids[1]] * 5
    assert both["sample_index"].to_pylist() == [0, 1, 2, 3, 4] * 2
    temps = [s["temperature"] for s in both["sampling"].to_pylist()]
    assert temps == [0.7, 0.7, 1.0, 1.0, 1.0] * 2
    # appended draws are seeded by their sample_index: the same as a fresh run's draws 2..4
    fresh = _step(n=5, max_new_tokens=4, temperature=1.0, seed=2).process(_prompt_table())
    appended = both.filter(pa.compute.greater_equal(both["sample_index"], 2))
    assert appended["response"].to_pylist() == fresh.filter(
        pa.compute.greater_equal(fresh["sample_index"], 2))["response"].to_pylist()
    assert both["finish_reason"].null_count == 0
    assert len(set(both["response_id"].to_pylist())) == 10
    with pytest.raises(ValueError, match="append: true"):
        _step().output_columns(list(first.column_names))
