"""How far is a BAL image (LoRA patched in at step k) from the synchronous one (k = 0)?

    python bench/bal_quality.py                         # tiny-sdxl preset, LoRA "style"
    python bench/bal_quality.py --model-dir DIR --lora-dir LORAS --lora NAME --steps 30 --size 1024

A slow loader is simulated (the load takes longer than the whole loop), so the
LoRA comes in exactly at step k. Prints PSNR (dB) and SSIM of each k = 0..8
against k = 0, averaged over the prompts/seeds, and the base image's distance
(no LoRA at all) as the bound a never-applied LoRA would give.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

PROMPTS = ["a photo of a red house on a mountain", "portrait of a cat, painting", "city at night, blue light"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian(z: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur (11 taps), edges reflected."""
    t = np.arange(-radius, radius + 1)
    g = np.exp(-(t**2) / (2 * sigma**2))
    g /= g.sum()
    z = np.pad(z, radius, mode="reflect")
    z = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 0, z)
    return np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 1, z)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels with an 11x11 Gaussian window (sigma 1.5), as in Wang et al. 2004."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = _gaussian
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-sdxl")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--lora-dir", type=Path)
    p.add_argument("--lora", default="style")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int)
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--delay", type=float, default=1.0,
                   help="simulated load time (s); must exceed k steps so the LoRA comes in exactly at k")
    args = p.parse_args()

    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.models.presets import ensure_preset
    from katz.request import Limits
    from katz.deployment import Deployment
    from katz.serving.local import LocalEnsemble

    model_dir = args.model_dir or ensure_preset(args.preset)
    folder = ModelFolder(model_dir, discover_controlnets(Path(model_dir) / "controlnets"))
    size = args.size or folder.default_size
    dep = Deployment(folder.path, folder.controlnets, args.lora_dir or Path(model_dir) / "loras",
                     Limits(default_width=size, default_height=size), device=args.device,
                     dtype="float16" if args.device == "cuda" else "float32", lora_load_delay_s=args.delay, controlnet_mode="inline")
    ens = LocalEnsemble(dep)
    unet = ens.models["unet"]

    def run(prompt, seed, k, lora=True):
        unet.bal.switch_to(())  # cold: base weights in place, nothing on the device or in the host tier
        unet.loras.clear_caches()
        req = {"prompt": np.array([prompt.encode()], object), "seed": np.array([seed], np.int64),
               "steps": np.array([args.steps], np.int32)}
        if lora:
            req["loras"] = np.array([args.lora.encode()], object)
            req["lora_k"] = np.array([k], np.int32)
        out = ens.generate(req)
        if lora and int(out["lora_applied_step"][0]) != k:
            raise SystemExit(f"the LoRA came in at step {int(out['lora_applied_step'][0])}, not {k}: raise --delay")
        return out["image"]

    rows = []
    cases = [(pr, s) for pr in PROMPTS for s in range(args.seeds)]
    refs = {c: run(*c, k=0) for c in cases}
    for k in range(1, min(args.max_k, args.steps - 1) + 1):
        imgs = {c: run(*c, k=k) for c in cases}
        rows.append((str(k), np.mean([psnr(imgs[c], refs[c]) for c in cases]),
                     np.mean([ssim(imgs[c], refs[c]) for c in cases])))
    base = {c: run(*c, k=0, lora=False) for c in cases}
    rows.append(("no LoRA", np.mean([psnr(base[c], refs[c]) for c in cases]),
                 np.mean([ssim(base[c], refs[c]) for c in cases])))
    print(f"model {model_dir} ({folder.family}), LoRA {args.lora!r}, {args.steps} steps, {size}x{size}, "
          f"{len(cases)} prompt/seed pairs; distance to k = 0")
    print(f"{'k':>8} {'PSNR dB':>9} {'SSIM':>7}")
    for k, ps, ss in rows:
        print(f"{k:>8} {ps:9.2f} {ss:7.4f}")


if __name__ == "__main__":
    main()
