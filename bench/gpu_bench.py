"""Katz vs stock diffusers on one GPU, in one run: SDXL architecture (random weights), 1024², 30 steps, CFG.

    python bench/gpu_bench.py --out bench/results.json      # on the GPU host (see bench/README.md)

Measures, each as the median of ``--repeats`` requests after a warm-up:

* the UNet step (batch 2) and a bf16 matmul, for achieved TFLOP/s;
* diffusers: plain request, with a ControlNet, with a cold LoRA loaded and fused per request;
* Katz (the same model classes Triton runs, wired in-process): plain, ControlNet,
  cold LoRA synchronous (k = 0) and cold LoRA with BAL (default k).

Prints one table of ratios to the diffusers baseline and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sdxl_random import build  # noqa: E402

UNET_STEP_TFLOP = 13.5  # SDXL UNet, batch 2, 1024² (issue 7's count)


def cuda_ms(fn, warmup=3, repeats=10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def wall(fn, repeats) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def drop_page_cache() -> None:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
                 "size": args.size, "python": platform.python_version()}
    t0 = time.perf_counter()
    folder = build(args.model_dir)
    res["build_s"] = time.perf_counter() - t0
    print(f"model folder ready in {res['build_s']:.0f}s", flush=True)

    # a rank-64 LoRA on every attention projection of the UNet (issue 3's 186 MB case)
    from diffusers import UNet2DConditionModel

    from katz.lora import make_random_lora

    lora_dir = args.model_dir / "loras"
    lora_dir.mkdir(exist_ok=True)
    lora_file = lora_dir / "style.safetensors"
    if not lora_file.exists():
        unet_meta = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float16)
        make_random_lora(lora_file, unet_meta, {}, rank=args.lora_rank, seed=1, fmt="peft")
        del unet_meta
    res["lora_mb"] = lora_file.stat().st_size / 1e6

    # ---------------------------------------------------------------- ceilings
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = cuda_ms(lambda: x @ x)
    res["matmul_tflops"] = 2 * 8192**3 / mm / 1e9
    del x

    from PIL import Image

    rng = np.random.RandomState(0)
    control = Image.fromarray(rng.randint(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    prompt = "a photo of a red house on a mountain"

    # ---------------------------------------------------------------- diffusers
    import diffusers

    cn = diffusers.ControlNetModel.from_pretrained(folder / "controlnets" / "canny", torch_dtype=torch.float16)
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        folder, controlnet=cn, torch_dtype=torch.float16, add_watermarker=False).to("cuda")
    plain = diffusers.StableDiffusionXLPipeline.from_pipe(pipe, torch_dtype=torch.float16)
    for q in (pipe, plain):
        q.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np")

    # UNet step alone (batch 2)
    lat = torch.randn(2, 4, args.size // 8, args.size // 8, device="cuda", dtype=torch.float16)
    ehs = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
    cond = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=torch.float16)}
    with torch.no_grad():
        res["unet_step_ms"] = cuda_ms(lambda: plain.unet(lat, 500, ehs, added_cond_kwargs=cond))
        img = torch.rand(2, 3, args.size, args.size, device="cuda", dtype=torch.float16)
        res["controlnet_step_ms"] = cuda_ms(lambda: cn(lat, 500, ehs, img, added_cond_kwargs=cond))
    res["unet_tflops"] = UNET_STEP_TFLOP / res["unet_step_ms"] * 1e3
    print(f"UNet step {res['unet_step_ms']:.1f} ms ({res['unet_tflops']:.0f} TFLOP/s), "
          f"ControlNet step {res['controlnet_step_ms']:.1f} ms, matmul {res['matmul_tflops']:.0f} TFLOP/s", flush=True)

    def gen(q, **extra):
        return lambda: q(prompt, generator=torch.Generator().manual_seed(1), **kw, **extra)

    plain(prompt, **{**kw, "num_inference_steps": 2})  # warm-up
    res["diffusers_plain_s"] = wall(gen(plain), args.repeats)
    res["diffusers_controlnet_s"] = wall(gen(pipe, image=control), args.repeats)

    def diffusers_cold_lora():
        drop_page_cache()
        plain.load_lora_weights(lora_dir, weight_name="style.safetensors", adapter_name="style")
        plain.fuse_lora(lora_scale=1.0)
        gen(plain)()
        plain.unfuse_lora()
        plain.unload_lora_weights()

    res["diffusers_cold_lora_s"] = wall(diffusers_cold_lora, args.repeats)
    res["diffusers_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"diffusers: plain {res['diffusers_plain_s']:.2f}s, ControlNet {res['diffusers_controlnet_s']:.2f}s, "
          f"cold LoRA {res['diffusers_cold_lora_s']:.2f}s", flush=True)
    del pipe, plain, cn
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    # ---------------------------------------------------------------- Katz
    from katz.model_folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.triton_models.deployment import Deployment
    from katz.triton_models.local import LocalEnsemble

    mf = ModelFolder(folder, discover_controlnets(folder / "controlnets"))
    dep = Deployment(mf.path, mf.controlnets, lora_dir, Limits(default_width=args.size, default_height=args.size),
                     device="cuda", dtype="float16")
    t0 = time.perf_counter()
    ens = LocalEnsemble(dep)
    res["katz_load_s"] = time.perf_counter() - t0
    unet = ens.models["unet"]
    import io

    buf = io.BytesIO()
    control.save(buf, "PNG")

    def req(**extra):
        r = {"prompt": np.array([prompt.encode()], object), "seed": np.array([1], np.int64),
             "steps": np.array([args.steps], np.int32)}
        r.update(extra)
        return r

    # per-model time inside one request (synchronized), to see where Katz spends it
    stage_s: dict[str, float] = {}
    for name, model in ens.models.items():
        def timed(inputs, _run=model.execute, _name=name):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = _run(inputs)
            torch.cuda.synchronize()
            stage_s[_name] = stage_s.get(_name, 0.0) + time.perf_counter() - t
            return out
        model.execute = timed
    ens.generate(req())
    res["katz_stage_s"] = dict(stage_s)
    print("Katz per-model seconds in one plain request:", {k: round(v, 3) for k, v in stage_s.items()}, flush=True)

    cn_req = dict(controlnets=np.array([b"canny"], object), control_images=np.array([buf.getvalue()], object))
    ens.generate(req(steps=np.array([2], np.int32)))  # warm-up
    res["katz_plain_s"] = wall(lambda: ens.generate(req()), args.repeats)
    res["katz_controlnet_s"] = wall(lambda: ens.generate(req(**cn_req)), args.repeats)

    applied = []

    def katz_cold_lora(k):
        def run():
            unet._switch_to(())
            unet.loras.device_cache.items.clear()
            unet.loras.host.items.clear()
            unet.loras.host.used = unet.loras.device_cache.used = 0
            for m in ens.models.values():
                d = getattr(m, "deployment", None)
                if d is not None and "loras" in vars(d):  # the text encoder's parsed-file cache
                    d.loras._cache.clear()
            drop_page_cache()
            out = ens.generate(req(loras=np.array([b"style"], object), lora_k=np.array([k], np.int32)))
            applied.append(int(out["lora_applied_step"][0]))
        return run

    res["katz_cold_lora_k0_s"] = wall(katz_cold_lora(0), args.repeats)
    res["katz_cold_lora_bal_s"] = wall(katz_cold_lora(2), args.repeats)
    res["katz_bal_applied_steps"] = applied[args.repeats:]
    s = unet.loras.stats
    res["katz_lora_load_s_mean"] = s.load_seconds / max(s.loads, 1)
    res["katz_lora_stats"] = {k: v for k, v in vars(s).items()}
    print("Katz LoRA stats:", res["katz_lora_stats"], flush=True)
    res["katz_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9

    base = res["diffusers_plain_s"]
    rows = [
        ("request, no add-ons", res["diffusers_plain_s"], res["katz_plain_s"]),
        ("request + ControlNet", res["diffusers_controlnet_s"], res["katz_controlnet_s"]),
        ("request + cold LoRA (diffusers load+fuse / Katz k=0)", res["diffusers_cold_lora_s"],
         res["katz_cold_lora_k0_s"]),
        ("request + cold LoRA (Katz BAL k=2)", res["diffusers_cold_lora_s"], res["katz_cold_lora_bal_s"]),
    ]
    print(f"\n{res['device']}, torch {res['torch']}, SDXL architecture (random weights), {args.size}², "
          f"{args.steps} steps, CFG, fp16, median of {args.repeats}")
    print(f"{'case':58} {'diffusers s':>11} {'Katz s':>8} {'Katz/diff':>9} {'vs plain':>8}")
    for name, d, k in rows:
        print(f"{name:58} {d:11.2f} {k:8.2f} {k / d:9.2f} {k / res['katz_plain_s']:8.3f}")
    print(f"LoRA add-on cost: diffusers +{(res['diffusers_cold_lora_s'] / base - 1) * 100:.1f}%, "
          f"Katz k=0 +{(res['katz_cold_lora_k0_s'] / res['katz_plain_s'] - 1) * 100:.1f}%, "
          f"Katz BAL +{(res['katz_cold_lora_bal_s'] / res['katz_plain_s'] - 1) * 100:.1f}% "
          f"(LoRA load {res['katz_lora_load_s_mean']:.2f}s, in from steps {res['katz_bal_applied_steps']})")
    print(f"peak GPU memory: diffusers {res['diffusers_peak_gb']:.1f} GB, Katz {res['katz_peak_gb']:.1f} GB")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
