"""Judge logic without a model: order-swap verdicts, response parsing, frame sampling."""

from __future__ import annotations

import math

import torch

from mmalign.rewards.judge import VLMJudge, pairwise_verdict, parse_option_probs, sample_frame_indices


def test_pairwise_verdict_needs_both_orders_to_agree():
    # rows: A wins both orders; B wins both; orders disagree (position bias); tie within margin; NaN
    p_ab = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.52, 0.48], [math.nan, math.nan]])
    p_ba = torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.8, 0.2], [0.45, 0.55], [0.1, 0.9]])
    assert pairwise_verdict(p_ab, p_ba).tolist() == [1, -1, 0, 1, 0]
    assert pairwise_verdict(p_ab, p_ba, tie_margin=0.1).tolist() == [1, -1, 0, 0, 0]


def test_parse_option_probs_from_top_logprobs_and_text():
    resp = {
        "choices": [
            {
                "message": {"content": "Yes"},
                "logprobs": {
                    "content": [
                        {
                            "token": "Yes",
                            "logprob": -0.5,
                            "top_logprobs": [
                                {"token": "Yes", "logprob": math.log(0.6)},
                                {"token": " yes", "logprob": math.log(0.1)},
                                {"token": "No", "logprob": math.log(0.2)},
                                {"token": "Maybe", "logprob": math.log(0.1)},
                            ],
                        }
                    ]
                },
            }
        ]
    }
    p = parse_option_probs(resp, ["Yes", "No"])
    assert math.isclose(p[0], 0.7 / 0.9) and math.isclose(p[1], 0.2 / 0.9)
    text_only = {"choices": [{"message": {"content": "Second."}}]}
    assert parse_option_probs(text_only, ["First", "Second"]) == [0.0, 1.0]
    assert all(
        math.isnan(v) for v in parse_option_probs({"choices": [{"message": {"content": "?"}}]}, ["Yes", "No"])
    )
    assert all(math.isnan(v) for v in parse_option_probs({"error": "x"}, ["Yes", "No"]))


def test_sample_frame_indices():
    assert sample_frame_indices(9, num_frames=3) == [0, 4, 8]
    assert sample_frame_indices(5, num_frames=10) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(5, num_frames=1) == [2]
    assert sample_frame_indices(16, sample_fps=2, video_fps=8) == [0, 4, 8, 12]


class ScriptedBackend:
    """Prefers the brighter of two images, but with a position bias on requests that show a dark image first."""

    def __init__(self, biased: bool = False):
        self.biased = biased
        self.requests = []

    def option_probs(self, requests, options):
        rows = []
        for images, text in requests:
            self.requests.append((len(images), text))
            if tuple(options) == ("Yes", "No"):
                b = sum(sum(im.convert("L").getdata()) for im in images) / (
                    255 * sum(im.size[0] * im.size[1] for im in images)
                )
                rows.append([b, 1 - b])
                continue
            half = len(images) // 2
            first = sum(sum(im.convert("L").getdata()) for im in images[:half])
            second = sum(sum(im.convert("L").getdata()) for im in images[half:])
            pick_first = first > second or (self.biased and first == 0)
            rows.append([0.9, 0.1] if pick_first else [0.1, 0.9])
        return torch.tensor(rows)


def test_judge_asks_both_orders_and_maps_the_swap_back():
    a = torch.ones(2, 3, 8, 8)
    b = torch.zeros(2, 3, 8, 8)
    backend = ScriptedBackend()
    judge = VLMJudge(backend)
    assert judge.compare(a, b, ["x", "y"]).tolist() == [1, 1]
    assert judge.compare(b, a, ["x", "y"]).tolist() == [-1, -1]
    assert len(backend.requests) == 8 and all(n == 2 for n, _ in backend.requests)
    # a backend that says "first" whenever a dark image comes first disagrees with itself across orders -> tie
    biased = VLMJudge(ScriptedBackend(biased=True))
    assert biased.compare(a * 0.5, b, ["x", "y"]).tolist() == [0, 0]
    assert biased.compare(b, a * 0.5, ["x", "y"]).tolist() == [0, 0]
    assert biased.compare(a * 0.5, a * 0.25, ["x", "y"]).tolist() == [1, 1]  # no dark image: no bias


def test_judge_pointwise_video_and_segments():
    backend = ScriptedBackend()
    judge = VLMJudge(backend, num_frames=3)
    v = torch.zeros(1, 9, 3, 4, 4)
    v[:, ::2] = 1.0  # frames 0, 2, 4, 6, 8 white -> sampled 0, 4, 8 all white
    assert torch.allclose(judge(v, ["p"]), torch.ones(1))
    assert backend.requests[-1][0] == 3 and "video" in backend.requests[-1][1]
    a = torch.zeros(1, 8, 3, 4, 4)
    b = torch.zeros(1, 8, 3, 4, 4)
    a[:, :4] = 1.0  # A better in segment 0
    b[:, 4:] = 1.0  # B better in segment 1
    assert judge.compare_segments(a, b, ["p"], segment_frames=4).tolist() == [[1, -1]]
