"""The sample step on a literal two-prompt table, with the real SmolLM2."""

import pyarrow as pa
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
    assert out.schema.equals(schema.RESPONSE)
    rows = out.to_pylist()
    assert [r["prompt_id"] for r in rows] == [schema.prompt_id(PROMPTS[0])] * 3 + [
        schema.prompt_id(PROMPTS[1])] * 3
    assert [r["sample_index"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert len({r["response_id"] for r in rows}) == len(rows)
    assert all(r["generator"] == "smollm2-135m-instruct" for r in rows)
    assert all(isinstance(r["response"], str) and r["response"] for r in rows)
    assert rows[0]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8, "seed": 0}
    assert step.output_columns(_prompt_table().column_names) == out.column_names


def test_recomputing_a_shard_gives_identical_rows():
    first = _step().process(_prompt_table())
    _step().process(_prompt_table(PROMPTS[:1]))  # other work in between must not matter
    again = _step().process(_prompt_table())
    assert again.equals(first)
    reseeded = _step(seed=1).process(_prompt_table())
    assert reseeded.column("response").to_pylist() != first.column("response").to_pylist()


def test_empty_shard_and_bad_config():
    out = _step().process(_prompt_table([]))
    assert out.num_rows == 0 and out.schema.equals(schema.RESPONSE)
    with pytest.raises(ValueError, match="n must be at least 1"):
        Sample(SampleConfig(n=0))
    with pytest.raises(ValueError, match="unknown option"):
        Sample(samples=3)
    with pytest.raises(ValueError, match="already has column"):
        _step().process(_prompt_table().append_column("response", pa.array(["a", "b"])))


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
    assert len(set(both["response_id"].to_pylist())) == 10
    with pytest.raises(ValueError, match="append: true"):
        _step().output_columns(list(first.column_names))
