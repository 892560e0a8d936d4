"""Judge HTTP as an attacker would serve it: redirects keep the key home, error bodies are redacted, malformed
replies become NaN scores with their reason counted."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mmalign.rewards import get_reward

SECRET = "sk-judge-secret-9876543210"


class Server:
    """A 127.0.0.1 server whose every POST gets ``reply(handler)``; records the Authorization headers it saw."""

    def __init__(self, reply):
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.auth.append(self.headers.get("Authorization"))
                reply(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, code: int, body: bytes = b"", headers: dict | None = None):
    handler.send_response(code)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def ok_reply(handler):
    top = [{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.4}]
    body = {
        "choices": [
            {"message": {"content": "Yes"}, "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}
        ]
    }
    send(handler, 200, json.dumps(body).encode())


def judge_for(url, monkeypatch):
    monkeypatch.setenv("MMALIGN_TEST_JUDGE_KEY", SECRET)
    judge = get_reward(
        "vlm_judge",
        backend="openai",
        base_url=url,
        api_key_env="MMALIGN_TEST_JUDGE_KEY",
        max_retries=1,
        timeout=5,
    )
    judge.backend.backoff = 0.01
    return judge


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"], ids=["other-port", "other-host-name"])
@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_redirect_is_not_followed_and_the_key_stays_home(monkeypatch, caplog, target_host, code):
    target = Server(ok_reply)  # where the redirect points: must never see a request (or the key)
    origin = Server(
        lambda h: send(h, code, b"", {"Location": f"http://{target_host}:{target.port}/v1/chat/completions"})
    )
    try:
        judge = judge_for(f"http://127.0.0.1:{origin.port}/v1", monkeypatch)
        scores = judge(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert torch.isnan(scores).all()
        assert origin.auth == [f"Bearer {SECRET}"] * 2  # the configured endpoint got the key, once per item
        assert target.auth == []  # the redirect target got nothing: no request, no header
        assert judge.failures == {f"redirect refused (HTTP {code})": 2}
        assert SECRET not in caplog.text
    finally:
        origin.close()
        target.close()


MALFORMED = {
    "not json": (200, b"<html>oops</html>"),
    "json list": (200, b"[1, 2, 3]"),
    "no choices": (200, b'{"choices": []}'),
    "choices not a list": (200, b'{"choices": "Yes"}'),
    "no option": (200, json.dumps({"choices": [{"message": {"content": "Maybe"}}]}).encode()),
    "bad logprob": (
        200,
        json.dumps({"choices": [{"logprobs": {"content": [{"token": "Yes", "logprob": "x"}]}}]}).encode(),
    ),
    "401 echoing the key": (401, f'{{"error": "invalid key Bearer {SECRET} ({SECRET})"}}'.encode()),
    "500 forever": (500, b"internal"),
    "deep json": (200, b"[" * 100000 + b"]" * 100000),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_replies_become_nan_with_a_counted_reason(monkeypatch, caplog, case):
    code, body = MALFORMED[case]
    server = Server(lambda h: send(h, code, body))
    try:
        judge = judge_for(f"http://127.0.0.1:{server.port}/v1", monkeypatch)
        scores = judge(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
        assert torch.isnan(scores).all()
        assert sum(judge.failures.values()) == 3 and len(judge.failures) == 1, judge.failures
        assert SECRET not in caplog.text and SECRET not in repr(judge) and SECRET not in str(judge.failures)
    finally:
        server.close()


def test_error_body_is_redacted_in_the_warning(monkeypatch, caplog):
    server = Server(lambda h: send(h, 403, f"denied for {SECRET}; token Bearer abc.def".encode()))
    try:
        judge = judge_for(f"http://127.0.0.1:{server.port}/v1", monkeypatch)
        with caplog.at_level("WARNING"):
            judge(torch.rand(1, 3, 8, 8), ["a"])
        assert "HTTP 403" in caplog.text and "denied for ***" in caplog.text and "Bearer ***" in caplog.text
        assert SECRET not in caplog.text and "abc.def" not in caplog.text
    finally:
        server.close()
