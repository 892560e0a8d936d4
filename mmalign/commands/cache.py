"""``mmalign cache [--inversion] CONFIG [key=value ...]``: fill the latent/text cache of image or video pairs (and
the inversion cache) ahead of training, so ``mmalign train`` starts straight into its steps. Idempotent: a warm
cache does no work. Only the VAE and text encoders go to the device (and the denoiser for ``--inversion``).

``register(subparsers)`` is called by :mod:`mmalign.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmalign.commands.options import resolve_recipe


class SingleProcess:
    """The two things the data builders ask of an accelerate ``Accelerator`` when run outside a launch."""

    is_main_process = True
    device = "cpu"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def wait_for_everyone(self) -> None:
        return None


def cmd_cache(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError
    from mmalign.pipelines import load_model
    from mmalign.pipelines.runtime import quiet_libraries, resolve_device, resolve_dtype
    from mmalign.trainers import data as method_data
    from mmalign.trainers import get_method, load_config
    from mmalign.trainers.loop import weight_dtype

    cfg = load_config(resolve_recipe(args.config), args.overrides)
    if not cfg.data.cache:
        raise ConfigError(f"{args.config}: data.cache is false; nothing to cache (set data.cache=true)")
    if args.inversion and cfg.method.name != "inversion_dpo":
        raise ConfigError(
            f"{args.config}: --inversion needs method.name=inversion_dpo (got {cfg.method.name})"
        )
    device = resolve_device(args.device)
    # What `mmalign train` would cache: text encoders in the recipe's train.mixed_precision, the VAE in fp32 (the
    # stock SDXL VAE overflows in fp16). --dtype changes the text encoders' (and the inverting denoiser's) dtype.
    dtype = (
        weight_dtype(cfg.train.mixed_precision) if args.dtype is None else resolve_dtype(args.dtype, device)
    )
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu" and args.dtype is None:
        print(  # a cache for a GPU run may well be built on a CPU machine: say it, do not refuse it
            "note: train.mixed_precision=fp16: this cache is encoded in fp16 for a run on a GPU (`mmalign train` "
            "refuses fp16 without one; for a run here, cache with train.mixed_precision=bf16 or no)",
            file=sys.stderr,
        )
    build = get_method(cfg.method.name).build_data
    if args.inversion:
        build = method_data.inversion_pairs
    elif build is method_data.inversion_pairs:
        build = method_data.image_pairs  # the latent/text part; --inversion adds the inversions
    elif build not in (method_data.image_pairs, method_data.video_pairs):
        raise ConfigError(
            f"{args.config}: method {cfg.method.name} does not train from the image or video pair cache"
        )
    with quiet_libraries(not args.verbose):  # diffusers' loading bars and notices, as every other command
        # the denoiser only when it inverts: encoding never runs it, so it is built from its config with no weights
        # (real SDXL from a bf16 checkpoint: 1.3 GB peak and 2.2 s instead of 15.5 GB and 14.4 s, BENCHMARKS.md)
        pipe, family, adapter = load_model(cfg.model, denoisers=args.inversion)
    # only what encodes goes to the device: the VAE and text encoders, and the denoiser when it inverts
    pipe.vae.to(device)
    for encoder in adapter.text_encoders:
        encoder.to(device, dtype)
    if args.inversion:
        denoiser = getattr(pipe, adapter.denoiser_name).requires_grad_(False)
        denoiser.to(device)
        if args.dtype is not None:
            denoiser.to(dtype)
    data = build(cfg, adapter, SingleProcess(device))
    print(json.dumps({"config": args.config, "inversion": args.inversion, **data.counts}))
    return 0


def register(subparsers) -> None:
    """Add ``cache`` to ``mmalign``'s subparsers."""
    p = subparsers.add_parser(
        "cache",
        help="encode latents/text embeddings (and, with --inversion, DDIM inversions) ahead of training",
    )
    p.add_argument("config")
    p.add_argument(
        "overrides", nargs="*", help="e.g. data.source=/data/pickapic_v2 method.num_inversion_steps=80"
    )
    p.add_argument(
        "--inversion",
        action="store_true",
        help="also invert every image into the inversion cache (method inversion_dpo)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="text encoders' (and, with --inversion, the denoiser's) precision; default: the recipe's "
        "train.mixed_precision, as `mmalign train` would cache (the VAE always runs in fp32)",
    )
    p.add_argument("--verbose", action="store_true", help="show library loading bars and warnings")
    p.set_defaults(func=cmd_cache)
