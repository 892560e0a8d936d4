"""Run the fuzz cases of ``cases.py`` through ``python -m mmalign`` and tabulate what happened.

Each case runs in its own folder, in a subprocess with a wall-clock timeout and an address-space limit
(``resource.setrlimit(RLIMIT_AS)`` in ``preexec_fn``). Outcomes:

- ``ok``: the expected class (exit 2 with a one-line ``mmalign <command>: ...`` message, or exit 0 with every
  unreadable item reported);
- ``traceback``: a Python traceback on stderr, exit 1, or exit 3 (an internal error: the program, not the
  input, failed);
- ``hang``: killed at the timeout; ``oom``: out of memory (``MemoryError``/allocation failure, or killed);
- ``silent``: garbage accepted (exit 0 where an error was expected, or bad items not reported);
- ``rejected``: a good input refused (exit 2 where exit 0 was expected).

Usage::

    python tests/fuzz/run.py --cases 1000 --seed 0 --jobs 2            # the full run (docs/reliability.md)
    python tests/fuzz/run.py --cases 40 --only validate --show-failures  # a quick look
    python tests/fuzz/run.py --cases 1000 --rerun-failures full.json      # only what failed last time
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import DIR, FIFO, Case, generate, png  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUTCOMES = ["ok", "traceback", "hang", "oom", "silent", "rejected"]
OOM_MARKERS = (
    "MemoryError",
    "Cannot allocate memory",
    "can't allocate memory",
    "failed to map segment",
    "std::bad_alloc",
    "out of memory",
)


def build_fixtures(fx: Path) -> Path:
    """Shared inputs: a tiny SD1.5 pipeline, 4 good pairs, an image over the pixel limit."""
    import numpy as np
    from PIL import Image

    if (fx / ".done").exists():
        return fx
    fx.mkdir(parents=True, exist_ok=True)
    from mmalign.toy.tiny import build_tiny_sd15

    build_tiny_sd15(fx / "tiny")
    (fx / "img").mkdir(exist_ok=True)
    rows = []
    for k in range(4):
        for side, colour in (("w", (220, 30, 30)), ("l", (30, 30, 220))):
            arr = np.full((20, 24, 3), 128, np.uint8)
            arr[4:12, 4 + k : 12 + k] = colour
            Image.fromarray(arr).save(fx / "img" / f"{k}_{side}.png")
        rows.append({"prompt": "a red square", "chosen": f"img/{k}_w.png", "rejected": f"img/{k}_l.png"})
    (fx / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (fx / "media").mkdir(exist_ok=True)
    Image.new("L", (6500, 6500)).save(fx / "media" / "big.png")  # 42 M pixels, 40 KB on disk
    (fx / "media" / "ok.png").write_bytes(png())
    (fx / ".done").write_text("ok")
    return fx


def materialize(case: Case, folder: Path, fx: Path) -> list[str]:
    """Write the case's files; return its argv with placeholders filled."""

    def fill(text: str) -> str:
        return text.replace("{dir}", str(folder)).replace("{fx}", str(fx))

    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in case.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == FIFO:
            os.mkfifo(path)
        elif content == DIR:
            path.mkdir(exist_ok=True)
        elif isinstance(content, tuple) and content[0] == "symlink":
            os.symlink(fill(content[1]), path)
        elif isinstance(content, tuple) and content[0] == "copy":
            shutil.copyfile(fill(content[1]), path)
        elif isinstance(content, bytes):
            if rel.endswith((".yaml", ".jsonl", ".csv")):
                content = content.replace(b"{dir}", str(folder).encode()).replace(b"{fx}", str(fx).encode())
            path.write_bytes(content)
    return [fill(a) for a in case.argv]


def classify(case: Case, rc: int | None, out: str, err: str, log: str) -> tuple[str, str]:
    """(outcome, a short note) for one finished (or timed-out, ``rc=None``) run."""
    if rc is None:
        return "hang", "timeout"
    text = err + log
    if any(m in text for m in OOM_MARKERS) or rc in (-9, 137):
        return "oom", _last_line(err)
    if "Traceback (most recent call last)" in err or rc not in (0, 2):
        return "traceback", _last_line(err)
    if case.expect == "error":
        if rc == 0:
            return "silent", "exit 0"
        lines = [ln for ln in err.splitlines() if ln.startswith("mmalign")]
        return ("ok", lines[-1][:160]) if lines else ("traceback", "exit 2 without a one-line message")
    if rc == 2:
        return "rejected", _last_line(err)
    if case.report:
        reported = _reported(case, out, err)
        if reported < case.report:
            return "silent", f"{reported} of {case.report} bad item(s) reported"
    return "ok", ""


def _reported(case: Case, out: str, err: str) -> int:
    if case.command == "score":
        try:
            return int(json.loads(out.strip().splitlines()[-1])["errors"])
        except (ValueError, KeyError, IndexError):
            return 0
    match = re.search(r"skipped (\d+) unreadable", out + err)
    return int(match.group(1)) if match else 0


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def run_case(
    case: Case, work: Path, fx: Path, *, timeout: float, mem_gb: float, python: str, pythonpath: str
) -> dict[str, Any]:
    folder = work / case.id
    argv = materialize(case, folder, fx)
    logs = folder / "logs"
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MMALIGN_LOG_DIR": str(logs),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    limit = int(mem_gb * (1 << 30))

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.setsid()

    start = time.monotonic()
    proc = subprocess.Popen(
        [python, "-m", "mmalign", *argv],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=limits,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        rc = None
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    log = "".join(p.read_text(errors="replace") for p in logs.glob("*.log")) if logs.is_dir() else ""
    outcome, note = classify(case, rc, out, err, log)
    return {
        "id": case.id,
        "command": case.command,
        "label": case.label,
        "expect": case.expect,
        "rc": rc,
        "outcome": outcome,
        "note": note,
        "seconds": round(time.monotonic() - start, 2),
    }


def run(
    cases: list[Case],
    *,
    jobs: int = 2,
    timeout: float = 120,
    mem_gb: float = 5,
    work: Path | None = None,
    fixtures: Path | None = None,
    python: str = sys.executable,
    pythonpath: str = str(ROOT),
    progress: bool = True,
    keep: bool = False,
) -> list[dict[str, Any]]:
    """Run every case; returns one result dict per case (in case order)."""
    tmp = Path(tempfile.mkdtemp(prefix="mmalign-fuzz-")) if work is None else work
    fx = build_fixtures(fixtures or tmp / "fixtures")
    results: list[dict[str, Any]] = []
    try:
        from tqdm.auto import tqdm

        with (
            ThreadPoolExecutor(jobs) as pool,
            tqdm(total=len(cases), disable=not progress, desc="fuzz") as bar,
        ):
            futures = [
                pool.submit(
                    run_case,
                    c,
                    tmp / "cases",
                    fx,
                    timeout=timeout,
                    mem_gb=mem_gb,
                    python=python,
                    pythonpath=pythonpath,
                )
                for c in cases
            ]
            for future in futures:
                results.append(future.result())
                bar.update(1)
                if results[-1]["outcome"] != "ok":
                    bar.write(
                        f"{results[-1]['id']} {results[-1]['label']}: {results[-1]['outcome']} "
                        f"({results[-1]['note']})"
                    )
    finally:
        if not keep and work is None:
            shutil.rmtree(tmp / "cases", ignore_errors=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table: cases and outcomes per command, plus the total."""
    by: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by[r["command"]][r["outcome"]] += 1
        by["all"][r["outcome"]] += 1
    lines = ["| command | cases | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for command in ["validate", "train", "score", "label", "all"]:
        if command in by:
            c = by[command]
            lines.append(
                f"| {command} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds per case before it counts as a hang"
    )
    parser.add_argument("--mem-gb", type=float, default=5, help="address-space limit per case (RLIMIT_AS)")
    parser.add_argument(
        "--only", help="run only cases whose label starts with this (e.g. validate, train-data)"
    )
    parser.add_argument(
        "--pythonpath", default=str(ROOT), help="the mmalign tree to test (default: this checkout)"
    )
    parser.add_argument("--work", type=Path, help="keep case folders here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write every case's result here")
    parser.add_argument(
        "--rerun-failures",
        type=Path,
        metavar="JSON",
        help="run only the cases that were not ok in this earlier --json result (same --cases/--seed)",
    )
    parser.add_argument("--show-failures", action="store_true")
    args = parser.parse_args()
    cases = generate(args.cases, args.seed)
    if args.only:
        cases = [c for c in cases if c.label.startswith(args.only)]
    if args.rerun_failures:
        failed = {r["id"] for r in json.loads(args.rerun_failures.read_text()) if r["outcome"] != "ok"}
        cases = [c for c in cases if c.id in failed]
    start = time.time()
    results = run(
        cases,
        jobs=args.jobs,
        timeout=args.timeout,
        mem_gb=args.mem_gb,
        work=args.work,
        pythonpath=args.pythonpath,
    )
    print(table(results))
    print(f"{len(results)} cases in {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.show_failures:
        for r in results:
            if r["outcome"] != "ok":
                print(f"{r['id']} {r['label']} expect={r['expect']} rc={r['rc']}: {r['outcome']} {r['note']}")
    return 0 if all(r["outcome"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
