"""The quick subset of the fuzz suite: 22 seeded bad (and good) inputs, one per kind, through ``python -m mmalign``.

Every case must end as its generator says (exit 2 with one line, or exit 0 with bad items reported): no
traceback, hang, out-of-memory or silent acceptance. The full run (>= 1,000 cases) is ``tests/fuzz/run.py``;
its table is in docs/reliability.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import generate  # noqa: E402
from run import run, table  # noqa: E402

QUOTA = {"validate": 12, "train": 1, "score": 5, "label": 4}


def quick_cases():
    """A fixed, stratified slice of the seed-0 run: the first case of each kind (label) per command, up to the
    command's quota (cheap ones for train)."""
    picked, counts, seen = [], dict.fromkeys(QUOTA, 0), set()
    for case in generate(1000, seed=0):
        if case.command == "train" and not case.label.startswith("train-data/error"):
            continue  # stops at the first bad item: a train case that costs one model load
        if case.label not in seen and counts[case.command] < QUOTA[case.command]:
            picked.append(case)
            seen.add(case.label)
            counts[case.command] += 1
    return picked


def test_quick_fuzz_subset_has_no_bad_outcome(tmp_path):
    cases = quick_cases()
    assert len(cases) == sum(QUOTA.values())
    results = run(cases, jobs=2, timeout=120, mem_gb=5, work=tmp_path, progress=False)
    bad = [
        f"{r['id']} {r['label']} (expect {r['expect']}, rc {r['rc']}): {r['outcome']} {r['note']}"
        for r in results
        if r["outcome"] != "ok"
    ]
    assert not bad, table(results) + "\n" + "\n".join(bad)
