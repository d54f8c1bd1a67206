"""The API backend (official openai SDK) against a real HTTP server on 127.0.0.1.

The server speaks the chat-completions protocol as the SDK sends it (HTTP/1.1 keep-alive,
JSON bodies, ``response_format`` for structured output) and behaves by model name.
"""

import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

pytest.importorskip("openai", reason="the api backend needs openai (pip install 'prefdata[api]')")

from prefdata import judging, schema  # noqa: E402
from prefdata.models import Sampling, clear_cache, load_model  # noqa: E402
from prefdata.models.base import Generation, draw_seed  # noqa: E402
from prefdata.models.api_backend import ApiError, ApiLM, StructuredOutputUnsupported  # noqa: E402
from prefdata.steps.judge import JudgePairwise, JudgeRubric  # noqa: E402

KEY = "sk-test-0123456789abcdef-secret"
RUBRIC = ("Helpfulness: 4\nRationale: ok\nHonesty: 5\nRationale: ok\nInstruction following: 4\n"
          "Rationale: ok\nTruthfulness: 5\nRationale: ok\nOverall: 4\nRationale: ok")
RUBRIC_JSON = {f: {"rationale": f"{f} is fine", "rating": r}
               for f, r in zip(judging.RUBRIC_FIELDS, (4, 5, 3, 5, 4))}


class Server:
    """`/v1/chat/completions` whose behaviour is the request's model name:

    ok          200, content "<last user message>|seed=<seed>" (n choices when n is given)
    flaky       500 on the first request for a message, then as ok
    busy        429 (Retry-After: 0) on the first request for a message, then as ok
    slow        sleeps 1 s, then as ok
    steady      sleeps 0.25 s, then as ok
    bad         400 with an error message
    judge       200 with a well-formed UltraFeedback rubric in the text format
    json        structured output: 400 unless the request carries a json_schema
                response_format; then JSON for that schema (rubric, or a verdict for
                the response that contains GOOD)
    json_broken 200 with truncated, invalid JSON
    no_schema   400 "response_format ... not supported" when a response_format is sent,
                else as judge
    explain     200, "Answer A is more accurate than answer B." (a rationale)
    story       a little generator, like vLLM's server: the words of "<user> seed=<seed> and
                that is all." cut at max_tokens words (finish_reason length), else cut
                before the first `stop` string or at the end (stop); `min_tokens` pads the
                reply with "more" up to that many words; usage counts the words
    lax         as story, but ignores min_tokens (as servers that drop unknown fields do)
    strict      as story, but 400 "Unrecognized request argument supplied: min_tokens" for
                a min_tokens field (as OpenAI does)
    filtered    as story, finish_reason "content_filter"
    by_seed     a judge whose answer depends on the seed: malformed when seed % 3 == 0, else a
                rubric with Overall 1 + seed % 5 (text format) or verdict [[A]] / [[B]] by the
                seed's parity
    Any request whose bearer token is not KEY gets 401, with the token echoed back.
    """

    def __init__(self):
        self.requests, self.seen, self.in_flight, self.max_in_flight = [], set(), 0, 0
        self.connections = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's client expects
            disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    server.connections.add(self.client_address)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def answer(self, body):
                token = self.headers.get("Authorization", "")
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": {"message": "not found"}})
                if token != f"Bearer {KEY}":
                    return self.send(401, {"error": {"message": f"Incorrect API key provided: {token[7:]}"}})
                model, user = body["model"], body["messages"][-1]["content"]
                with server.lock:
                    first = (model, user) not in server.seen
                    server.seen.add((model, user))
                fmt = body.get("response_format")
                if model == "flaky" and first:
                    return self.send(500, {"error": {"message": "internal error"}})
                if model == "busy" and first:
                    return self.send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if model == "bad":
                    return self.send(400, {"error": {"message": "max_tokens is too large"}})
                if model == "no_schema" and fmt:
                    return self.send(400, {"error": {"message": "response_format type 'json_schema' is not supported"}})
                if model == "json" and (fmt or {}).get("type") != "json_schema":
                    return self.send(400, {"error": {"message": "this test model answers only under a json_schema"}})
                if model == "strict" and "min_tokens" in body:
                    return self.send(400, {"error": {"message": "Unrecognized request argument supplied: min_tokens"}})
                if model in ("story", "lax", "strict", "filtered"):
                    return self.tell(model, user, body)
                if model in ("slow", "steady"):
                    time.sleep(1.0 if model == "slow" else 0.25)
                time.sleep(0.02)
                text = self.text(model, user, body, fmt)
                choices = [{"index": k, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text if k == 0 else f"{text}|{k}"}}
                           for k in range(body.get("n", 1))]
                self.send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                                "model": model, "choices": choices})

            def tell(self, model, user, body):
                words = f"{user} seed={body.get('seed')} and that is all.".split()
                if model == "story":
                    words += ["more"] * (body.get("min_tokens", 0) - len(words))
                finish = "length" if len(words) > body["max_tokens"] else "stop"
                words = words[:body["max_tokens"]]
                text = " ".join(words)
                cuts = [text.index(s) for s in body.get("stop") or [] if s in text]
                if cuts:
                    text, finish = text[:min(cuts)], "stop"
                finish = "content_filter" if model == "filtered" else finish
                self.send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                                "choices": [{"index": 0, "finish_reason": finish,
                                             "message": {"role": "assistant", "content": text}}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": len(words),
                                          "total_tokens": len(words) + 1}})

            def text(self, model, user, body, fmt):
                if model == "by_seed":
                    seed = body["seed"]
                    if seed % 3 == 0:
                        return "I would rather not say."
                    if "[Response A]" in user:
                        return "Compared. " + ("[[A]]" if seed % 2 else "[[B]]")
                    return RUBRIC.replace("Overall: 4", f"Overall: {1 + seed % 5}")
                if model in ("judge", "no_schema"):
                    return RUBRIC
                if model == "explain":
                    return "Answer A is more accurate than answer B."
                if model == "json_broken":
                    return '{"helpfulness": {"rationale": "cut off'
                if model == "json":
                    schema = fmt["json_schema"]["schema"]
                    if schema["title"] == "pairwise_verdict":
                        a = user.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
                        return json.dumps({"rationale": "GOOD wins.", "verdict": "A" if "GOOD" in a else "B"})
                    return json.dumps(RUBRIC_JSON)
                return f"{user}|seed={body.get('seed')}"

            def send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def count(self, model):
        return sum(1 for _, _, body in self.requests if body["model"] == model)

    def bodies(self, model):
        return [body for _, _, body in self.requests if body["model"] == model]


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
    clear_cache()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("PREFDATA_TEST_KEY", KEY)
    return KEY


CONVS = [[{"role": "user", "content": f"question {k}"}] for k in range(6)]
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=16, seed=10)


def _api(server, model="ok", **kw):
    return ApiLM(model, base_url=server.url, api_key_env="PREFDATA_TEST_KEY", **kw)


def _seed(conv, k, seed=10, key=None):
    """The seed of draw k of a conversation: the backends' per-draw derivation."""
    return draw_seed(seed, key or schema.prompt_id(conv), k)


def test_success_order_seeds_headers_bounded_concurrency_and_kept_connections(server, key):
    lm = _api(server, concurrency=3)
    out = lm.generate(CONVS, 2, SAMPLING)
    assert out == [[f"question {i}|seed={_seed(CONVS[i], k)}" for k in range(2)] for i in range(6)]
    assert len(server.requests) == 12 and 1 < server.max_in_flight <= 3
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {KEY}"
    assert headers["user-agent"].startswith("OpenAI/Python")  # the official SDK sent it
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 16
    assert "response_format" not in body
    # greedy: one request per conversation, the reply repeated; same client, same sockets
    greedy = lm.generate(CONVS[:2], 3, Sampling(temperature=0.0, max_new_tokens=4, seed=0))
    assert greedy == [[f"question {i}|seed={_seed(CONVS[i], 0, seed=0)}"] * 3 for i in range(2)]
    assert len(server.requests) == 14
    assert len(server.connections) <= 3  # 14 requests over at most `concurrency` kept-alive connections
    # the n parameter: one request, n choices
    server.requests.clear()
    first = f"question 0|seed={_seed(CONVS[0], 0)}"
    assert _api(server, use_n=True).generate(CONVS[:1], 2, SAMPLING) == [[first, f"{first}|1"]]
    assert len(server.requests) == 1 and server.requests[0][2]["n"] == 2


def test_concurrency_bound_is_respected_under_load(server, key):
    convs = [[{"role": "user", "content": f"load {k}"}] for k in range(16)]
    out = _api(server, "steady", concurrency=4, timeout=10).generate(convs, 1, SAMPLING)
    assert [o[0].split("|")[0] for o in out] == [f"load {k}" for k in range(16)]  # input order kept
    assert server.max_in_flight == 4


def test_500_and_429_are_retried_by_the_sdk_then_succeed(server, key):
    out = _api(server, "flaky").generate(CONVS[:2], 1, SAMPLING)
    assert out == [[f"question {i}|seed={_seed(CONVS[i], 0)}"] for i in range(2)]
    assert server.count("flaky") == 4  # each message: 500, then 200
    start = time.perf_counter()
    assert _api(server, "busy").generate(CONVS[:1], 1, SAMPLING) == [[f"question 0|seed={_seed(CONVS[0], 0)}"]]
    assert server.count("busy") == 2 and time.perf_counter() - start < 5
    with pytest.raises(ApiError, match=r"gave up after 1 attempt\(s\): HTTP 500: internal error"):
        _api(server, "flaky", max_retries=0).generate([[{"role": "user", "content": "new"}]], 1, SAMPLING)


def test_timeout_is_a_clear_error(server, key):
    lm = _api(server, "slow", timeout=0.2, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(ApiError, match=r"timed out after 0.2 s, 2 attempt\(s\); raise timeout/max_retries"):
        lm.generate(CONVS[:1], 1, SAMPLING)
    assert time.perf_counter() - start < 3.0 and server.count("slow") == 2


def test_bad_key_is_a_clear_error_and_never_shown(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's debug logs included
    wrong = "sk-wrong-key-abcdef0123456789"
    monkeypatch.setenv("PREFDATA_TEST_KEY", wrong)
    lm = _api(server)
    with pytest.raises(ApiError) as err:
        lm.generate(CONVS[:1], 1, SAMPLING)
    message = str(err.value)
    assert "authentication failed (HTTP 401" in message and "PREFDATA_TEST_KEY" in message
    assert wrong not in message and wrong[-8:] not in message and "[redacted]" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no SDK traceback with the key
    assert wrong not in caplog.text and wrong[-8:] not in caplog.text and wrong not in repr(lm)
    assert not [r for r in caplog.records if r.name.startswith("httpx") and r.levelno >= logging.INFO]
    assert server.count("ok") == 1  # an auth failure is not retried
    monkeypatch.delenv("PREFDATA_TEST_KEY")
    with pytest.raises(ApiError, match="it is not set"):
        lm.generate(CONVS[:1], 1, SAMPLING)


def test_client_errors_stop_at_once_and_unreachable_servers_are_named(server, key):
    with pytest.raises(ApiError, match="HTTP 400: max_tokens is too large"):
        _api(server, "bad").generate(CONVS[:1], 1, SAMPLING)
    assert server.count("bad") == 1
    closed = ApiLM("ok", base_url="http://127.0.0.1:9/v1", api_key_env="PREFDATA_TEST_KEY", max_retries=0)
    with pytest.raises(ApiError, match=r"127.0.0.1:9/v1/chat/completions: could not connect after 1 attempt"):
        closed.generate(CONVS[:1], 1, SAMPLING)


def test_removed_and_unknown_options_are_named():
    with pytest.raises(TypeError, match="'backoff'.*no longer used: the openai SDK backs off"):
        ApiLM("ok", base_url="http://127.0.0.1:9/v1", backoff=0.5)
    with pytest.raises(TypeError, match="unknown option 'retries'"):
        ApiLM("ok", base_url="http://127.0.0.1:9/v1", retries=3)


def test_missing_openai_is_named_at_step_creation(monkeypatch):
    # sys.modules[name] = None is how Python blocks an import: the uninstalled case, on demand
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r"pip install 'prefdata\[api\]'"):
        JudgeRubric(backend="api", model="judge")
    with pytest.raises(ImportError, match=r"pip install 'prefdata\[api\]'"):
        ApiLM("ok", base_url="http://127.0.0.1:9/v1")
    JudgeRubric(backend="transformers")  # other backends do not need it


# -- judges over HTTP ------------------------------------------------------------------------
def _options(server):
    return {"base_url": server.url, "api_key_env": "PREFDATA_TEST_KEY", "max_retries": 0}


def _responses(n=3):
    return pa.table({"prompt": CONVS[:n], "response": [f"answer {k}" for k in range(n)]})


def _pairs(n=2):
    return pa.table({
        "pair_id": [f"p{k}" for k in range(n)],
        "prompt": [[{"role": "user", "content": f"Question {k}?"}] for k in range(n)],
        "chosen": [[{"role": "assistant", "content": f"GOOD answer {k}"}] for k in range(n)],
        "rejected": [[{"role": "assistant", "content": f"poor answer {k}"}] for k in range(n)],
    })


def test_load_model_dispatches_and_a_text_judge_runs_over_http(server, key):
    lm = load_model("judge", backend="api", base_url=server.url, api_key_env="PREFDATA_TEST_KEY")
    assert isinstance(lm, ApiLM)
    with pytest.raises(NotImplementedError, match="cannot score log-probabilities"):
        lm.logprobs(CONVS[:1], ["x"])
    step = JudgeRubric(model="judge", backend="api", structured="off", model_options=_options(server))
    out = step.process(_responses()).table
    assert out.column("score_judge").to_pylist() == [4.0, 4.0, 4.0]
    assert out.column("score_judge_truthfulness").to_pylist() == [5.0, 5.0, 5.0]
    assert all("response_format" not in b for b in server.bodies("judge"))
    assert "Answer in exactly this format" in server.bodies("judge")[0]["messages"][-1]["content"]


def test_rubric_judge_requests_the_schema_and_fills_its_columns(server, key):
    step = JudgeRubric(model="json", backend="api", name="uf", model_options=_options(server))  # structured: auto
    out = step.process(_responses())
    rows = out.table.to_pylist()
    body = server.bodies("json")[0]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == judging.RUBRIC_SCHEMA
    assert fmt["json_schema"]["name"] == "ultrafeedback_rubric" and fmt["json_schema"]["strict"] is True
    assert "Answer with one JSON object" in body["messages"][-1]["content"]
    assert [r["score_uf"] for r in rows] == [4.0, 4.0, 4.0]
    assert (rows[0]["score_uf_helpfulness"], rows[0]["score_uf_instruction_following"]) == (4.0, 3.0)
    assert rows[0]["uf_rationales"]["honesty"] == "honesty is fine" and rows[0]["uf_error"] is None
    assert out.counts["uf_parsed"] == 3 and server.count("json") == 3


def test_pairwise_judge_under_the_schema_in_both_orders(server, key):
    step = JudgePairwise(model="json", backend="api", structured="json_schema", model_options=_options(server))
    rows = step.process(_pairs()).table.to_pylist()
    assert [r["judge_verdict"] for r in rows] == ["chosen", "chosen"]
    assert [r["judge_agreement"] for r in rows] == [True, True] and rows[0]["judge_rationale"] == "GOOD wins."
    assert all(b["response_format"]["json_schema"]["schema"] == judging.PAIRWISE_SCHEMA
               for b in server.bodies("json"))
    assert server.count("json") == 4


def test_invalid_json_under_the_schema_is_retried_then_missing_with_the_reason(server, key, caplog):
    step = JudgeRubric(model="json_broken", backend="api", name="uf", max_attempts=3,
                       model_options=_options(server))
    out = step.process(_responses(2))
    rows = out.table.to_pylist()
    assert all(r["score_uf"] is None and r["uf_attempts"] == 3 for r in rows)
    assert rows[0]["uf_error"].startswith("invalid_json: not valid JSON (")
    assert rows[0]["uf_error"].endswith("(after 3 attempts)")
    seeds = [b["seed"] for b in server.bodies("json_broken") if b["messages"] == server.bodies("json_broken")[0]["messages"]]
    assert len(seeds) == 3 and len(set(seeds)) == 3  # asked again with new seeds
    assert out.counts["uf_missing_invalid_json"] == 2 and server.count("json_broken") == 6
    assert "set structured: off" in caplog.text


def test_a_server_that_rejects_response_format_names_the_setting(server, key):
    step = JudgeRubric(model="no_schema", backend="api", model_options=_options(server))
    with pytest.raises(StructuredOutputUnsupported) as err:
        step.process(_responses(1))
    message = str(err.value)
    assert "step 'judge_rubric'" in message and "set `structured: off`" in message
    assert "HTTP 400: response_format type 'json_schema' is not supported" in message
    assert server.count("no_schema") == 1  # not retried
    off = JudgeRubric(model="no_schema", backend="api", structured="off", model_options=_options(server))
    assert off.process(_responses(1)).table.column("score_judge").to_pylist() == [4.0]


def test_rationale_step_runs_over_http_with_model_options(server, key):
    from prefdata.steps.rationale import Rationale

    step = Rationale(model="explain", backend="api", model_options=_options(server))
    step.setup()
    out = step.process(_pairs(2))
    assert out.table.column("rationale").to_pylist() == ["Answer A is more accurate than answer B."] * 2
    bodies = server.bodies("explain")
    assert len(bodies) == 2 and all(b["temperature"] == 0 and "response_format" not in b for b in bodies)
    assert sorted("GOOD answer 0" in b["messages"][-1]["content"] for b in bodies) == [False, True]


# -- per-draw seeds, finish reasons, stop and min_new_tokens ---------------------------------
def _seeds(server, model="ok"):
    """(user text, seed) of every request the server saw for ``model``."""
    return sorted((b["messages"][-1]["content"], b["seed"]) for b in server.bodies(model))


def test_the_seed_of_a_draw_does_not_depend_on_the_call_its_order_or_the_concurrency(server, key):
    ids = [f"prompt-{k}" for k in range(6)]
    whole = _api(server, concurrency=1).generate_replies(CONVS, 3, SAMPLING, keys=ids)
    assert [[g.text for g in row] for row in whole] == [
        [f"question {i}|seed={draw_seed(10, ids[i], k)}" for k in range(3)] for i in range(6)]
    assert {g.finish_reason for row in whole for g in row} == {"stop"}
    seen = _seeds(server)
    server.requests.clear()
    # other calls: reversed, split, another concurrency — the same request per draw
    wide = _api(server, concurrency=5)
    back = wide.generate(CONVS[3:][::-1], 3, SAMPLING, keys=ids[3:][::-1])
    front = wide.generate(CONVS[:3], 3, SAMPLING, keys=ids[:3])
    assert front + back[::-1] == [[g.text for g in row] for row in whole]
    assert _seeds(server) == seen
    # a later draw alone (appending samples) gets the seed it has among all draws
    server.requests.clear()
    assert wide.generate(CONVS[2:3], 1, SAMPLING, keys=ids[2:3], first_index=2) == [[whole[2][2].text]]
    # without keys, a conversation's hash is its key (as in the transformers backend)
    assert wide.generate(CONVS[:1], 1, SAMPLING)[0][0].endswith(f"seed={draw_seed(10, schema.prompt_id(CONVS[0]), 0)}")


def test_finish_reason_stop_strings_and_unknown_reasons(server, key, caplog):
    lm = _api(server, "story")
    conv = [[{"role": "user", "content": "tell"}]]
    seed = draw_seed(10, "k", 0)
    full = f"tell seed={seed} and that is all."
    out = lm.generate_replies(conv, 1, SAMPLING, keys=["k"])  # 16 tokens: room for all 6 words
    assert out == [[Generation(full, "stop")]]
    short = Sampling(temperature=0.7, max_new_tokens=3, seed=10)
    assert lm.generate_replies(conv, 1, short, keys=["k"]) == [[Generation(f"tell seed={seed} and", "length")]]
    stop = Sampling(temperature=0.7, max_new_tokens=16, seed=10, stop=("that", " and"))
    assert lm.generate_replies(conv, 1, stop, keys=["k"]) == [[Generation(f"tell seed={seed}", "stop")]]
    assert server.bodies("story")[-1]["stop"] == ["that", " and"]
    assert "stop" not in server.bodies("story")[0] and "min_tokens" not in server.bodies("story")[0]
    caplog.set_level(logging.WARNING)
    odd = _api(server, "filtered").generate_replies(conv * 2, 1, SAMPLING, keys=["a", "b"])
    assert [row[0].finish_reason for row in odd] == [None, None]
    assert "2 replies ended with finish_reason 'content_filter' (2)" in caplog.text


def test_min_new_tokens_is_vllms_min_tokens_and_a_server_without_it_is_named(server, key):
    conv = [[{"role": "user", "content": "tell"}]]
    held = Sampling(temperature=0.7, max_new_tokens=16, seed=10, min_new_tokens=9)
    out = _api(server, "story").generate_replies(conv, 1, held, keys=["k"])[0][0]
    assert out.text.split()[-3:] == ["more"] * 3 and out.finish_reason == "stop"
    assert server.bodies("story")[0]["min_tokens"] == 9
    with pytest.raises(ApiError, match=r"does not accept vLLM's 'min_tokens' request field \(HTTP 400: "
                                       r"Unrecognized request argument supplied: min_tokens\).*set min_new_tokens: 0"):
        _api(server, "strict").generate(conv, 1, held, keys=["k"])
    with pytest.raises(ApiError, match=r"a reply ended after 6 token\(s\) although min_new_tokens is 9: the "
                                       r"server ignores vLLM's 'min_tokens'.*set min_new_tokens: 0"):
        _api(server, "lax").generate(conv, 1, held, keys=["k"])
    # user extra_body fields still go out beside it
    _api(server, "story", extra_body={"top_k": 5}).generate(conv, 1, held, keys=["k"])
    assert server.bodies("story")[-1]["top_k"] == 5 and server.bodies("story")[-1]["min_tokens"] == 9


def _prompt_table(n=2):
    prompts = [[{"role": "user", "content": f"tell {k}"}] for k in range(n)]
    return pa.table({"prompt_id": [schema.prompt_id(p) for p in prompts], "prompt": prompts})


def test_sample_over_the_api_writes_finish_reason_and_records_stop_and_min_new_tokens(server, key):
    from prefdata.steps.sample import Sample

    step = Sample(model="story", backend="api", n=2, max_new_tokens=8, min_new_tokens=2, stop=["that"],
                  model_options=_options(server))
    out = step.process(_prompt_table()).to_pylist()
    pids = _prompt_table().column("prompt_id").to_pylist()
    assert [r["response"] for r in out] == [f"tell {i} seed={draw_seed(0, pids[i], k)} and " for i in range(2)
                                            for k in range(2)]
    assert [r["finish_reason"] for r in out] == ["stop"] * 4
    assert out[0]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8, "seed": 0,
                                  "stop": ["that"], "min_new_tokens": 2}
    assert all(b["stop"] == ["that"] and b["min_tokens"] == 2 for b in server.bodies("story"))
    cut = Sample(model="story", backend="api", n=1, max_new_tokens=2, model_options=_options(server))
    assert cut.process(_prompt_table(1)).column("finish_reason").to_pylist() == ["length"]
    with pytest.raises(ApiError, match="set min_new_tokens: 0"):
        Sample(model="strict", backend="api", n=1, min_new_tokens=1,
               model_options=_options(server)).process(_prompt_table(1))


# -- judges seeded per item: independent of shards and concurrency, reused by prompt ---------
def _run_over_http(server, data, workdir, limit, shard_size, concurrency):
    """load_prompts -> sample (api) -> judge_rubric -> judge_pairwise on responses, in process."""
    import polars as pl

    from prefdata.executors import LocalExecutor
    from prefdata.pipeline import Pipeline
    from prefdata.steps.load_prompts import LoadPrompts
    from prefdata.steps.sample import Sample

    options = dict(_options(server), concurrency=concurrency)
    judge = dict(model="by_seed", backend="api", structured="off", max_attempts=3, model_options=options)
    steps = [LoadPrompts(path=str(data), limit=limit),
             Sample(model="ok", backend="api", n=3, temperature=1.0, model_options=options),
             JudgeRubric(name="uf", **judge),
             JudgePairwise(name="pw", on="responses", **judge)]
    pipe = Pipeline(steps, workdir=workdir, shard_size=shard_size, progress=False, card=False,
                    executor=LocalExecutor(in_process=True))
    out = pl.from_arrow(pipe.run())
    return out, {s.label: s.counts for s in pipe.stats}


def _asked(server, since=0):
    """The judge requests after ``since`` as (messages, seed): what the server was asked."""
    return sorted((json.dumps(b["messages"]), b["seed"]) for _, _, b in server.requests[since:]
                  if b["model"] == "by_seed")


def test_judges_over_http_are_seeded_per_item_and_reuse_judged_prompts(server, key, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(6)))
    fresh, _ = _run_over_http(server, data, tmp_path / "a", limit=6, shard_size=5, concurrency=8)
    everything = _asked(server)
    # the seeds vary the verdicts: some ratings differ, some first answers were retried
    assert fresh["score_uf"].n_unique() > 1 and fresh["uf_attempts"].max() > 1
    assert (fresh.filter(fresh["uf_error"].is_not_null())["uf_attempts"] == 3).all()
    assert 0 < fresh["score_pw"].mean() < 1 and fresh["score_pw"].n_unique() > 2
    other, _ = _run_over_http(server, data, tmp_path / "b", limit=6, shard_size=2, concurrency=1)
    assert other.equals(fresh)  # another shard size and concurrency: the same judgments
    # a larger --limit judges only the new prompts, with the requests a fresh run makes for them
    start = len(server.requests)
    small, counts = _run_over_http(server, data, tmp_path / "c", limit=3, shard_size=2, concurrency=4)
    assert counts["judge_rubric"]["prompts_computed"] == 3 and small.height == 9
    first = _asked(server, start)
    start = len(server.requests)
    grown, counts = _run_over_http(server, data, tmp_path / "c", limit=6, shard_size=2, concurrency=4)
    assert counts["judge_rubric"]["prompts_computed"] == 3 and counts["judge_rubric"]["prompts_reused"] == 3
    assert counts["judge_pairwise"]["prompts_computed"] == 3 and counts["judge_pairwise"]["prompts_reused"] == 3
    assert sorted(first + _asked(server, start)) == everything  # nothing asked twice, nothing missed
    assert grown.equals(fresh)
