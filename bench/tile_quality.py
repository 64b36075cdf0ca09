"""How far is a spatially sharded image (latent bands on UNet shards, blended) from the unsharded one?

    python bench/tile_quality.py                                  # tiny-sdxl and tiny-sd15, 128x128 and 256x256
    python bench/tile_quality.py --model-dir DIR --size 1024 --steps 30 --device cuda --overlaps 8,16,32
    python bench/tile_quality.py --shards 4 --guidance 5           # CFG halves x 2 bands each

Runs Katz's model classes in one process (:class:`katz.serving.local.LocalEnsemble`),
one shard against ``--shards`` shards, and prints for each overlap (latent pixels) the bands
one row is cut into, the least overlap they have (the asked one rounded up to the UNet's
alignment), the share of the latent each shard computes, and PSNR (dB), SSIM and
the largest pixel difference (of 255) against the unsharded image, averaged over the prompts
and seeds (the largest difference: the worst case). The default guidance of 1 (no CFG) gives
every band its own shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bal_quality import PROMPTS, psnr, ssim  # noqa: E402


def ensemble(model_dir: Path, size: int, shards: int, device: str):
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.deployment import Deployment
    from katz.serving.local import LocalEnsemble

    folder = ModelFolder(model_dir, discover_controlnets(Path(model_dir) / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, None,
                     Limits(default_width=size, default_height=size, max_width=size, max_height=size),
                     device=device, dtype="float16" if device == "cuda" else "float32", unet_shards=shards, controlnet_mode="inline")
    return LocalEnsemble(dep)


def measure(model_dir: Path, size: int, args) -> None:
    one = ensemble(model_dir, size, 1, args.device)
    many = ensemble(model_dir, size, args.shards, args.device)
    pipeline = many.models["katz_pipeline"]

    def run(ens, prompt, seed):
        req = {"prompt": np.array([prompt.encode()], object), "seed": np.array([seed], np.int64),
               "steps": np.array([args.steps], np.int32), "guidance_scale": np.array([args.guidance], np.float32)}
        return ens.generate(req)["image"]

    cases = [(p, s) for p in PROMPTS[: args.prompts] for s in range(args.seeds)]
    refs = {c: run(one, *c) for c in cases}
    latent = size // pipeline.deployment.folder.vae_scale_factor
    rows = 2 if args.guidance > 1 else 1
    print(f"model {model_dir} ({pipeline.family}), {size}x{size} (latent {latent}), {args.steps} steps, "
          f"guidance {args.guidance:g}, {args.shards} shards, {len(cases)} prompt/seed pairs; "
          f"distance to 1 shard")
    print(f"{'overlap':>8} {'bands (start+size)':>26} {'actual':>6} {'share':>6} {'PSNR dB':>8} {'SSIM':>7} "
          f"{'max diff':>8}")
    for overlap in args.overlaps:
        pipeline.shards.overlap = overlap
        tiles = pipeline.shards.plan(rows, latent, latent)
        if tiles == [None]:
            print(f"{overlap:>8} {'(not split)':>26}")
            continue
        imgs = {c: run(many, *c) for c in cases}
        bands = " ".join(f"{t.start}+{t.size}" for t in tiles)
        diff = max(int(np.abs(imgs[c].astype(int) - refs[c].astype(int)).max()) for c in cases)
        actual = min(a.end - b.start for a, b in zip(tiles, tiles[1:]))
        print(f"{overlap:>8} {bands:>26} {actual:>6} {tiles[0].size / latent:6.2f} "
              f"{np.mean([psnr(imgs[c], refs[c]) for c in cases]):8.2f} "
              f"{np.mean([ssim(imgs[c], refs[c]) for c in cases]):7.4f} {diff:>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", help="tiny-sdxl, tiny-sd15 (repeatable; default both)")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--size", type=int, action="append", help="image side in pixels (repeatable; default 128, 256)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--overlaps", default="0,4,8,16,32",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()], help="latent pixels, comma-separated")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from katz.models.presets import ensure_preset

    dirs = [args.model_dir] if args.model_dir else [ensure_preset(n) for n in args.preset or ("tiny-sdxl", "tiny-sd15")]
    for model_dir in dirs:
        for size in args.size or (128, 256):
            measure(model_dir, size, args)
            print()


if __name__ == "__main__":
    main()
