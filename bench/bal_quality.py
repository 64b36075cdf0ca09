"""What BAL costs in quality: the share of a LoRA's effect an image keeps when the LoRA comes in at step k.

    python bench/bal_quality.py                                   # tiny-sdxl and tiny-sd15, random LoRAs, CPU
    python bench/bal_quality.py --model-dir DIR --lora my.safetensors --scales 0.8,1 --steps 30 --size 1024
    python bench/bal_quality.py --model-dir /tmp/sdxl --random-sdxl --device cuda --out bal.json  # GPU host

BAL (bounded asynchronous LoRA loading) starts denoising on the base weights while the LoRA loads
and patches it in at step k at the latest: steps 0..k-1 run on the base weights, steps k..n-1 with
the LoRA (``lora_k`` of a request; k = 0 is the synchronous image; k counts the loop's UNet
evaluations, one more than ``steps`` with PNDM). For each step count, scheduler (``--schedulers``),
LoRA (rank x scale, or the files given with ``--lora``) and k, this renders every prompt/seed pair's
image with the LoRA in from step k and reports, against the k = 0 image of the same pair:

    effect kept = 1 - MSE(image_k, image_0) / MSE(image_without_lora, image_0)

(1: the k = 0 image; 0: as far from it as the image without the LoRA; pooled over the pairs as a
ratio of mean MSEs), PSNR (dB) and SSIM. Per k it summarises the least and the median effect kept
over the configurations and prints the largest bound k whose every k' <= k keeps >= 90 %
(``--threshold``) in every configuration and in the median one.

The images are the server's: Katz's model classes in one process
(:class:`katz.serving.local.LocalEnsemble`), the UNet model's own BAL decision per step. Only
the loader's timing is forced: the LoRA stays "not ready" (as from a loader slower than the whole
loop), so it comes in exactly at step k, where the UNet model must wait for it; each image's
``lora_applied_step`` is checked. Effect kept is computed on the decoded image before its 8-bit
rounding (rounding adds ~1/6 level^2 of MSE however small the difference, which would bias the
ratio for a LoRA of small effect); PSNR and SSIM on the 8-bit image the server returns.

Without ``--lora`` the LoRAs are seeded random ones (``katz.lora.random.make_random_lora``, the UNet's
attention projections, ``--ranks``): their delta has std 0.5/sqrt(fan_in) at scale 1 whatever the
rank, about half a random-weight layer's, so the rank changes only its structure and ``--scales``
its size. Random weights and random LoRAs are not a real model: measure your own model and LoRA
with ``--model-dir`` and ``--lora``. A LoRA's text-encoder part is in from the start in Katz (text
encoding runs before denoising), so only its UNet part is late and the image at any k keeps the
text-encoder part's effect.

``--out`` is rewritten after every image, so a run cut off keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["a photo of a red house on a mountain", "portrait of a cat, painting", "city at night, blue light"]
NEVER = "never"  # the image without the LoRA: what a LoRA never patched in would give
PSNR_CAP = 99.0  # identical images (k = 0 against itself) have an infinite PSNR; JSON has no inf


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian(z: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable blur of ``z`` [H, W] by the taps ``g``, edges reflected (sliding windows, no copies)."""
    from numpy.lib.stride_tricks import sliding_window_view

    r = len(g) // 2
    z = sliding_window_view(np.pad(z, r, mode="reflect"), len(g), axis=0) @ g
    return sliding_window_view(z, len(g), axis=1) @ g


def ssim(a: np.ndarray, b: np.ndarray, device: str | None = None) -> float:
    """Mean SSIM over RGB channels with an 11x11 Gaussian window (sigma 1.5), as in Wang et al. 2004;
    edges reflected. numpy (0.4 s for 1024² on a busy 2-core machine), or torch on ``device``
    ("cuda": milliseconds; torch's float64 convolutions on the CPU are slower than numpy's)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    t = np.arange(-5, 6)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    g /= g.sum()
    if device is None:
        f = lambda z: np.stack([_gaussian(c, g) for c in z])  # noqa: E731
        x, y = (np.moveaxis(v, 2, 0).astype(np.float64) for v in (a, b))
    else:
        import torch
        import torch.nn.functional as F

        w = torch.from_numpy(g).to(device)

        def f(z):  # [C, H, W] blurred, reflected edges
            z = F.conv2d(F.pad(z[:, None], (0, 0, 5, 5), mode="reflect"), w.view(1, 1, -1, 1))
            return F.conv2d(F.pad(z, (5, 5, 0, 0), mode="reflect"), w.view(1, 1, 1, -1))[:, 0]

        x, y = (torch.from_numpy(np.ascontiguousarray(v)).to(device, torch.float64).permute(2, 0, 1) for v in (a, b))
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr_to_mse(db: float) -> float:
    """The MSE (8-bit levels squared) of a PSNR: the guard's threshold, stated as a PSNR."""
    return 255.0**2 / 10 ** (db / 10)


def effect_kept(mse_k: list[float], mse_never: list[float], floor: float) -> float | None:
    """``1 - mean(MSE(image_k, image_0)) / mean(MSE(image_without_lora, image_0))`` over prompt/seed pairs.

    None when the LoRA's effect, ``mean(mse_never)``, is below ``floor``: a LoRA that barely changes
    the image makes the ratio noise over noise (rendering noise, rounding), and whatever k does
    costs at most that small effect anyway. The ratio of means weighs each pair by its effect, so
    one pair where the LoRA does little cannot swing the figure."""
    if len(mse_k) != len(mse_never) or not mse_k:
        raise ValueError("need one MSE to k = 0 per prompt/seed pair, for image_k and for the image without LoRA")
    den = float(np.mean(mse_never))
    if den < floor or den <= 0:
        return None
    return 1.0 - float(np.mean(mse_k)) / den


def largest_bound(kept_by_k: dict[int, float | None], threshold: float) -> int | None:
    """The largest k such that every measured k' <= k keeps >= ``threshold`` (with BAL the LoRA
    may come in at any step up to the bound, so each must keep enough). None if k = 0 is not
    measured; a k with no defined value (None) ends the run, as does a gap in the measured ks."""
    best = None
    for k in sorted(kept_by_k):
        value = kept_by_k[k]
        if k != (0 if best is None else best + 1) or value is None or value < threshold:
            break
        best = k
    return best


def summarize(configs: list[dict], threshold: float) -> dict:
    """Per k: the least and the median effect kept (and PSNR, SSIM) over configurations with a
    defined effect; the largest bound keeping ``threshold`` in every and in the median configuration."""
    by_k: dict[str, dict] = {}
    ks = sorted({k for c in configs for k in c["by_k"]}, key=lambda k: (k == NEVER, k if k != NEVER else 0))
    for key in ks:
        rows = [c["by_k"][key] for c in configs if key in c["by_k"]]
        kept = [r["effect_kept"] for r in rows if r["effect_kept"] is not None]
        by_k[str(key)] = {
            "configs": len(rows),
            "configs_defined": len(kept),
            "effect_kept_min": min(kept) if kept else None,
            "effect_kept_median": statistics.median(kept) if kept else None,
            "psnr_median": statistics.median(r["psnr"] for r in rows) if rows else None,
            "psnr_min": min(r["psnr"] for r in rows) if rows else None,
            "ssim_median": statistics.median(r["ssim"] for r in rows) if rows else None,
        }
    ints = {int(k): v for k, v in by_k.items() if k != NEVER}
    return {
        "by_k": by_k,
        "largest_k_all": largest_bound({k: v["effect_kept_min"] for k, v in ints.items()}, threshold),
        "largest_k_median": largest_bound({k: v["effect_kept_median"] for k, v in ints.items()}, threshold),
        "configs_undefined": sum(1 for c in configs if c["effect_mse"] is not None and not c["effect_kept_defined"]),
    }


def aggregate(records: list[dict], floor: float) -> list[dict]:
    """Per configuration (model, scheduler, steps, LoRA, scale) and k: effect kept, mean PSNR and SSIM to k = 0,
    over the prompt/seed pairs that have both the k image and the image without the LoRA."""
    configs: dict[tuple, dict] = {}
    for r in records:
        key = (r["model"], r["scheduler"], r["steps"], r["lora"], r["scale"])
        configs.setdefault(key, {}).setdefault(r["k"], {})[r["case"]] = r
    out = []
    for (model, scheduler, steps, lora, scale), per_k in configs.items():
        never = per_k.get(NEVER, {})
        effect = [never[c]["mse"] for c in never]
        floor_ok = bool(effect) and float(np.mean(effect)) >= floor
        by_k = {}
        for k, cases in per_k.items():
            common = [c for c in cases if c in never]
            if not common:
                continue
            by_k[k] = {
                "pairs": len(common),
                "effect_kept": effect_kept([cases[c]["mse"] for c in common], [never[c]["mse"] for c in common], floor),
                "psnr": float(np.mean([min(cases[c]["psnr"], PSNR_CAP) for c in common])),
                "ssim": float(np.mean([cases[c]["ssim"] for c in common])),
            }
        out.append({
            "model": model, "scheduler": scheduler, "steps": steps, "lora": lora, "scale": scale,
            "rank": next(iter(never.values()), {}).get("rank"),
            "effect_mse": float(np.mean(effect)) if effect else None,
            "effect_psnr": 10 * math.log10(255.0**2 / np.mean(effect)) if effect and np.mean(effect) > 0 else None,
            "effect_kept_defined": floor_ok,
            "by_k": by_k,
        })
    return out


# ---------------------------------------------------------------------------------------- rendering
def _ints(text: str) -> list[int]:
    """'0-8' or '0,1,2,4' (or a mix) -> sorted unique ints."""
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


class _KeepDecoded:
    """Wraps the ensemble's ``postprocessing`` model to keep the decoded image before its 8-bit
    rounding (``katz.diffusion.images.to_uint8`` without the round: [-1, 1] -> [0, 255], clamped)."""

    def __init__(self, model):
        self.model, self.last = model, None

    def execute(self, inputs: dict) -> dict:
        image = inputs["image"]
        image = image[0] if image.ndim == 4 else image
        self.last = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).cpu().double().numpy()
        return self.model.execute(inputs)


class _NoPng:
    def execute(self, inputs: dict) -> dict:
        return {"png": np.array([b""], dtype=object)}


class Renderer:
    """One model's ensemble, rendering an image with a LoRA in from exactly step k."""

    def __init__(self, model_dir: Path, lora_dir: Path, size: int | None, device: str):
        from katz.models.folder import ModelFolder
        from katz.request import Limits
        from katz.deployment import Deployment
        from katz.serving.local import LocalEnsemble

        folder = ModelFolder(model_dir)
        self.family, self.size = folder.family, size or folder.default_size
        self.dtype = "float16" if device == "cuda" else "float32"
        # No ControlNets (none is asked for; loading them and capturing their graphs would only cost
        # start-up time) and the VAE decoder uncompiled (`katz serve --no-compile-vae`: ~22 s less at
        # start on SDXL; every image of a comparison goes through the same decoder).
        dep = Deployment(folder.path, {}, lora_dir,
                         Limits(default_width=self.size, default_height=self.size), device=device, dtype=self.dtype,
                         graph_sizes=[(self.size, self.size)], compile_vae=False,
                         controlnet_mode="inline")
        self.ens = LocalEnsemble(dep)
        self.unet = self.ens.models["unet"]
        # A loader slower than the whole loop: the LoRA is never "ready" before step k, so the UNet
        # model runs steps 0..k-1 on the base weights and waits for it at step k (its `must` path),
        # exactly as with a cold LoRA whose load outlasts k steps; no sleeping, so no time wasted.
        self.unet.loras.ready = lambda names: False
        self.unet.loras.eta = lambda names: float("inf")  # nor predicted to be, however far the GPU runs ahead
        self.unet.bal.hot = lambda want: False  # nor hot in a cache at the first step
        self.decoded = _KeepDecoded(self.ens.models["postprocessing"])
        self.ens.models["postprocessing"] = self.decoded
        # LocalEnsemble.generate always encodes a PNG (~0.27 s for a noise-like 1024² image, a fifth
        # of a 30-step image on the GPU host); the server skips it for a client asking only for `image`
        self.ens.models["png_encoder"] = _NoPng()

    def render(self, prompt: str, seed: int, steps: int, lora: str | None = None, scale: float = 1.0,
               k: int = 0, scheduler: str = "default") -> tuple[np.ndarray, np.ndarray]:
        """(8-bit image, decoded image before rounding, float64 in [0, 255])."""
        self.unet.bal.switch_to(())  # base weights in place: a LoRA still merged would count as in from step 0
        req = {"prompt": np.array([prompt.encode()], object), "seed": np.array([seed], np.int64),
               "steps": np.array([steps], np.int32), "scheduler": np.array([scheduler.encode()], object)}
        if lora is not None:
            req["loras"] = np.array([lora.encode()], object)
            req["lora_scales"] = np.array([scale], np.float32)
            req["lora_k"] = np.array([k], np.int32)
        out = self.ens.generate(req)
        applied = int(out["lora_applied_step"][0])
        if applied != (k if lora is not None else -1):
            raise RuntimeError(f"the LoRA came in at step {applied}, not {k}")
        return out["image"], self.decoded.last


def random_loras(model_dir: Path, out: Path, ranks: list[int], dtype: str) -> dict[str, int]:
    """Seeded random UNet LoRAs of each rank in ``out``; the UNet is built on the meta device (only its
    layer shapes are needed). Returns ``{name: rank}``."""
    import torch
    from diffusers import UNet2DConditionModel

    from katz.lora.random import make_random_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(model_dir) / "unet"))
    names = {}
    for rank in ranks:
        name = f"random_r{rank}"
        make_random_lora(out / f"{name}.safetensors", unet, {}, rank=rank, seed=1000 + rank, fmt="peft",
                         dtype=getattr(torch, dtype))
        names[name] = rank
    return names


def user_loras(files: list[str], lora_dir: Path | None, out: Path) -> dict[str, None]:
    """``--lora`` values (files, or names in ``--lora-dir``) linked into ``out`` under valid LoRA names."""
    names = {}
    for value in files:
        path = Path(value)
        if not path.is_file() and lora_dir is not None:
            path = lora_dir / f"{value}.safetensors"
        if not path.is_file():
            raise SystemExit(f"--lora {value}: no such file (nor {value}.safetensors in --lora-dir)")
        name = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in path.stem).strip(".") or "lora"
        while name in names:
            name += "_"
        (out / f"{name}.safetensors").symlink_to(path.resolve())
        names[name] = None
    return names


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_report(configs: list[dict], summary: dict, threshold: float, floor_db: float) -> None:
    ks = list(summary["by_k"])
    late = [k for k in ks if k not in ("0", NEVER)]  # k = 0 keeps 1 and 'never' 0 by definition
    print(f"\neffect kept = 1 - MSE(k, 0) / MSE(no LoRA, 0), per configuration ('-': the LoRA's effect is "
          f"below the guard, PSNR(no LoRA, k=0) > {floor_db:g} dB, or not measured)")
    head = "".join(f"{'k=' + k:>7}" for k in late)
    print(f"{'model':<12} {'scheduler':<9} {'steps':>5} {'lora':<16} {'scale':>5} {'effect dB':>9} |{head}")
    for c in configs:
        cells = "".join(_fmt(c["by_k"].get(int(k), {}).get("effect_kept"), "7.3f", "      -") for k in late)
        print(f"{c['model']:<12} {c['scheduler']:<9} {c['steps']:>5} {c['lora']:<16} {c['scale']:>5g} "
              f"{_fmt(c['effect_psnr'], '9.1f')} |{cells}")
    steps_list = sorted({c["steps"] for c in configs})
    per_steps = {s: summarize([c for c in configs if c["steps"] == s], threshold) for s in steps_list}
    print("\nper k, over the configurations: effect kept min / median (all, and per step count); PSNR dB and SSIM "
          "to k = 0 (median)")
    cols = "".join(f"{str(s) + ' steps':>16}" for s in steps_list)
    print(f"{'k':>6} {'all':>16}{cols} {'PSNR':>7} {'SSIM':>7} {'n':>4}")

    def pair(r):
        return f"{_fmt(r.get('effect_kept_min'), '.3f')} / {_fmt(r.get('effect_kept_median'), '.3f')}"

    for k in ks:
        row = summary["by_k"][k]
        cells = "".join(f"{pair(per_steps[s]['by_k'].get(k, {})):>16}" for s in steps_list)
        db = "    inf" if row["psnr_median"] >= PSNR_CAP else _fmt(row["psnr_median"], "7.2f")
        print(f"{k:>6} {pair(row):>16}{cells} {db} {_fmt(row['ssim_median'], '7.4f')} {row['configs_defined']:>4}")
    pct = f"{threshold:.0%}"
    print(f"\nlargest bound k with every k' <= k keeping >= {pct}: in every configuration k = "
          f"{summary['largest_k_all']}, in the median configuration k = {summary['largest_k_median']}")
    for s in steps_list:
        print(f"  {s} steps: every configuration k = {per_steps[s]['largest_k_all']}, "
              f"median k = {per_steps[s]['largest_k_median']}")
    if summary["configs_undefined"]:
        print(f"  ({summary['configs_undefined']} configuration(s) left out: the LoRA's effect is below the guard)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-sdxl,tiny-sd15", help="tiny preset(s), comma-separated (no --model-dir)")
    p.add_argument("--model-dir", type=Path, help="a diffusers folder (SDXL or SD 1.5) instead of the presets")
    p.add_argument("--random-sdxl", action="store_true",
                   help="first write (or reuse) bench/sdxl_random.py's full-size random SDXL at --model-dir")
    p.add_argument("--lora", action="append", default=[],
                   help="a LoRA .safetensors file (or a name in --lora-dir); repeatable. "
                        "Default: random LoRAs of --ranks")
    p.add_argument("--lora-dir", type=Path)
    p.add_argument("--ranks", default="4,64", help="random LoRAs' ranks (without --lora)")
    p.add_argument("--scales", default="0.5,1", help="LoRA scales (lora_scales)")
    p.add_argument("--steps", default="20,30,50", help="step counts")
    p.add_argument("--schedulers", default="default",
                   help="request schedulers (katz.diffusion.schedulers: default = the folder's own, euler, ddim, pndm, ...)")
    p.add_argument("--ks", default="0-8", help="the steps k the LoRA comes in at ('0-8' or '0,1,2,4'); 0 is always run")
    p.add_argument("--prompts", type=int, default=1, help=f"how many of the {len(PROMPTS)} prompts")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--size", type=int, help="image side (default: the model's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if there is one)")
    p.add_argument("--threshold", type=float, default=0.9, help="effect kept a bound must keep")
    p.add_argument("--guard-db", type=float, default=45.0,
                   help="effect kept is undefined where PSNR(no LoRA, k = 0) is above this: the LoRA barely "
                        "changes the image (45 dB: an RMS difference of 1.4 levels of 255)")
    p.add_argument("--out", type=Path, help="JSON of every image's distances and the summary (rewritten per image)")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_sdxl:
        if args.model_dir is None:
            raise SystemExit("--random-sdxl needs --model-dir (where the folder goes)")
        from bench.sdxl_random import build

        t0 = time.perf_counter()
        build(args.model_dir, device=device, with_controlnet=False)
        print(f"random SDXL folder at {args.model_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.model_dir is not None:
        models = [(args.model_dir.name or str(args.model_dir), args.model_dir)]
    else:
        from katz.models.presets import ensure_preset

        models = [(name, ensure_preset(name)) for name in args.preset.split(",")]
    steps_list, scales, schedulers = _ints(args.steps), _floats(args.scales), args.schedulers.split(",")
    cases = [(pr, s) for pr in PROMPTS[: args.prompts] for s in range(args.seeds)]
    guard = psnr_to_mse(args.guard_db)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["device"] = device
    result: dict = {"settings": settings, "rerun_mse": None, "records": [], "configs": [], "summary": {}}
    records = result["records"]
    floor = guard

    def write() -> None:
        result["configs"] = aggregate(records, floor)
        result["summary"] = summarize(result["configs"], args.threshold)
        result["floor_mse"] = floor
        if args.out:
            tmp = args.out.with_suffix(args.out.suffix + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(args.out)

    start = time.perf_counter()
    images = 0
    for model_name, model_dir in models:
        with tempfile.TemporaryDirectory(prefix="katz-balq-") as tmp:
            lora_dir = Path(tmp)
            dtype = "float16" if device == "cuda" else "float32"
            loras = (user_loras(args.lora, args.lora_dir, lora_dir) if args.lora
                     else random_loras(model_dir, lora_dir, _ints(args.ranks), dtype))
            t0 = time.perf_counter()
            r = Renderer(Path(model_dir), lora_dir, args.size, device)
            print(f"{model_name}: {r.family}, {r.size}x{r.size}, {r.dtype} on {device}, loaded in "
                  f"{time.perf_counter() - t0:.0f} s; LoRAs {', '.join(loras)}; {len(cases)} prompt/seed pair(s)",
                  flush=True)
            if result["rerun_mse"] is None:
                # rendering noise: the same image twice. Deterministic on the CPU (0); should it not be,
                # effect kept is only defined where the LoRA's effect is 100x this noise.
                name = next(iter(loras))
                a = r.render(*cases[0], steps_list[0], name, scales[0], 0, schedulers[0])[1]
                b = r.render(*cases[0], steps_list[0], name, scales[0], 0, schedulers[0])[1]
                result["rerun_mse"] = mse(a, b)
                floor = max(guard, 100 * result["rerun_mse"])
                print(f"rerun MSE (same request twice): {result['rerun_mse']:.3g}", flush=True)
            without: dict[tuple, tuple] = {}  # (scheduler, steps, pair) -> the image without the LoRA
            # LoRAs and scales outside, step counts inside: a run cut off has every step count of its first LoRAs
            for lora, rank in loras.items():
                for scale in scales:
                    for scheduler, steps in [(sc, st) for sc in schedulers for st in steps_list]:
                        ks = [k for k in sorted(set(_ints(args.ks)) | {0}) if k < steps]
                        for case in cases:
                            if (scheduler, steps, case) not in without:
                                without[(scheduler, steps, case)] = r.render(*case, steps, scheduler=scheduler)
                                images += 1
                            ref8 = ref = None
                            for k in [0, NEVER] + ks[1:]:
                                t1 = time.perf_counter()
                                if k == NEVER:
                                    img8, img = without[(scheduler, steps, case)]
                                else:
                                    img8, img = r.render(*case, steps, lora, scale, k, scheduler)
                                    images += 1
                                if k == 0:
                                    ref8, ref = img8, img
                                records.append({
                                    "model": model_name, "scheduler": scheduler, "steps": steps, "lora": lora,
                                    "rank": rank, "scale": scale,
                                    "case": f"{case[0]}|{case[1]}", "k": k, "mse": mse(img, ref),
                                    "psnr": psnr(img8, ref8),
                                    "ssim": ssim(img8, ref8, "cuda" if device == "cuda" else None),
                                    "seconds": None if k == NEVER else time.perf_counter() - t1,
                                })
                                write()
                        print(f"  {lora} x {scale:g}, {scheduler}, {steps} steps: {images} images, "
                              f"{time.perf_counter() - start:.0f} s", flush=True)
    write()
    print(f"\n{images} images in {time.perf_counter() - start:.0f} s; rerun MSE {result['rerun_mse']:.3g}; "
          f"guard: PSNR(no LoRA, k = 0) <= {args.guard_db:g} dB (MSE >= {floor:.3g})")
    print_report(result["configs"], result["summary"], args.threshold, args.guard_db)
    return result


if __name__ == "__main__":
    main()
