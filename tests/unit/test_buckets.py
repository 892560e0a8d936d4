"""Aspect-ratio buckets (issue 12, item 7): the bucket list, the resize/crop to a bucket and its mirrored crop,
and batches that never mix buckets and replay exactly per (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from mmalign.data.images import mirror_crop, resize_crop, resized_shape


def test_sdxl_buckets_are_the_familiar_list():
    buckets = make_buckets(1024, 64, 2.0)
    for b in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (704, 1408)]:
        assert b in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.8 * 1024**2 < h * w <= 1024**2
        assert max(h, w) / min(h, w) <= 2.0
    assert (768, 1280) not in buckets  # dominated by (768, 1344)
    with pytest.raises(ValueError, match="bucket_step=48 must divide"):
        make_buckets(1024, 48)


def test_nearest_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(1024)
    assert buckets[nearest_bucket(832, 1216, buckets)] == (832, 1216)
    assert buckets[nearest_bucket(3000, 2000, buckets)] == (1216, 832)
    assert buckets[nearest_bucket(512, 512, buckets)] == (1024, 1024)
    assert buckets[nearest_bucket(100, 10_000, buckets)] == (704, 1408)  # clamped to the most elongated


@pytest.mark.parametrize(
    "original, bucket", [((300, 517), (48, 80)), ((517, 300), (80, 48)), ((90, 90), (48, 80))]
)
def test_resize_covers_the_bucket_and_the_mirrored_crop_is_the_flipped_crop(original, bucket):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (*original, 3), dtype=np.uint8))
    gen = torch.Generator().manual_seed(3)
    pix, orig, (top, left) = resize_crop(img, bucket, random_crop=True, generator=gen)
    assert pix.shape == (3, *bucket) and orig == original
    # the whole resized image, flipped, cropped at the mirrored (top, left) == the flipped crop
    full, _, _ = resize_crop(img, resized_shape(original, bucket))
    assert torch.equal(full[:, top : top + bucket[0], left : left + bucket[1]], pix)
    m_top, m_left = mirror_crop(original, (top, left), bucket)
    flipped = full.flip(-1)[:, m_top : m_top + bucket[0], m_left : m_left + bucket[1]]
    assert torch.equal(flipped, pix.flip(-1))


def test_square_resize_is_unchanged():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    a, _, crop_a = resize_crop(img, 32)
    b, _, crop_b = resize_crop(img, (32, 32))
    assert torch.equal(a, b) and crop_a == crop_b and a.shape == (3, 32, 32)
    assert mirror_crop((37, 53), crop_a, 32) == mirror_crop((37, 53), crop_a, (32, 32)) == (0, 45 - 32 - 6)


def test_batches_never_mix_buckets_and_replay_per_epoch():
    groups = [0, 1, 0, 2, 1, 0, 0, 1, 2, 1, 0, 2, 2]
    sampler = BucketBatchSampler(groups, 2, seed=5)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 2 + 2 + 2  # 5 // 2 + 4 // 2 + 4 // 2
    for batch in epoch0:
        assert len(batch) == 2 and len({groups[i] for i in batch}) == 1
    assert len({i for b in epoch0 for i in b}) == 12 and epoch0 == list(sampler)  # 13 items, one left over
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    ordered = list(BucketBatchSampler(groups, 2, shuffle=False))
    assert ordered == sorted(ordered) and ordered[0] == [0, 2]
