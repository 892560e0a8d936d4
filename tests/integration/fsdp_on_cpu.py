"""Run accelerate's real FSDP2 path on a CPU gloo group.

accelerate turns an FSDP config's launch environment into FSDP only for accelerator process groups (CUDA, XPU ...);
on CPU it runs plain data parallel. torch's FSDP2 itself runs on CPU with gloo, so this shim changes the one thing
accelerate decided, its distributed type, and everything after it is accelerate's own FSDP2 code: ``prepare``
shards each wrapped block with ``fully_shard``, re-points the optimizer at the sharded parameters, and
``clip_grad_norm_`` works on DTensors. Nothing in mmalign is patched.

    python fsdp_on_cpu.py train CONFIG [overrides]     # `mmalign train` under the shim (started by torchrun)
"""

from __future__ import annotations

import os
import sys


def force_fsdp_on_cpu() -> None:
    """When the environment asks for FSDP (``ACCELERATE_USE_FSDP``), make a CPU multi-process state an FSDP one."""
    import accelerate.state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = accelerate.state.AcceleratorState.__init__
    if getattr(init, "_fsdp_on_cpu", False):
        return

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if (
            os.environ.get("ACCELERATE_USE_FSDP") == "true"
            and self.distributed_type == DistributedType.MULTI_CPU
        ):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    patched._fsdp_on_cpu = True
    accelerate.state.AcceleratorState.__init__ = patched


if __name__ == "__main__":
    force_fsdp_on_cpu()
    from mmalign.cli import main

    sys.exit(main(sys.argv[1:]))
