"""Trainable weights in bf16 with fp32 master copies in the optimizer (``train.trainable_dtype: bf16``).

By default the trained weights (LoRA or the whole denoiser) stay fp32 and autocast casts each one to bf16 in every
forward (``aten::copy_`` was the largest row of the eager SDXL LoRA step's GPU profile, BENCHMARKS.md; on a tiny
CPU step bf16 weights remove 276 of its 1,585 casts, and whether that pays on a GPU is still to be measured).
Storing them in bf16 removes those casts; updating bf16 weights directly would lose small updates to rounding (an update
below 2^-8 of a weight vanishes), so the optimizer keeps an fp32 master of each weight, steps the masters with the
gradients cast up, and writes the rounded result back into the model (the mixed-precision recipe of Micikevicius
et al., 2018, "master weights").

:class:`MasterWeights` wraps any optimizer the loop builds (AdamW, Adafactor, 8-bit AdamW). Its ``param_groups``
hold the model's bf16 weights, so accelerate, gradient clipping and the learning-rate schedule see what they
always see; its ``state_dict`` carries each master next to the inner optimizer's state, so a checkpoint resumes
exactly. Gradients are accumulated and (under DDP) all-reduced in bf16, then clipped and applied in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

MASTER = "master"  # the per-parameter state entry holding the fp32 master


class MasterWeights(torch.optim.Optimizer):
    """Casts ``params`` to ``dtype`` in place and optimizes fp32 copies of them with ``build(masters)``.

    Args:
        params: The trainable parameters (fp32). Their ``.data`` becomes ``dtype``.
        build: Makes the inner optimizer from a list of fp32 tensors (e.g. ``lambda ps: AdamW(ps, lr=...)``).
        dtype: What the model's copy is stored in.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        build: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        params = list(params)
        masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in params]
        self.inner = build(masters)
        if sum(len(g["params"]) for g in self.inner.param_groups) != len(params):
            raise ValueError("MasterWeights: the inner optimizer must hold every master, in order")
        for p in params:
            p.data = p.data.to(dtype)
        groups, start = [], 0
        for g in self.inner.param_groups:
            n = len(g["params"])
            groups.append({**_hyper(g), "params": params[start : start + n]})
            start += n
        super().__init__(groups, defaults=dict(self.inner.defaults))

    def _pairs(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            yield from zip(group["params"], inner["params"])

    @torch.no_grad()
    def master_grads(self) -> list[torch.Tensor]:
        """The masters, with the model's gradients cast up to fp32 as their ``.grad``: clip these, not the bf16
        weights, so the norm and the scale are computed in fp32 (in bf16 the clip factor alone is off by up to
        0.4%). :meth:`step` uses gradients already moved here as they are."""
        for p, m in self._pairs():
            if m.grad is None and p.grad is not None:
                m.grad = p.grad.to(torch.float32)
        return [m for _, m in self._pairs()]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Hyperparameters (the schedule's lr) and gradients to the masters, the inner step, masters back."""
        loss = closure() if closure is not None else None
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update(_hyper(group))
        self.master_grads()
        self.inner.step()
        for p, m in self._pairs():
            p.copy_(m)
            m.grad = None
        return loss

    def state_dict(self) -> dict[str, Any]:
        inner = self.inner.state_dict()
        masters = [m for _, m in self._pairs()]
        state = {i: {**inner["state"].get(i, {}), MASTER: m} for i, m in enumerate(masters)}
        groups = [
            {**_hyper(g), "params": ig["params"]} for g, ig in zip(self.param_groups, inner["param_groups"])
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {int(i): dict(entries) for i, entries in state_dict["state"].items()}
        pairs = list(self._pairs())
        if len(state) != len(pairs) or any(MASTER not in e for e in state.values()):
            raise ValueError(
                f"optimizer state holds {len(state)} entries, {sum(MASTER in e for e in state.values())} with an "
                f"fp32 master; this run trains {len(pairs)} bf16 weights (train.trainable_dtype=bf16)"
            )
        with torch.no_grad():
            for i, (p, m) in enumerate(pairs):
                m.copy_(state[i].pop(MASTER))
                p.copy_(m)
        self.inner.load_state_dict(
            {"state": {i: e for i, e in state.items() if e}, "param_groups": state_dict["param_groups"]}
        )
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(_hyper(saved))


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}
