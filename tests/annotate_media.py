"""Small media and manifests for the annotate tests, and a helper that runs `mmalign annotate serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_video_pairs(root: Path, n: int = 2, frames: int = 24, fps: float = 8.0) -> Path:
    """n toy video pairs (3 s at 8 fps, 32 px; video_1 flickers in one segment) and their pair manifest."""
    from mmalign.data.video import write_video
    from mmalign.toy.render import render_video, sample_spec

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        spec = sample_spec(100 + i)
        clean = render_video(spec, seed=100 + i, frames=frames)
        flicker = render_video(spec, seed=100 + i, frames=frames, flicker_segment=i % 3, segments=3)
        write_video(root / f"v{i}_0.mp4", clean, fps)
        write_video(root / f"v{i}_1.mp4", flicker, fps)
        rows.append(
            {"prompt": spec.caption() + " moving", "video_0": f"v{i}_0.mp4", "video_1": f"v{i}_1.mp4"}
        )
    manifest = root / "video_pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def write_candidates(root: Path, groups: int = 3, per_group: int = 4, size: int = 24) -> Path:
    """A media manifest (what `mmalign generate` writes): per_group PNG candidates per prompt with a score."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for g in range(groups):
        for k in range(per_group):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            name = f"{g:02d}_{k}.png"
            Image.fromarray(arr).save(root / name)
            rows.append(
                {
                    "path": name,
                    "prompt": f"prompt {g}",
                    "seed": k,
                    "guidance": 5.0,
                    "steps": 2,
                    "model": "tiny",
                    "lora": None,
                    "kind": "image",
                    "group": f"g{g}",
                    "clip": float(k),
                }
            )
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


class Server:
    """`python -m mmalign annotate serve ...` in a subprocess; ``url`` is read from what it prints."""

    def __init__(self, manifest: Path, labels: Path, *args: str, timeout: float = 60.0):
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mmalign",
                "annotate",
                "serve",
                str(manifest),
                "--out",
                str(labels),
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"open (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError(
                "server did not start:\n" + "".join(self.lines) + (self.proc.stdout.read() or "")
            )
        self.base = self.url.split("?")[0]

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
