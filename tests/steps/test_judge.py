"""Judges: parsers over malformed text, retries, the pairwise order logic (text-level stubs), SmolLM2 once."""

import re

import pyarrow as pa
import pytest

from prefdata import judging
from prefdata.judging import ParseError, parse_pairwise, parse_rubric
from prefdata.steps.judge import JudgePairwise, JudgeRubric

GOOD_RUBRIC = """Helpfulness: 4
Rationale: Correct and useful.
Honesty: 5
Rationale: Confident and right.
Instruction following: 3
Rationale: Ignores the length limit.
Truthfulness: 4
Rationale: One small slip.
Overall: 4
Rationale: A solid answer."""


def _with(old, new, text=GOOD_RUBRIC):
    assert old in text
    return text.replace(old, new)


MALFORMED_RUBRICS = [
    ("", "empty"),
    ("  \n\n ", "empty"),
    (_with("Helpfulness: 4\n", ""), "no_rating"),
    (_with("Overall: 4\nRationale: A solid answer.", ""), "no_rating"),
    ("The response is good. I would give it a 4.", "no_rating"),
    ("[[A]]", "no_rating"),
    ("| Helpfulness | 4 |\n| Honesty | 5 |", "no_rating"),
    (_with("Helpfulness: 4", "Helpfulness:"), "no_rating"),
    (_with("Helpfulness: 4", "Helpfulness: 7"), "rating_out_of_range"),
    (_with("Honesty: 5", "Honesty: 0"), "rating_out_of_range"),
    (_with("Honesty: 5", "Honesty: -2"), "rating_out_of_range"),
    (_with("Overall: 4", "Overall: 8/10"), "rating_out_of_range"),
    (_with("Overall: 4", "Overall: 4 out of 10"), "rating_out_of_range"),
    (_with("Truthfulness: 4", "Truthfulness: 3.5"), "rating_not_whole"),
    (_with("Helpfulness: 4", "Helpfulness: 4 but it could be better"), "text_after_rating"),
    (_with("Helpfulness: 4", "Helpfulness: 4, maybe 5"), "text_after_rating"),
    (_with("Honesty: 5", "Honesty: 5 stars"), "text_after_rating"),
    (_with("Helpfulness: 4", "Helpfulness: four"), "rating_not_a_number"),
    (_with("Helpfulness: 4", "Helpfulness: N/A"), "rating_not_a_number"),
    (GOOD_RUBRIC + "\nHelpfulness: 2", "duplicate_aspect"),
    (_with("Helpfulness: 4", "Helpfullness: 4"), "unknown_aspect"),
    (_with("Truthfulness: 4", "Accuracy: 4"), "unknown_aspect"),
    (_with("Instruction following: 3", "Instructions: 3"), "unknown_aspect"),
    (GOOD_RUBRIC.replace("Overall: 4", "Harmlessness: 5\nOverall: 4"), "unknown_aspect"),
]

FORGIVEN_RUBRICS = [
    "Sure! Here is my evaluation.\n\n" + GOOD_RUBRIC,
    GOOD_RUBRIC.replace("Helpfulness: 4", "**Helpfulness:** 4/5").replace("Overall: 4", "**Overall rating**: 4 out of 5"),
    GOOD_RUBRIC.replace("Instruction following: 3", "- instruction-following: [3]"),
    GOOD_RUBRIC.replace("Truthfulness: 4", "### Truthfulness\nRating: 4"),
    GOOD_RUBRIC.replace("Honesty: 5", "Honesty:\n5"),
    GOOD_RUBRIC.replace("Overall: 4", "Overall score: 4 (good)").replace("\n", "\r\n"),
    GOOD_RUBRIC.replace("Helpfulness: 4", "HELPFULNESS: 4."),
]


@pytest.mark.parametrize("text,code", MALFORMED_RUBRICS)
def test_malformed_rubrics_raise_with_a_reason(text, code):
    with pytest.raises(ParseError) as err:
        parse_rubric(text)
    assert err.value.code == code, err.value


def test_at_least_twenty_malformed_cases():
    assert len(MALFORMED_RUBRICS) >= 20 and len(MALFORMED_PAIRWISE) >= 7


@pytest.mark.parametrize("text", FORGIVEN_RUBRICS)
def test_layout_variants_parse_to_the_same_ratings(text):
    got = parse_rubric(text)
    assert got.ratings == {"helpfulness": 4, "honesty": 5, "instruction_following": 3,
                           "truthfulness": 4, "overall": 4}
    assert got.rationales["instruction_following"] == "Ignores the length limit."


def test_multi_line_rationales_are_kept():
    got = parse_rubric(GOOD_RUBRIC.replace("Rationale: A solid answer.", "Rationale: A solid answer.\nShort, too."))
    assert got.rationales["overall"] == "A solid answer. Short, too."


MALFORMED_PAIRWISE = [
    ("", "empty"),
    ("Response A is better.", "no_verdict"),
    ("Verdict: A", "no_verdict"),
    ("A is clearer. [[D]]", "unknown_verdict"),
    ("Hard to say. [[A or B]]", "unknown_verdict"),
    ("At first [[A]], but on reflection [[B]]", "conflicting_verdicts"),
    ("A is better. [[A]]\nI hope this helps!", "text_after_verdict"),
]


@pytest.mark.parametrize("text,code", MALFORMED_PAIRWISE)
def test_malformed_pairwise_verdicts(text, code):
    with pytest.raises(ParseError) as err:
        parse_pairwise(text)
    assert err.value.code == code


def test_pairwise_verdict_variants():
    assert parse_pairwise("A is more accurate.\nFinal verdict: [[A]]") == judging.Verdict("A", "A is more accurate.")
    assert parse_pairwise("**[[b]]**").winner == "B"
    assert parse_pairwise("Equal. [[C]].").winner == "tie"
    assert parse_pairwise("[[A]] ... so again [[A]]").winner == "A"


# -- text-level stubs: fixed-output model classes ----------------------------------------------
class FixedJudge:
    """A judge model that returns ``answer(user_text, sampling)`` — nothing but text."""

    name = "stub"

    def __init__(self, answer):
        self.answer, self.calls, self.draws = answer, [], []

    def generate(self, conversations, n, sampling, keys=None, first_index=None):
        self.calls.append((len(conversations), sampling))
        self.draws.append((list(keys), first_index))
        return [[self.answer(c[-1]["content"], sampling)] * n for c in conversations]


def _slots(user_text):
    a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", user_text, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\nFirst explain", user_text, re.S).group(1)
    return a, b


def prefers_good(user_text, sampling):
    """A fair judge: the response containing GOOD wins wherever it is shown."""
    a, b = _slots(user_text)
    if ("GOOD" in a) == ("GOOD" in b):
        return "They are equally good. [[C]]"
    return "This one is better. " + ("[[A]]" if "GOOD" in a else "[[B]]")


def always_a(user_text, sampling):
    return "The first is better. [[A]]"


def _pairs(n=2):
    return pa.table({
        "pair_id": [f"p{k}" for k in range(n)],
        "prompt": [[{"role": "user", "content": f"Question {k}?"}] for k in range(n)],
        "chosen": [[{"role": "assistant", "content": f"GOOD answer {k}"}] for k in range(n)],
        "rejected": [[{"role": "assistant", "content": f"poor answer {k}"}] for k in range(n)],
    })


def _judge(cls, stub, **kw):
    step = cls(**kw)
    step.model = stub
    return step


def test_pairwise_fair_judge_agrees_across_orders():
    out = _judge(JudgePairwise, FixedJudge(prefers_good)).process(_pairs())
    rows = out.table.to_pylist()
    assert [r["judge_first"] for r in rows] == ["chosen", "chosen"]
    assert [r["judge_second"] for r in rows] == ["chosen", "chosen"]
    assert [r["judge_verdict"] for r in rows] == ["chosen", "chosen"]
    assert [r["judge_agreement"] for r in rows] == [True, True]
    assert rows[0]["judge_rationale"] == "This one is better." and rows[0]["judge_error"] is None
    assert out.counts["judge_pairs_agree"] == 2 and out.counts["judge_asked"] == 4


def test_pairwise_position_bias_becomes_a_tie_with_disagreement():
    out = _judge(JudgePairwise, FixedJudge(always_a), name="pj").process(_pairs())
    row = out.table.to_pylist()[0]
    assert (row["pj_first"], row["pj_second"]) == ("chosen", "rejected")
    assert row["pj_verdict"] == "tie" and row["pj_agreement"] is False
    assert out.counts["pj_pairs_disagree"] == 2


def test_pairwise_judge_that_prefers_rejected_says_so():
    flipped = _pairs().set_column(2, "chosen", _pairs().column("rejected")).set_column(
        3, "rejected", _pairs().column("chosen"))
    row = _judge(JudgePairwise, FixedJudge(prefers_good)).process(flipped).table.to_pylist()[0]
    assert row["judge_verdict"] == "rejected" and row["judge_agreement"] is True


def test_pairwise_missing_order_is_recorded_not_guessed():
    def only_when_chosen_first(user_text, sampling):
        a, _ = _slots(user_text)
        return "[[A]]" if "GOOD" in a else "I cannot decide."

    out = _judge(JudgePairwise, FixedJudge(only_when_chosen_first), max_attempts=2).process(_pairs(1))
    row = out.table.to_pylist()[0]
    assert row["judge_first"] == "chosen" and row["judge_second"] is None
    assert row["judge_verdict"] is None and row["judge_agreement"] is None
    assert row["judge_error"] == "chosen as B: no_verdict: no verdict [[A]], [[B]] or [[C]] in the output (after 2 attempts)"
    assert out.counts["judge_missing_no_verdict"] == 1


def test_pairwise_on_responses_gives_win_rates():
    quality = {"best GOOD GOOD": 2, "fine GOOD": 1, "bad": 0}

    def by_quality(user_text, sampling):
        a, b = _slots(user_text)
        return "[[A]]" if quality[a] > quality[b] else "[[B]]"

    table = pa.table({"prompt_id": ["q"] * 3, "prompt": [[{"role": "user", "content": "Q?"}]] * 3,
                      "response": ["fine GOOD", "bad", "best GOOD GOOD"]})
    out = _judge(JudgePairwise, FixedJudge(by_quality), on="responses", name="pw").process(table)
    assert out.table.column("score_pw").to_pylist() == [0.5, 0.0, 1.0]
    assert out.table.column("pw_agreement").to_pylist() == [1.0, 1.0, 1.0]
    biased = _judge(JudgePairwise, FixedJudge(always_a), on="responses", name="pw").process(table)
    assert biased.table.column("score_pw").to_pylist() == [0.5, 0.5, 0.5]
    assert biased.table.column("pw_agreement").to_pylist() == [0.0, 0.0, 0.0]


def _responses():
    return pa.table({"prompt": [[{"role": "user", "content": "Why is the sky blue?"}]] * 2,
                     "response": ["Rayleigh scattering.", "Because it is."]})


def test_rubric_retries_malformed_text_with_another_seed():
    def first_try_malformed(user_text, sampling):
        return "Helpfulness: 9" if sampling.temperature == 0 else GOOD_RUBRIC

    stub = FixedJudge(first_try_malformed)
    out = _judge(JudgeRubric, stub, name="uf", retry_temperature=0.6).process(_responses())
    rows = out.table.to_pylist()
    assert [r["score_uf"] for r in rows] == [4.0, 4.0]
    assert rows[0]["score_uf_instruction_following"] == 3.0 and rows[0]["uf_attempts"] == 2
    assert rows[0]["uf_rationales"]["honesty"] == "Confident and right." and rows[0]["uf_error"] is None
    (n1, s1), (n2, s2) = stub.calls
    assert (n1, n2) == (2, 2) and s1.temperature == 0 and s2.temperature == 0.6
    # attempt k of an item is its draw k: the same item keys, first_index = the attempt
    (keys1, at1), (keys2, at2) = stub.draws
    assert (at1, at2) == (0, 1) and keys1 == keys2 and len(set(keys1)) == 2 and s1.seed == s2.seed == 0
    assert out.counts["uf_retries"] == 2 and out.counts["uf_missing"] == 0


def test_rubric_gives_up_with_the_reason_never_a_zero():
    out = _judge(JudgeRubric, FixedJudge(lambda t, s: "Helpfulness: 7"), name="uf").process(_responses())
    rows = out.table.to_pylist()
    assert all(r["score_uf"] is None and r["score_uf_honesty"] is None for r in rows)
    assert rows[0]["uf_error"] == "rating_out_of_range: helpfulness: rating 7 is outside 1-5 (after 3 attempts)"
    assert rows[0]["uf_attempts"] == 3 and rows[0]["uf_rationales"] is None
    assert out.counts["uf_missing_rating_out_of_range"] == 2


def test_columns_and_bad_configs():
    assert JudgeRubric().output_columns(["prompt", "response"])[2:] == [
        "score_judge", "score_judge_helpfulness", "score_judge_honesty", "score_judge_instruction_following",
        "score_judge_truthfulness", "judge_rationales", "judge_attempts", "judge_error"]
    assert JudgePairwise().input_columns() == ["prompt", "chosen", "rejected"]
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        JudgeRubric(max_attempts=0)
    with pytest.raises(ValueError, match="on must be 'pairs' or 'responses'"):
        JudgePairwise(on="prompts")


# -- structured (JSON-schema) output ----------------------------------------------------------
import json  # noqa: E402

GOOD_JSON = {f: {"rationale": f"{f} ok", "rating": r}
             for f, r in zip(judging.RUBRIC_FIELDS, (4, 5, 3, 4, 4))}


def _json_with(path, value):
    doc = json.loads(json.dumps(GOOD_JSON))
    target = doc
    for k in path[:-1]:
        target = target[k]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc)


MALFORMED_JSON_RUBRICS = [
    ("", "empty"),
    (GOOD_RUBRIC, "invalid_json"),  # the text format is not accepted under a schema
    ('{"helpfulness": {"rationale": "cut', "invalid_json"),
    ("```json\n" + json.dumps(GOOD_JSON) + "\n```", "invalid_json"),
    ("[4, 5, 3, 4, 4]", "schema_mismatch"),
    (_json_with(["overall"], KeyError), "schema_mismatch"),
    (_json_with(["harmlessness"], {"rationale": "", "rating": 5}), "schema_mismatch"),
    (_json_with(["honesty", "rating"], 7), "schema_mismatch"),
    (_json_with(["honesty", "rating"], 0), "schema_mismatch"),
    (_json_with(["honesty", "rating"], 4.0), "schema_mismatch"),
    (_json_with(["honesty", "rating"], "4"), "schema_mismatch"),
    (_json_with(["honesty", "rating"], True), "schema_mismatch"),
    (_json_with(["honesty", "rationale"], None), "schema_mismatch"),
    (_json_with(["honesty", "rationale"], KeyError), "schema_mismatch"),
    (_json_with(["honesty", "confidence"], 0.9), "schema_mismatch"),
]


@pytest.mark.parametrize("text,code", MALFORMED_JSON_RUBRICS)
def test_json_rubrics_are_checked_strictly_against_the_schema(text, code):
    with pytest.raises(ParseError) as err:
        judging.parse_rubric_json(text)
    assert err.value.code == code, err.value


def test_json_rubric_and_verdict_parse():
    got = judging.parse_rubric_json("\n " + json.dumps(GOOD_JSON) + " \n")
    assert got.ratings == {"helpfulness": 4, "honesty": 5, "instruction_following": 3,
                           "truthfulness": 4, "overall": 4}
    assert got.rationales["honesty"] == "honesty ok"
    assert judging.parse_pairwise_json('{"rationale": " A is right. ", "verdict": "A"}') == judging.Verdict("A", "A is right.")
    assert judging.parse_pairwise_json('{"verdict": "C", "rationale": ""}').winner == "tie"
    for bad, detail in [('{"rationale": "x", "verdict": "a"}', "not one of"), ('{"verdict": "A"}', "lacks 'rationale'"),
                        ('{"rationale": "x", "verdict": "A", "score": 1}', "unknown key")]:
        with pytest.raises(ParseError, match=detail):
            judging.parse_pairwise_json(bad)


class SchemaJudge(FixedJudge):
    """A stub of a backend that can constrain decoding: records the schema it was given."""

    supports_json_schema = True

    def generate(self, conversations, n, sampling, keys=None, first_index=None, json_schema=None):
        self.calls.append((len(conversations), sampling, json_schema))
        return [[self.answer(c[-1]["content"], sampling)] * n for c in conversations]


def test_structured_auto_asks_for_json_where_the_backend_can_constrain():
    stub = SchemaJudge(lambda text, s: json.dumps(GOOD_JSON) if "Answer with one JSON object" in text else GOOD_RUBRIC)
    out = _judge(JudgeRubric, stub, name="uf").process(_responses())
    assert stub.calls[0][2] == judging.RUBRIC_SCHEMA
    assert out.table.column("score_uf_honesty").to_pylist() == [5.0, 5.0]
    assert out.table.to_pylist()[0]["uf_rationales"]["overall"] == "overall ok"
    off = SchemaJudge(lambda text, s: GOOD_RUBRIC)
    assert _judge(JudgeRubric, off, structured="off").process(_responses()).table.column("score_judge").to_pylist() == [4.0, 4.0]
    assert off.calls[0][2] is None  # off: no schema, the text format and its tolerant parser

    def verdict(text, s):
        a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        return json.dumps({"rationale": "because", "verdict": "A" if "GOOD" in a else "B"})

    pw = SchemaJudge(verdict)
    row = _judge(JudgePairwise, pw).process(_pairs(1)).table.to_pylist()[0]
    assert row["judge_verdict"] == "chosen" and row["judge_agreement"] is True and pw.calls[0][2] == judging.PAIRWISE_SCHEMA


def test_structured_json_schema_needs_a_backend_that_can_constrain():
    with pytest.raises(ValueError, match="structured: json_schema needs a backend that can constrain"):
        JudgeRubric(backend="transformers", structured="json_schema")
    with pytest.raises(ValueError, match=r"structured.*'xml' is not one of \['auto', 'json_schema', 'off'\]"):
        JudgePairwise(structured="xml")
    step = _judge(JudgeRubric, FixedJudge(lambda t, s: GOOD_RUBRIC), structured="json_schema")
    with pytest.raises(ValueError, match="FixedJudge backend cannot constrain decoding.*structured: auto or off"):
        step.process(_responses())
    # a backend that cannot constrain gets the unchanged text prompt under auto
    text = FixedJudge(lambda t, s: GOOD_RUBRIC)
    _judge(JudgeRubric, text).process(_responses())
    assert text.calls and JudgeRubric().config.structured == "auto"


@pytest.fixture
def one_thread():
    """Generation on a shared 2-core machine: one torch thread avoids thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- per-item seeds with a real (tiny) model: batch size, order, shard size, --limit --------------
def _rubric_items(n=5):
    return [judging.rubric_conversation([{"role": "user", "content": f"Question {k}?"}], f"Answer {k}.")
            for k in range(n)]


def test_judge_texts_are_seeded_per_item_whatever_the_batch_and_the_other_items(tiny_llama, one_thread):
    from prefdata.models import load_model

    convs, keys = _rubric_items(), [f"item-{k}" for k in range(5)]
    ask = dict(max_attempts=2, max_new_tokens=6, seed=1)

    def texts(batch_size, order, seed=1):
        lm = load_model(tiny_llama, backend="transformers", device="cpu", dtype="float32", batch_size=batch_size)
        got = judging.judge_with_retries(lm, [convs[i] for i in order], judging.parse_rubric,
                                         keys=[keys[i] for i in order], **dict(ask, seed=seed))
        return {keys[i]: r.texts for i, r in zip(order, got)}

    wide = texts(8, range(5))
    assert all(len(t) == 2 for t in wide.values())  # a random model's text never parses: retried
    assert texts(1, [4, 2, 0]) == {k: wide[k] for k in ("item-4", "item-2", "item-0")}
    reseeded = texts(8, range(5), seed=2)
    assert all(reseeded[k][0] == wide[k][0] for k in keys)  # the first try is greedy
    assert sum(reseeded[k][1] != wide[k][1] for k in keys) >= 4  # the retry samples from the item's seed


def _judge_run(data, workdir, model, limit, shard_size, batch_size):
    import polars as pl

    from prefdata.executors import LocalExecutor
    from prefdata.pipeline import Pipeline
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.sample import Sample

    steps = [LoadPrompts(path=str(data), limit=limit),
             Sample(model=model, n=2, max_new_tokens=4, backend="transformers", device="cpu", dtype="float32"),
             JudgeRubric(model=model, name="uf", max_attempts=2, max_new_tokens=6, temperature=0.5,
                         backend="transformers", device="cpu", dtype="float32", batch_size=batch_size)]
    pipe = Pipeline(steps, workdir=workdir, shard_size=shard_size, progress=False, card=False,
                    executor=LocalExecutor(in_process=True))
    return pl.from_arrow(pipe.run()), pipe.stats[2].counts


def test_judge_rows_do_not_depend_on_shards_or_batches_and_a_larger_limit_reuses_them(
        tiny_llama, tmp_path, one_thread):
    import json as _json

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(_json.dumps({"prompt": f"Tell me about {k}."}) + "\n" for k in range(6)))
    fresh, counts = _judge_run(data, tmp_path / "a", tiny_llama, 6, shard_size=5, batch_size=8)
    assert counts["prompts_computed"] == 6 and counts["uf_asked"] == 12 and fresh.height == 12
    other, _ = _judge_run(data, tmp_path / "b", tiny_llama, 6, shard_size=2, batch_size=1)
    assert other.equals(fresh)
    _, counts = _judge_run(data, tmp_path / "c", tiny_llama, 3, shard_size=2, batch_size=8)
    assert counts["prompts_computed"] == 3 and counts["uf_asked"] == 6
    grown, counts = _judge_run(data, tmp_path / "c", tiny_llama, 6, shard_size=2, batch_size=8)
    assert counts["prompts_computed"] == 3 and counts["prompts_reused"] == 3  # only the new prompts judged
    assert grown.equals(fresh)


@pytest.mark.slow
def test_smollm2_runs_both_judges_end_to_end(one_thread):
    kw = dict(backend="transformers", device="cpu", max_new_tokens=48, max_attempts=2)
    rubric = JudgeRubric(**kw).process(_responses().slice(0, 1))
    row = rubric.table.to_pylist()[0]
    assert (row["score_judge"] in {1.0, 2.0, 3.0, 4.0, 5.0}) != (row["judge_error"] is not None)
    assert row["judge_attempts"] in (1, 2)
    pair = JudgePairwise(**kw).process(_pairs(1)).table.to_pylist()[0]
    assert pair["judge_verdict"] in ("chosen", "rejected", "tie") or pair["judge_error"]


@pytest.mark.gpu
def test_vllm_guided_decoding_gives_schema_json(one_thread):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'prefdata[vllm]')")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a CUDA GPU")
    from prefdata.models.vllm_backend import json_schema_params

    assert set(json_schema_params(judging.PAIRWISE_SCHEMA)) <= {"structured_outputs", "guided_decoding"}
    out = JudgeRubric(backend="vllm", max_new_tokens=512, max_attempts=1,
                      model_options={"gpu_memory_utilization": 0.3}).process(_responses())
    assert out.counts["judge_parsed"] >= 1  # guided decoding: JSON by construction
    # the only way to miss is a JSON object cut off by max_new_tokens, never a format error
    assert all(e is None or e.startswith("invalid_json") for e in out.table.column("judge_error").to_pylist())
