"""VLM judge backends: an OpenAI-compatible server started on 127.0.0.1, and a tiny local LLaVA."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mmalign.rewards import get_reward

SECRET = "sk-test-secret-123"


class FakeJudgeServer:
    """Answers chat completions with P(Yes) = image brightness and "First" for the brighter image.

    The first ``fail_first`` requests get HTTP 503 (to exercise retries). Records concurrency and headers.
    """

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_headers: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls += 1
                    call = server.calls
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.auth_headers.append(self.headers.get("Authorization"))
                # in flight until the answer is ready, not until it is sent: the client may read a reply and
                # send its next request before this thread gets past wfile.write (seen once on a loaded machine: 3 of 2)
                answer = None if call <= server.fail_first else server.answer(body)
                with server.lock:
                    server.in_flight -= 1
                if answer is None:
                    self.send_response(503)
                    self.end_headers()
                    return
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def _brightness(url: str) -> float:
        from PIL import Image

        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L")
        return sum(im.getdata()) / (255 * im.size[0] * im.size[1])

    def answer(self, body: dict) -> dict:
        import time

        time.sleep(0.02)  # let requests overlap
        content = body["messages"][0]["content"]
        images = [self._brightness(c["image_url"]["url"]) for c in content if c["type"] == "image_url"]
        text = next(c["text"] for c in content if c["type"] == "text")
        if "First or Second" in text:
            half = len(images) // 2
            p_first = 0.8 if sum(images[:half]) > sum(images[half:]) else 0.2
            alts = [("First", p_first), ("Second", 1 - p_first)]
        else:
            p_yes = min(max(sum(images) / len(images), 1e-4), 1 - 1e-4)
            alts = [("Yes", p_yes), ("No", 1 - p_yes)]
        top = [{"token": t, "logprob": math.log(p)} for t, p in alts]
        return {
            "choices": [
                {
                    "message": {"role": "assistant", "content": alts[0][0]},
                    "logprobs": {"content": [{**top[0], "top_logprobs": top}]},
                }
            ]
        }

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_judge_pointwise_pairwise_retries_concurrency_and_key(monkeypatch, caplog):
    monkeypatch.setenv("MMALIGN_TEST_JUDGE_KEY", SECRET)
    x = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.6, 0.9, 0.4)])
    with FakeJudgeServer(fail_first=2) as server:
        judge = get_reward(
            "vlm_judge",
            backend="openai",
            base_url=server.url,
            model="fake",
            api_key_env="MMALIGN_TEST_JUDGE_KEY",
            max_concurrency=2,
            max_retries=3,
        )
        judge.backend.backoff = 0.01
        scores = judge(x, ["a", "b", "c", "d"])
        assert torch.allclose(scores, torch.tensor([0.2, 0.6, 0.9, 0.4]), atol=0.01)  # PNG rounding
        verdict = judge.compare(x, x.flip(0), ["a", "b", "c", "d"])  # 0.2 vs 0.4, 0.6 vs 0.9, ...
        assert verdict.tolist() == [-1, -1, 1, 1]
        assert server.calls == 2 + 4 + 8  # two 503s retried, then 4 pointwise + 4 pairs x 2 orders
        assert 1 <= server.max_in_flight <= 2
        assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    assert SECRET not in repr(judge) and SECRET not in caplog.text


def test_http_judge_gives_up_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeJudgeServer(fail_first=100) as server:
        judge = get_reward("vlm_judge", backend="openai", base_url=server.url, max_retries=1)
        judge.backend.backoff = 0.01
        assert torch.isnan(judge(torch.rand(1, 3, 8, 8), ["a"])).all()  # NaN, counted, not a crash
        assert judge.failures == {"failed after retries (HTTP 503)": 1}
        assert server.auth_headers == [None, None]  # no key in the environment: no header


def test_http_judge_timeout_is_retried_then_reported(monkeypatch):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts connections, never answers
    try:
        judge = get_reward(
            "vlm_judge",
            backend="openai",
            base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1",
            timeout=0.2,
            max_retries=1,
        )
        judge.backend.backoff = 0.01
        assert torch.isnan(judge(torch.rand(1, 3, 8, 8), ["a"])).all()
        assert list(judge.failures) == ["failed after retries (TimeoutError)"]
    finally:
        listener.close()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from mmalign.toy.tiny_rewards import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"))


def test_transformers_judge_reads_yes_probability_from_next_token_logits(tiny_vlm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    judge = get_reward("vlm_judge", model=str(tiny_vlm), device="cpu")
    x = torch.rand(2, 3, 32, 32)
    scores = judge(x, ["a red circle", "a cat"])
    assert scores.shape == (2,) and torch.all((scores > 0) & (scores < 1))

    # by hand: the chat template, the processor, the last-position logits of "Yes" vs "No"
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    proc = AutoProcessor.from_pretrained(tiny_vlm)
    from mmalign.rewards.judge import POINTWISE_IMAGE, to_pil

    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": POINTWISE_IMAGE.format(prompt="a cat")}],
        }
    ]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=to_pil(x[1:]), text=text, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16  # (32/8)^2 patches
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    vocab = proc.tokenizer.get_vocab()
    # spelling variants count together: "Yes"/"yes" vs "No"/"no" (all four are words of the tiny vocabulary)
    yes = logits[[vocab["Yes"], vocab["yes"]]].logsumexp(0)
    no = logits[[vocab["No"], vocab["no"]]].logsumexp(0)
    expected = torch.softmax(torch.stack([yes, no]), 0)[0]
    assert math.isclose(float(scores[1]), float(expected), rel_tol=1e-4)


def test_transformers_judge_pairwise_and_video(tiny_vlm):
    judge = get_reward("vlm_judge", model=str(tiny_vlm), device="cpu", num_frames=2)
    a, b = torch.rand(2, 3, 3, 32, 32), torch.rand(2, 3, 3, 32, 32)
    p_ab, p_ba = judge.pair_probs(a, b, ["a cat", "a dog"])
    assert p_ab.shape == p_ba.shape == (2, 2)
    assert torch.allclose(p_ab.sum(1), torch.ones(2))
    from mmalign.rewards.judge import pairwise_verdict

    assert torch.equal(judge.compare(a, b, ["a cat", "a dog"]), pairwise_verdict(p_ab, p_ba))
    assert judge(a, ["a cat", "a dog"]).shape == (2,)
