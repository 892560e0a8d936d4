"""Batched tensor reward scoring vs a per-image PIL loop on the same CLIP model.

The tensor path is what ``mmalign`` rewards do (``ClipSimilarityReward``: batched resize/crop/normalise on
the model's device, one forward per batch). The PIL path is the usual wrapper: each generated image tensor
goes to PIL, through open_clip's PIL transform, and through the model alone. Both encode each prompt once.
Models are random-initialised open_clip architectures (no download): ``small`` for CPU, ``ViT-H-14`` (the
HPSv2/PickScore backbone) for a GPU.

    python bench/bench_rewards.py --arch small --device cpu --n 32 --batch-size 16
    python bench/bench_rewards.py --arch ViT-H-14 --device cuda --n 256 --batch-size 64 --dtype bfloat16

``--disk-workers 0 8`` adds end-to-end scoring from PNG files on disk (``score_items``: decoding in that many
DataLoader worker processes, pinned memory on CUDA) as images/s and as a fraction of the tensor path's rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

SMALL = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 384, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2},
}


def build(arch: str, device: torch.device, dtype: torch.dtype):
    import open_clip

    from mmalign.rewards.clip import ClipSimilarityReward, _open_clip_encoders
    from mmalign.rewards.preprocess import transform_from_open_clip

    torch.manual_seed(0)
    if arch == "small":
        model = open_clip.CLIP(**SMALL)
        tokenizer = open_clip.tokenize
    else:
        model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
    model = model.to(device, dtype).eval().requires_grad_(False)
    enc_img, enc_txt = _open_clip_encoders(model, tokenizer, device)
    reward = ClipSimilarityReward(
        enc_img, enc_txt, transform_from_open_clip(model), 1.0, False, device, dtype
    )
    pil_tf = open_clip.image_transform(model.visual.image_size, is_train=False)
    return model, tokenizer, reward, pil_tf


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pil_loop(
    model, tokenizer, pil_tf, images: torch.Tensor, prompts: list[str], device, dtype
) -> torch.Tensor:
    """Per image: tensor -> PIL -> open_clip PIL transform -> model; text encoded once per prompt."""
    from mmalign.rewards.judge import to_pil

    text = {}
    scores = []
    with torch.no_grad():
        for img, prompt in zip(images, prompts):
            if prompt not in text:
                text[prompt] = model.encode_text(tokenizer([prompt]).to(device), normalize=True).float()
            pixels = pil_tf(to_pil(img[None])[0]).unsqueeze(0).to(device, dtype)
            emb = model.encode_image(pixels, normalize=True).float()
            scores.append((emb * text[prompt]).sum(-1))
    return torch.cat(scores)


class PixelsOnly:
    """A reward that takes the pixels to ``device`` and reduces them: the data path without a model."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return media.to(self.device).flatten(1).mean(1)


def timed_best(args, device):
    def timed(fn):
        fn_out = fn()  # warm-up (allocations, kernels)
        best = float("inf")
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            fn_out = fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        return best, fn_out

    return timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="small", help="small, or an open_clip model name (ViT-H-14)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--n", type=int, default=32, help="images scored per method")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="side of the generated images")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    parser.add_argument("--pil-n", type=int, default=64, help="images the per-image PIL loop is timed on")
    parser.add_argument(
        "--disk-workers",
        type=int,
        nargs="*",
        default=[],
        help="also score the images from PNG files with these numbers of decoding workers",
    )
    parser.add_argument(
        "--data-path-only",
        action="store_true",
        help="no model: the from-disk images/s with a reward that only takes the pixels to the device (the data "
        "path's own ceiling, to compare with the backbone's images/s)",
    )
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.data_path_only:
        images = torch.rand(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        result = {"data_path_only": True, "device": str(device), "threads": torch.get_num_threads()}
        result.update({"n": args.n, "batch_size": args.batch_size, "image_size": args.size})
        result.update(
            from_disk(PixelsOnly(device), images, ["a photo"] * args.n, args, timed_best(args, device))
        )
        print(json.dumps(result))
        return result
    model, tokenizer, reward, pil_tf = build(args.arch, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.n, 3, args.size, args.size, generator=g)  # generated media, on the host
    prompts = [f"a photo of a {c} circle" for c in ("red", "blue", "green", "yellow")] * (args.n // 4 + 1)
    prompts = prompts[: args.n]

    def tensor_path() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    reward(images[i : i + args.batch_size].to(device), prompts[i : i + args.batch_size])
                    for i in range(0, args.n, args.batch_size)
                ]
            )

    timed = timed_best(args, device)
    side = model.visual.image_size
    side = side if isinstance(side, int) else side[0]
    pixels = torch.randn(min(args.batch_size, args.n), 3, side, side, device=device, dtype=dtype)

    def raw_backbone() -> None:  # the image tower alone on ready, preprocessed batches: the ceiling
        with torch.no_grad():
            for i in range(0, args.n, args.batch_size):
                model.encode_image(pixels[: min(args.batch_size, args.n - i)])

    t_raw, _ = timed(raw_backbone)
    t_tensor, s_tensor = timed(tensor_path)
    k = min(args.n, args.pil_n)  # the per-image loop is slow: its rate is measured on the first k images
    t_pil, s_pil = timed(lambda: pil_loop(model, tokenizer, pil_tf, images[:k], prompts[:k], device, dtype))
    result = {
        "arch": args.arch,
        "params_M": round(params / 1e6, 1),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "n": args.n,
        "batch_size": args.batch_size,
        "image_size": args.size,
        "raw_backbone_images_per_s": round(args.n / t_raw, 2),
        "tensor_images_per_s": round(args.n / t_tensor, 2),
        "tensor_fraction_of_raw_backbone": round(t_raw / t_tensor, 3),
        "pil_loop_images_per_s": round(k / t_pil, 2),
        "speedup_tensor_over_pil": round((t_pil / k) / (t_tensor / args.n), 2),
        "max_abs_score_diff": round(float((s_tensor[:k].cpu() - s_pil.cpu()).abs().max()), 4),
    }
    if args.disk_workers:
        result.update(from_disk(reward, images, prompts, args, timed, t_tensor, t_raw))
    print(json.dumps(result))
    return result


def from_disk(reward, images, prompts, args, timed, t_tensor=None, t_raw=None) -> dict:
    """score_items from PNG files (decode, then the same reward), per number of decoding workers."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from PIL import Image

    from mmalign.rewards.score import collect_items, read_table, score_items

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "media"
        root.mkdir()
        rows = []

        def write(i: int) -> None:
            arr = (images[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"{i:05d}.png")

        with ThreadPoolExecutor() as pool:  # zlib releases the GIL: 1024 PNGs in seconds on a many-core host
            list(pool.map(write, range(len(images))))
        for i, prompt in enumerate(prompts):
            rows.append(json.dumps({"path": f"{i:05d}.png", "prompt": prompt}))
        (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
        items = collect_items(root)
        scores = {}
        for w in args.disk_workers:
            target = Path(tmp) / f"w{w}.jsonl"

            def run(w=w, target=target):
                score_items(
                    items,
                    {"clip": reward},
                    target,
                    batch_size=args.batch_size,
                    resume=False,
                    progress=False,
                    num_workers=w,
                )

            t, _ = timed(run)
            scores[w] = [r["clip"] for r in read_table(target)]
            out[f"disk_images_per_s_workers{w}"] = round(args.n / t, 2)
            if t_tensor is not None:
                out[f"disk_fraction_of_tensor_path_workers{w}"] = round(t_tensor / t, 3)
                out[f"disk_fraction_of_raw_backbone_workers{w}"] = round(t_raw / t, 3)
        out["disk_scores_identical_across_workers"] = all(
            v == scores[args.disk_workers[0]] for v in scores.values()
        )
    return out


if __name__ == "__main__":
    main()
