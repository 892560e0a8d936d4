#!/usr/bin/env bash
# Fill .whl (gitignored) with the wheels the device image lacks, at the versions this machine's tests ran with, for
# Python 3.12 (the image's): diffusers, open_clip_torch and its ftfy/wcwidth, and peft (pinned, so the GPU run uses
# the peft the suite ran). Run here, where PyPI is reachable, before a device call that names `.whl` in `carry`:
#   bash bench/gpu_wheels.sh && du -sh .whl      # then: run(command="bash bench/gpu_run.sh", carry=[".whl"])
# bench/gpu_run.sh installs them into /tmp/site on the card's machine. Everything else (torch, transformers,
# accelerate, safetensors, ...) is in the image (the tool library's device/KINDS.md lists it).
set -euo pipefail
cd "$(dirname "$0")/.."
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
for pkg in diffusers open_clip_torch ftfy wcwidth peft; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$(ver "$pkg")"
done
ls .whl
