"""The toy world: procedural shapes, tiny real pipelines and exact rule rewards (DESIGN §5)."""

from pathlib import Path

# The defaults the command line shows; here rather than in sample.py/build.py so that building the parser does
# not import torch.
DEFAULT_TOY_MODEL = Path(__file__).parent / "assets" / "toy-sd"
DEFAULT_VIDEO_ASSET_DIR = Path(__file__).parent / "assets" / "toy-video"
QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy" / "quickstart.yaml"
# No CFG: the toy base then leaves a flaw (speckle or a wrong colour) in two thirds of its samples (a third at
# CFG 2), which is what the quickstart's DPO visibly fixes (BENCHMARKS.md, "The quickstart at CFG 1").
QUICKSTART_GUIDANCE = 1.0
QUICKSTART_STEPS = 20
