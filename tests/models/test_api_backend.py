"""The API backend against a real HTTP server on 127.0.0.1, with scripted behaviours."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from prefdata.models import Sampling, clear_cache, load_model
from prefdata.models.api_backend import ApiError, ApiLM

KEY = "sk-test-0123456789abcdef-secret"
RUBRIC = ("Helpfulness: 4\nRationale: ok\nHonesty: 5\nRationale: ok\nInstruction following: 4\n"
          "Rationale: ok\nTruthfulness: 5\nRationale: ok\nOverall: 4\nRationale: ok")


class Server:
    """`/v1/chat/completions` whose behaviour is the request's model name:

    ok      200, content "<last user message>|seed=<seed>" (n choices when n is given)
    flaky   500 on the first request for a message, then as ok
    busy    429 (Retry-After: 0) on the first request for a message, then as ok
    slow    sleeps 1 s, then as ok
    bad     400 with an error message
    judge   200 with a well-formed UltraFeedback rubric answer
    Any request whose bearer token is not KEY gets 401, with the token echoed back.
    """

    def __init__(self):
        self.requests, self.seen, self.in_flight, self.max_in_flight = [], set(), 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
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
                if model == "flaky" and first:
                    return self.send(500, {"error": {"message": "internal error"}})
                if model == "busy" and first:
                    return self.send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if model == "bad":
                    return self.send(400, {"error": {"message": "max_tokens is too large"}})
                if model == "slow":
                    time.sleep(1.0)
                time.sleep(0.02)
                text = RUBRIC if model == "judge" else f"{user}|seed={body.get('seed')}"
                choices = [{"index": k, "message": {"role": "assistant", "content": text if k == 0 else f"{text}|{k}"}}
                           for k in range(body.get("n", 1))]
                self.send(200, {"id": "x", "object": "chat.completion", "choices": choices})

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
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, model):
        return sum(1 for _, _, body in self.requests if body["model"] == model)


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("PREFDATA_TEST_KEY", KEY)
    return KEY


CONVS = [[{"role": "user", "content": f"question {k}"}] for k in range(6)]
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=16, seed=10)


def _api(server, model="ok", **kw):
    return ApiLM(model, base_url=server.url, api_key_env="PREFDATA_TEST_KEY", **kw)


def test_success_order_seeds_headers_and_bounded_concurrency(server, key):
    lm = _api(server, concurrency=3)
    out = lm.generate(CONVS, 2, SAMPLING)
    assert out == [[f"question {i}|seed={10 + 2 * i + k}" for k in range(2)] for i in range(6)]
    assert len(server.requests) == 12 and 1 < server.max_in_flight <= 3
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {KEY}"
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 16
    # greedy: one request per conversation, the reply repeated
    server.requests.clear()
    greedy = lm.generate(CONVS[:2], 3, Sampling(temperature=0.0, max_new_tokens=4, seed=0))
    assert greedy == [["question 0|seed=0"] * 3, ["question 1|seed=3"] * 3] and len(server.requests) == 2
    # the n parameter: one request, n choices
    server.requests.clear()
    assert _api(server, use_n=True).generate(CONVS[:1], 2, SAMPLING) == [["question 0|seed=10", "question 0|seed=10|1"]]
    assert len(server.requests) == 1 and server.requests[0][2]["n"] == 2


def test_500_and_429_are_retried_then_succeed(server, key, caplog):
    caplog.set_level(logging.WARNING)
    out = _api(server, "flaky", backoff=0.01).generate(CONVS[:2], 1, SAMPLING)
    assert out == [["question 0|seed=10"], ["question 1|seed=11"]]
    assert server.count("flaky") == 4  # each message: 500, then 200
    assert "HTTP 500: internal error; retry 1/4" in caplog.text
    assert _api(server, "busy", backoff=5.0).generate(CONVS[:1], 1, SAMPLING) == [["question 0|seed=10"]]
    assert server.count("busy") == 2  # Retry-After: 0 wins over the 5 s backoff


def test_timeout_is_a_clear_error(server, key):
    lm = _api(server, "slow", timeout=0.2, max_retries=1, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(ApiError, match=r"gave up after 2 attempt\(s\): timed out after 0.2 s"):
        lm.generate(CONVS[:1], 1, SAMPLING)
    assert time.perf_counter() - start < 1.5


def test_bad_key_is_a_clear_error_and_never_shown(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-key-abcdef0123456789"
    monkeypatch.setenv("PREFDATA_TEST_KEY", wrong)
    lm = _api(server)
    with pytest.raises(ApiError) as err:
        lm.generate(CONVS[:1], 1, SAMPLING)
    message = str(err.value)
    assert "authentication failed (HTTP 401" in message and "PREFDATA_TEST_KEY" in message
    assert wrong not in message and wrong[-8:] not in message and "[redacted]" in message
    assert wrong not in caplog.text and wrong not in repr(lm)
    assert server.count("ok") == 1  # an auth failure is not retried
    monkeypatch.delenv("PREFDATA_TEST_KEY")
    with pytest.raises(ApiError, match="it is not set"):
        lm.generate(CONVS[:1], 1, SAMPLING)


def test_client_errors_stop_at_once_and_unreachable_servers_are_named(server, key):
    with pytest.raises(ApiError, match="HTTP 400: max_tokens is too large"):
        _api(server, "bad").generate(CONVS[:1], 1, SAMPLING)
    assert server.count("bad") == 1
    closed = ApiLM("ok", base_url="http://127.0.0.1:9/v1", api_key_env="PREFDATA_TEST_KEY",
                   max_retries=1, backoff=0.01)
    with pytest.raises(ApiError, match=r"gave up after 2 attempt\(s\): could not connect"):
        closed.generate(CONVS[:1], 1, SAMPLING)


def test_load_model_dispatches_and_a_judge_step_runs_over_http(server, key):
    from prefdata.steps.judge import JudgeRubric

    lm = load_model("judge", backend="api", base_url=server.url, api_key_env="PREFDATA_TEST_KEY")
    assert isinstance(lm, ApiLM)
    with pytest.raises(NotImplementedError, match="cannot score log-probabilities"):
        lm.logprobs(CONVS[:1], ["x"])
    step = JudgeRubric(model="judge", backend="api",
                       model_options={"base_url": server.url, "api_key_env": "PREFDATA_TEST_KEY"})
    table = pa.table({"prompt": CONVS[:3], "response": ["a", "b", "c"]})
    out = step.process(table).table
    assert out.column("score_judge").to_pylist() == [4.0, 4.0, 4.0]
    assert out.column("score_judge_truthfulness").to_pylist() == [5.0, 5.0, 5.0]
    clear_cache()
