"""Resident memory while iterating a Pick-a-Pic-layout dataset: Arrow-backed records vs a Python list of bytes.

Writes a synthetic Pick-a-Pic v2 parquet (caption, jpg_0, jpg_1, label_0, user_id; random-noise JPEGs, ~12% ties)
of ``--pairs`` rows, then in *separate processes* (so one cannot inherit the other's memory):

- ``arrow``: ``load_pairs`` (memory-mapped Arrow; only an index of usable rows in Python) and a DataLoader with
  2 workers decoding every pair through ``PairDataset``;
- ``list``: the previous design, every record's JPEG bytes materialised in a Python list first, then the same
  DataLoader.

RSS is sampled from ``/proc/self/status`` every 10% of the pass: ``RssAnon`` (process-private memory, what a list
of bytes grows) and ``RssFile`` (pages of the memory-mapped Arrow file that were read: page cache the kernel can
drop, not private memory).

    python bench/bench_pickapic_memory.py --pairs 20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(pid: int | str) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def rss_mb() -> dict[str, float]:
    """This process's RSS and the DataLoader workers' (``workers_RssAnon``: their private memory, summed)."""
    import psutil

    out = _status("self")
    anon = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            anon += _status(child.pid).get("RssAnon", 0.0)
        except (FileNotFoundError, ProcessLookupError):
            continue
    out["workers_RssAnon"] = anon
    return out


def write_parquet(path: Path, n: int, side: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, 1000):
        rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "user_id": []}
        for i in range(start, min(n, start + 1000)):
            for key in ("jpg_0", "jpg_1"):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
                    buf, "JPEG", quality=90
                )
                rows[key].append(buf.getvalue())
            rows["caption"].append(f"prompt {i}")
            rows["label_0"].append(float(rng.choice([0.0, 1.0, 0.5], p=[0.44, 0.44, 0.12])))
            rows["user_id"].append(int(rng.integers(0, 1000)))
        table = pa.table(rows)
        writer = writer or pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def run_pass(mode: str, source: str, resolution: int) -> dict:
    import torch

    from mmalign.data.pairs import PairDataset, collate_pairs, load_pairs

    torch.set_num_threads(1)
    if mode == "prepare":  # convert the parquet to the datasets Arrow cache once, outside the measured runs
        load_pairs(source)
        return {}
    before = rss_mb()
    t0 = time.time()
    records, counts = load_pairs(source)
    if mode == "list":
        records = [records[i] for i in range(len(records))]  # the old design: every pair's bytes in Python
    loaded = rss_mb()
    dataset = PairDataset(records, resolution, random_flip=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=collate_pairs)
    samples, seen, every = [], 0, max(1, len(dataset) // 10)
    for batch in loader:
        seen += len(batch["prompt"])
        if seen // every > len(samples) - 1:
            samples.append({"items": seen, **rss_mb()})
    return {
        "mode": mode,
        "pairs": len(dataset),
        "rows": counts["rows"],
        "seconds": round(time.time() - t0, 1),
        "before": before,
        "after_load": loaded,
        "during": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=96, help="JPEG side in pixels")
    parser.add_argument("--resolution", type=int, default=32, help="decode resolution")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_pass(args.worker[0], args.worker[1], args.resolution)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="pickapic-bench-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-cache"), "PYTHONPATH": str(ROOT)}
    parquet = tmp / "train-00000.parquet"
    t0 = time.time()
    write_parquet(parquet, args.pairs, args.side)
    print(
        f"wrote {parquet} ({parquet.stat().st_size / 1e6:.0f} MB, {args.pairs} pairs) in {time.time() - t0:.0f} s"
    )
    subprocess.run(
        [sys.executable, __file__, "--worker", "prepare", str(parquet)],
        env=env,
        check=True,
        capture_output=True,
    )
    results = []
    for mode in ("arrow", "list"):
        proc = subprocess.run(
            [sys.executable, __file__, "--resolution", str(args.resolution), "--worker", mode, str(parquet)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        anon = [s["RssAnon"] for s in res["during"]]
        workers = [s["workers_RssAnon"] for s in res["during"]]
        print(
            f"{mode:5s}: {res['pairs']} usable pairs of {res['rows']} rows, {res['seconds']} s; main RssAnon MB "
            f"before {res['before']['RssAnon']:.0f}, after load {res['after_load']['RssAnon']:.0f}, while iterating "
            f"{min(anon):.0f}..{max(anon):.0f}; 2 workers' RssAnon {min(workers):.0f}..{max(workers):.0f}; "
            f"main RssFile (mapped Arrow pages, page cache) up to {max(s['RssFile'] for s in res['during']):.0f}"
        )
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    print(f"details: {tmp / 'results.json'}")


if __name__ == "__main__":
    main()
