"""Host memory and time of each process while an FSDP2 run resumes its weights from a checkpoint file: the
previous code (every process opens the whole file, and ``distribute_tensor`` sends rank 0's copy of each full
tensor to the others) vs each process reading only the rows it holds (``StoredTensors.read_like``, what
``apply_checkpoint`` does now; no communication).

Writes one safetensors file of ``--gb`` GB (float32 matrices with an odd row count, as a checkpoint's
``optimizer.safetensors``), then runs ``--procs`` gloo processes (torchrun) once per mode, in separate process
groups so one mode cannot inherit the other's memory. Each process builds a model of those shapes sharded with
FSDP2's ``fully_shard`` (on the meta device, then materialised: it holds only its shards) and loads every tensor
into its shard:

- ``scatter``: ``safetensors.torch.load_file``, then ``distribute_tensor`` of each full tensor (rank 0's data);
- ``sliced``: ``StoredTensors(path).read_like(key, param)``: only this process's rows are read.

Both are checked, not only timed: every process's shard must equal its rows of the stored tensor exactly
(``same_weights``; uneven shards and one a process holds none of), and the sliced load must read no whole tensor
(``sliced_whole_tensor_reads``).

Reported per mode and process: the file's pages resident in the process's mappings once every tensor is loaded
(``/proc/self/smaps``: what it read of the file, plus the kernel's read-around of each page fault), the largest
growth of ``RssAnon`` (private memory: copies, communication buffers; sampled after every tensor) over its level
before reading, and the seconds the load took. safetensors 0.8 maps the file rather than copying it, so a file page counts once read.

    python bench/bench_resume_memory.py --gb 2 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _anon_mb() -> float:
    """This process's private resident memory (``RssAnon``), MB (Linux)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


def _file_pages_mb(path: str) -> float:
    """Resident pages of the file at ``path`` in this process's mappings (``/proc/self/smaps``), MB."""
    mapped, kb = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(
            ":"
        ):  # a mapping's first line: range, perms, offset, dev, inode, path
            mapped = len(head) >= 6 and head[5] == path
        elif mapped and head[0] == "Rss:":
            kb += int(head[1])
    return kb / 1024


def shapes(gb: float, cols: int = 2048) -> dict[str, tuple[int, int]]:
    """float32 matrices adding up to ``gb``, with an odd row count so the shards are uneven, and one single-row
    matrix, of which every process but the first holds no row."""
    rows = 1023
    n = max(1, round(gb * 1e9 / (rows * cols * 4)))
    return {**{f"layers.{i}.weight": (rows, cols) for i in range(n)}, "head.weight": (1, cols)}


def worker(mode: str, path: str, gb: float) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from mmalign.trainers.checkpoint import StoredTensors
    from mmalign.trainers.sharding import local_region

    class Counted(StoredTensors):  # counts whole-tensor reads: a sharded load should make none
        whole_reads = 0

        def __getitem__(self, key):
            Counted.whole_reads += 1
            return super().__getitem__(key)

    dist.init_process_group("gloo")
    with torch.device("meta"):
        model = torch.nn.ParameterDict(
            {k.replace(".", "_"): torch.nn.Parameter(torch.empty(s)) for k, s in shapes(gb).items()}
        )
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()  # the shards' own pages, touched before the level is taken
    params = {k: model[k.replace(".", "_")] for k in shapes(gb)}
    before = peak = _anon_mb()
    dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "scatter":
            from safetensors.torch import load_file
            from torch.distributed.tensor import distribute_tensor

            full = load_file(path)
            source = lambda key, p: distribute_tensor(full[key], p.device_mesh, p.placements)  # noqa: E731
        else:
            source = Counted(Path(path)).read_like
        for key, p in params.items():
            p.copy_(source(key, p))
            peak = max(peak, _anon_mb())
    seconds = time.perf_counter() - t0
    file_mb = _file_pages_mb(path)  # the file is still mapped, and mapped pages only accumulate
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:  # every shard is exactly its rows of the stored tensor
        exact = all(torch.equal(p.to_local(), f.get_slice(k)[local_region(p)]) for k, p in params.items())
    held = sum(p.to_local().numel() for p in params.values())
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (file_mb, peak - before, seconds, exact, held, Counted.whole_reads))
    if dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    "mode": mode,
                    "file_pages_mb": [round(r[0], 1) for r in rows],
                    "rss_anon_growth_mb": [round(r[1], 1) for r in rows],
                    "seconds": [round(r[2], 3) for r in rows],
                    "exact": all(r[3] for r in rows),
                    "elements": sum(r[4] for r in rows),
                    "whole_tensor_reads": [r[5] for r in rows],
                }
            )
        )
    dist.destroy_process_group()
    # The model's device mesh keeps the gloo group, and its worker threads, alive past destroy_process_group. A
    # worker thread that drops the last collective's Python-owned tensors while the interpreter finalises aborts
    # the process (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489; about 1 run
    # in 10 here). Everything is printed, so leave without finalising.
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the stored tensors")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["scatter", "sliced"],
        default=["scatter", "sliced"],
        help="loads to run",
    )
    args = parser.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimizer.safetensors"
        gen = torch.Generator().manual_seed(0)
        save_file({k: torch.randn(s, generator=gen) for k, s in shapes(args.gb).items()}, str(path))
        file_gb = path.stat().st_size / 1e9
        for mode in args.modes:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs)]
            cmd += ["--master_port", str(port), __file__, "--worker", mode, str(path), str(args.gb)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"{mode}: {out.stderr[-8000:]}")
            rows[mode] = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    result = {"file_gb": round(file_gb, 3), "procs": args.procs}
    for m, row in rows.items():
        result.update({f"{m}_{k}": row[k] for k in ("file_pages_mb", "rss_anon_growth_mb", "seconds")})
    total = sum(a * b for a, b in shapes(args.gb).values())
    result["same_weights"] = all(r["exact"] and r["elements"] == total for r in rows.values())
    if "sliced" in rows:
        result["sliced_whole_tensor_reads"] = rows["sliced"]["whole_tensor_reads"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main()
