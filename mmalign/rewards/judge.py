"""VLM judge: pointwise P("Yes") (VQAScore-style) and pairwise with order swap, for images and video frames.

Backends answer one question: given requests (a list of PIL images plus a text) and the answer options,
return the probability of each option normalised over the options, [N, K]. Two backends:

- :class:`TransformersJudgeBackend`: a local transformers vision-language model (``AutoModelForImageTextToText``
  + ``AutoProcessor`` with a chat template); reads the next-token logits, summing over each option's
  spelling variants ("Yes", " Yes", "yes").
- :class:`OpenAIJudgeBackend`: an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, sglang, OpenAI)
  asked for one token with ``top_logprobs``; falls back to the answer text when the server gives no
  logprobs. The API key is read from an environment variable at request time and never logged or stored.
  Timeouts, retries with exponential backoff on 429/5xx/connection errors, bounded concurrency. Redirects
  are never followed (the key would travel to wherever the ``Location`` points); error bodies are redacted.

A request that fails or whose reply cannot be read yields NaN (mask it; flow_grpo silently scores such
samples 0), and its reason is counted in ``backend.failures`` (``mmalign score`` prints the counts).

Pairwise: the pair is asked in both orders; the order-swapped answer is mapped back, and the verdict is
+1 (first better), -1 (second better), or 0 (tie) when the two orders disagree or a margin is not met
(:func:`pairwise_verdict`). DenseDPO segment labels come from :meth:`VLMJudge.compare_segments`.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

JudgeRequest = tuple[list[Any], str]  # (PIL images, question text)

POINTWISE_IMAGE = 'Does this image show "{prompt}"? Please answer Yes or No.'
POINTWISE_VIDEO = 'Do these frames of a video show "{prompt}"? Please answer Yes or No.'
PAIRWISE_IMAGE = (
    'Two images were generated for the prompt "{prompt}". Which one matches the prompt better '
    "and looks better, the first or the second? Please answer First or Second."
)
PAIRWISE_VIDEO = (
    'Two videos were generated for the prompt "{prompt}"; the first {n} frames are the first video, '
    "the next {n} the second. Which video is better, the first or the second? "
    "Please answer First or Second."
)


class JudgeBackend(Protocol):
    """Probabilities of answer options for VLM requests."""

    def option_probs(self, requests: Sequence[JudgeRequest], options: Sequence[str]) -> torch.Tensor:
        """Args: requests (images, text); options, e.g. ("Yes", "No"). Returns [N, K] (rows sum to 1, or NaN)."""
        ...


def pairwise_verdict(p_ab: torch.Tensor, p_ba: torch.Tensor, tie_margin: float = 0.0) -> torch.Tensor:
    """Combine the two orders of a pairwise question into +1 / 0 / -1 for "A better than B".

    Args:
        p_ab: [N, 2] probabilities of ("First", "Second") with A shown first.
        p_ba: [N, 2] the same with B shown first (so "Second" means A).
        tie_margin: An order whose |P(first) - P(second)| <= margin counts as a tie in that order.

    Returns:
        [N] int64: +1 when both orders prefer A, -1 when both prefer B, 0 otherwise (disagreement, tie,
        or NaN in either order).
    """

    def decide(pref_a: torch.Tensor, pref_b: torch.Tensor) -> torch.Tensor:
        diff = pref_a - pref_b
        out = torch.sign(diff).long()
        return torch.where(diff.abs() <= tie_margin, torch.zeros_like(out), out)

    d1 = decide(p_ab[:, 0], p_ab[:, 1])
    d2 = decide(p_ba[:, 1], p_ba[:, 0])
    valid = ~(p_ab.isnan().any(1) | p_ba.isnan().any(1))
    return torch.where((d1 == d2) & valid, d1, torch.zeros_like(d1))


def to_pil(frames: torch.Tensor) -> list[Any]:
    """[N,3,H,W] float in [0, 1] -> N RGB PIL images."""
    from PIL import Image

    arr = (
        (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in arr]


def sample_frame_indices(
    n_frames: int,
    num_frames: int | None = None,
    sample_fps: float | None = None,
    video_fps: float | None = None,
) -> list[int]:
    """Indices of frames to show the judge: ``num_frames`` evenly spaced, or every 1/sample_fps seconds.

    Args:
        n_frames: Frames in the clip.
        num_frames: How many to take, evenly spaced including both ends.
        sample_fps: Take frames at this rate (needs ``video_fps``).
        video_fps: The clip's frame rate.
    """
    if sample_fps:
        if not video_fps:
            raise ValueError("sampling by fps needs the clip's fps (video_fps or the call's fps=)")
        step = max(1, round(video_fps / sample_fps))
        return list(range(0, n_frames, step))
    k = min(num_frames or n_frames, n_frames)
    if k == 1:
        return [n_frames // 2]
    return sorted({round(i * (n_frames - 1) / (k - 1)) for i in range(k)})


@dataclass
class VLMJudge:
    """Pointwise and pairwise judging with a :class:`JudgeBackend`.

    Attributes:
        backend: The model or endpoint.
        question / video_question: Pointwise templates (``{prompt}``).
        pair_question / pair_video_question: Pairwise templates (``{prompt}``, ``{n}`` frames per video).
        yes_no: Pointwise answer options; the score is P(first option).
        first_second: Pairwise answer options.
        num_frames: Frames sampled per video (evenly spaced).
        sample_fps: Alternatively sample at this rate (needs the clip fps).
        fps: The clips' frame rate when the call gives none.
        tie_margin: See :func:`pairwise_verdict`.
    """

    backend: JudgeBackend
    question: str = POINTWISE_IMAGE
    video_question: str = POINTWISE_VIDEO
    pair_question: str = PAIRWISE_IMAGE
    pair_video_question: str = PAIRWISE_VIDEO
    yes_no: tuple[str, str] = ("Yes", "No")
    first_second: tuple[str, str] = ("First", "Second")
    num_frames: int | None = 4
    sample_fps: float | None = None
    fps: float | None = None
    tie_margin: float = 0.0
    accepts_fps: bool = field(default=True, repr=False)

    @property
    def failures(self) -> collections.Counter | None:
        """Requests scored NaN, by reason (the HTTP backend counts them; None for a local model)."""
        return getattr(self.backend, "failures", None)

    def _frames(self, item: torch.Tensor, fps: float | None) -> list[Any]:
        if item.ndim == 3:
            return to_pil(item.unsqueeze(0))
        idx = sample_frame_indices(item.shape[0], self.num_frames, self.sample_fps, fps or self.fps)
        return to_pil(item[idx])

    def __call__(self, media: torch.Tensor, prompts: Sequence[str], fps: float | None = None) -> torch.Tensor:
        """P(Yes) that each item shows its prompt.

        Args:
            media: [B,3,H,W] images or [B,T,3,H,W] videos in [0, 1].
            prompts: B prompts.
            fps: Clip frame rate for fps-based frame sampling.

        Returns:
            [B] float in [0, 1] (NaN where the backend's answer could not be read).
        """
        template = self.video_question if media.ndim == 5 else self.question
        requests = [(self._frames(m, fps), template.format(prompt=p)) for m, p in zip(media, prompts)]
        return self.backend.option_probs(requests, self.yes_no)[:, 0].to(media.device)

    def pair_probs(
        self, media_a: torch.Tensor, media_b: torch.Tensor, prompts: Sequence[str], fps: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ask each pair in both orders. Returns (p_ab, p_ba), each [B, 2] over ("First", "Second")."""
        if media_a.shape[0] != media_b.shape[0] or media_a.shape[0] != len(prompts):
            raise ValueError("compare needs as many A items, B items and prompts")
        requests = []
        for a, b, p in zip(media_a, media_b, prompts):
            fa, fb = self._frames(a, fps), self._frames(b, fps)
            template = self.pair_video_question if a.ndim == 4 else self.pair_question
            text = template.format(prompt=p, n=len(fa))
            requests += [(fa + fb, text), (fb + fa, text)]
        probs = self.backend.option_probs(requests, self.first_second)
        return probs[0::2], probs[1::2]

    def compare(
        self, media_a: torch.Tensor, media_b: torch.Tensor, prompts: Sequence[str], fps: float | None = None
    ) -> torch.Tensor:
        """Pairwise verdicts: [B] int64, +1 (A better), -1 (B better), 0 (tie / orders disagree)."""
        return pairwise_verdict(*self.pair_probs(media_a, media_b, prompts, fps), self.tie_margin)

    def compare_segments(
        self,
        video_a: torch.Tensor,
        video_b: torch.Tensor,
        prompts: Sequence[str],
        segment_frames: int,
        fps: float | None = None,
    ) -> torch.Tensor:
        """Per-segment verdicts for DenseDPO: [B, S] with S = ceil(T / segment_frames).

        Args:
            video_a: [B,T,3,H,W].
            video_b: [B,T,3,H,W] (same T).
            prompts: B prompts.
            segment_frames: Frames per segment (1 s = fps frames in DenseDPO).
            fps: Clip frame rate.
        """
        t = video_a.shape[1]
        cols = [
            self.compare(video_a[:, s : s + segment_frames], video_b[:, s : s + segment_frames], prompts, fps)
            for s in range(0, t, segment_frames)
        ]
        return torch.stack(cols, 1)


def _option_token_ids(tokenizer: Any, option: str) -> list[int]:
    ids = set()
    for variant in {option, " " + option, option.lower(), " " + option.lower(), option.capitalize()}:
        toks = tokenizer.encode(variant, add_special_tokens=False)
        if toks and toks[0] != getattr(tokenizer, "unk_token_id", None):
            ids.add(toks[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer cannot spell the answer option {option!r}")
    return sorted(ids)


@dataclass
class TransformersJudgeBackend:
    """A local transformers VLM read through its next-token logits.

    Attributes:
        model: An ``AutoModelForImageTextToText`` (e.g. Qwen2.5-VL, LLaVA), eval mode.
        processor: Its ``AutoProcessor`` (with a chat template).
        device: Where the model lives.
    """

    model: Any
    processor: Any
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def option_probs(self, requests: Sequence[JudgeRequest], options: Sequence[str]) -> torch.Tensor:
        """[N, K] next-token probabilities of the options, renormalised over the options."""
        tok = self.processor.tokenizer
        option_ids = [_option_token_ids(tok, o) for o in options]
        rows = []
        for images, text in requests:
            messages = [
                {
                    "role": "user",
                    "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}],
                }
            ]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(images=images, text=prompt, return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits[0, -1].float()
            option_logits = torch.stack([logits[ids].logsumexp(0) for ids in option_ids])
            rows.append(option_logits.softmax(0).cpu())
        return torch.stack(rows)


logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 16 << 20  # a one-token chat completion is a few KB


class JudgeFailure(Exception):
    """One judge request that produced no score: ``reason`` is the short kind that is counted."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None  # urllib then raises HTTPError(3xx): nothing is re-sent, to any host


_OPENER = urllib.request.build_opener(_NoRedirect)
_SECRETS = re.compile(r"(Bearer\s+)\S+|\bsk-[A-Za-z0-9_\-]{8,}", re.IGNORECASE)


def _redact(text: str, key: str | None) -> str:
    """``text`` with the API key, any bearer token and any ``sk-...`` key replaced by ``***``."""
    if key:
        text = text.replace(key, "***")
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "***", text)


@dataclass
class OpenAIJudgeBackend:
    """An OpenAI-compatible chat-completions endpoint asked for one token with top logprobs.

    Attributes:
        base_url: e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: Model name the server expects.
        api_key_env: Environment variable holding the API key (read per request, never stored or logged);
            None or unset sends no Authorization header.
        timeout: Seconds per HTTP request.
        max_retries: Retries after the first try on 429/5xx/connection errors/timeouts.
        backoff: Base seconds of exponential backoff (``backoff * 2**attempt``, plus up to 10% jitter).
        max_concurrency: Requests in flight at once.
        top_logprobs: Alternatives requested per token.
        max_side: Images are downscaled so their longer side is at most this before base64 PNG encoding.
    """

    base_url: str
    model: str = "default"
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    max_concurrency: int = 8
    top_logprobs: int = 20
    max_side: int = 512
    failures: collections.Counter = field(default_factory=collections.Counter, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def _encode(self, image: Any) -> str:
        image = image.copy()
        image.thumbnail((self.max_side, self.max_side))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def _post(self, payload: dict[str, Any]) -> Any:
        """POST with retries; the parsed JSON reply. Raises :class:`JudgeFailure` (redacted) otherwise."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(payload).encode()
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    body = resp.read(MAX_REPLY_BYTES + 1)
                break
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:  # never follow: the request (and its key) would go to the Location
                    where = urllib.parse.urlsplit(e.headers.get("Location") or "").netloc or "elsewhere"
                    raise JudgeFailure(
                        f"redirect refused (HTTP {e.code})",
                        f"judge endpoint {url} redirected to {_redact(where, key)}; set base_url to the "
                        "final address (redirects are not followed, so the API key stays put)",
                    ) from None
                if e.code not in (408, 429, 500, 502, 503, 504):
                    text = _redact(e.read(300).decode(errors="replace"), key)
                    raise JudgeFailure(
                        f"HTTP {e.code}", f"judge endpoint {url} answered HTTP {e.code}: {text}"
                    ) from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {_redact(str(getattr(e, 'reason', e)), key)}"
            if attempt < self.max_retries:
                delay = self.backoff * 2**attempt
                time.sleep(delay + random.uniform(0, 0.1 * delay))
        else:
            raise JudgeFailure(
                f"failed after retries ({last.split(':')[0]})",
                f"judge endpoint {url} failed after {self.max_retries + 1} tries (last: {last})",
            )
        if len(body) > MAX_REPLY_BYTES:
            raise JudgeFailure(
                "reply too large", f"judge endpoint {url} sent more than {MAX_REPLY_BYTES} bytes"
            )
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise JudgeFailure(
                "reply is not JSON",
                f"judge endpoint {url}: reply is not JSON: "
                f"{_redact(body[:120].decode(errors='replace'), key)}",
            ) from None

    def _one(self, request: JudgeRequest, options: Sequence[str]) -> list[float]:
        images, text = request
        content = [
            *({"type": "image_url", "image_url": {"url": self._encode(im)}} for im in images),
            {"type": "text", "text": text},
        ]
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        try:
            reply = self._post(payload)
            if (
                not isinstance(reply, dict)
                or not isinstance(reply.get("choices"), list)
                or not reply["choices"]
            ):
                raise JudgeFailure("reply has no choices", "judge reply has no `choices` list")
            probs = parse_option_probs(reply, options)
            if any(math.isnan(p) for p in probs):
                raise JudgeFailure("no answer option in reply", f"judge reply names none of {list(options)}")
            return probs
        except JudgeFailure as failure:
            self._count(failure)
            return [math.nan] * len(options)

    def _count(self, failure: JudgeFailure) -> None:
        with self._lock:
            first = failure.reason not in self.failures
            self.failures[failure.reason] += 1
        if first:  # one warning per kind of failure, not one per request
            logger.warning("judge request scored NaN: %s", failure.detail)

    def option_probs(self, requests: Sequence[JudgeRequest], options: Sequence[str]) -> torch.Tensor:
        """[N, K] option probabilities from the first answer token's top logprobs (NaN row if unreadable)."""
        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            rows = list(pool.map(lambda r: self._one(r, options), requests))
        return torch.tensor(rows, dtype=torch.float32)


def parse_option_probs(response: dict[str, Any], options: Sequence[str]) -> list[float]:
    """Option probabilities from a chat-completions response (top logprobs, else the answer text).

    Returns:
        K floats summing to 1, or K NaNs when no option can be read.
    """
    try:
        return _parse_option_probs(response, options)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError):  # a malformed reply
        return [math.nan] * len(options)


def _parse_option_probs(response: dict[str, Any], options: Sequence[str]) -> list[float]:
    keys = [o.strip().lower() for o in options]
    mass = [0.0] * len(options)
    choice = response["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    if content:
        first = content[0]
        alternatives = first.get("top_logprobs") or [first]
        for alt in alternatives:
            token = str(alt.get("token", "")).strip().lower()
            if token in keys:
                mass[keys.index(token)] += math.exp(float(alt["logprob"]))
    if sum(mass) <= 0:
        text = str((choice.get("message") or {}).get("content") or "").strip().lower()
        for i, k in enumerate(keys):
            if text.startswith(k):
                mass[i] = 1.0
                break
    total = sum(mass)
    return [m / total for m in mass] if 0 < total < math.inf else [math.nan] * len(options)


def vlm_judge(
    model: str | None = None,
    *,
    backend: str = "transformers",
    base_url: str | None = None,
    api_key_env: str | None = "OPENAI_API_KEY",
    question: str | None = None,
    pair_question: str | None = None,
    num_frames: int | None = 4,
    sample_fps: float | None = None,
    fps: float | None = None,
    tie_margin: float = 0.0,
    timeout: float = 60.0,
    max_retries: int = 3,
    max_concurrency: int = 8,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> VLMJudge:
    """VLM judge reward: P("Yes") the media shows the prompt; ``.compare`` for pairwise verdicts.

    Args:
        model: transformers hub id / directory (``transformers`` backend) or the served model name (``openai``).
        backend: ``transformers`` (local) or ``openai`` (OpenAI-compatible HTTP endpoint).
        base_url: Endpoint base URL for ``openai``, e.g. ``http://localhost:8000/v1``.
        api_key_env: Environment variable with the API key (``openai`` only).
        question: Pointwise template with ``{prompt}``.
        pair_question: Pairwise template with ``{prompt}``.
        num_frames: Video frames shown to the judge (evenly spaced).
        sample_fps: Or sample frames at this rate.
        fps: Default clip frame rate.
        tie_margin: Per-order tie margin for pairwise verdicts.
        timeout: HTTP timeout in seconds.
        max_retries: HTTP retries.
        max_concurrency: HTTP requests in flight.
        device: Device of a local model.
        dtype: dtype of a local model.
    """
    if backend == "openai":
        if not base_url:
            raise ValueError("vlm_judge(backend='openai') needs base_url, e.g. http://localhost:8000/v1")
        be: JudgeBackend = OpenAIJudgeBackend(
            base_url, model or "default", api_key_env, timeout, max_retries, max_concurrency=max_concurrency
        )
    elif backend == "transformers":
        if not model:
            raise ValueError("vlm_judge(backend='transformers') needs model (a hub id or local directory)")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(dev).eval()
        be = TransformersJudgeBackend(vlm, AutoProcessor.from_pretrained(model), dev)
    else:
        raise ValueError(f"backend={backend!r}: use transformers or openai")
    judge = VLMJudge(be, num_frames=num_frames, sample_fps=sample_fps, fps=fps, tie_margin=tie_margin)
    if question:
        judge.question = judge.video_question = question
    if pair_question:
        judge.pair_question = judge.pair_video_question = pair_question
    return judge
