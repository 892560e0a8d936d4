"""mmalign/trainers/sharding.py outside FSDP (the identity), and what refuses to run sharded.

The sharded paths themselves run on 2 gloo processes in tests/integration/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from mmalign.trainers.sharding import full_state_dict, gathered, is_sharded, local_region, shard_from


def test_plain_tensors_pass_through():
    net = torch.nn.Linear(3, 2)
    assert not is_sharded(net.parameters())
    w = net.weight.detach()
    assert gathered(w) is w and local_region(w) is None
    assert shard_from(lambda region: torch.ones(2, 3) if region is None else None, w).equal(torch.ones(2, 3))
    with full_state_dict(net) as same:
        assert same is net and "state_dict" not in vars(net)  # nothing shadowed outside FSDP


def test_self_npo_teacher_refuses_sharded_weights(monkeypatch):
    """FSDP2 gathers from its own shard storage, so swapping the EMA teacher into p.data would silently leave the
    student in place: refused with the config to use instead."""
    from mmalign.config import ConfigError
    from mmalign.trainers import self_npo

    monkeypatch.setattr(self_npo, "is_sharded", lambda params: True)
    with pytest.raises(ConfigError, match="self_npo under FSDP.*ddp_multi_gpu.yaml"):
        self_npo.EMATeacher(torch.nn.Linear(3, 2))
