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
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sdxl_random import build, write_lora  # noqa: E402
from katz.lora.readahead import evict  # noqa: E402

UNET_STEP_TFLOP = 13.5  # SDXL UNet, batch 2, 1024² (issue 7's count)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_ms(fn, warmup=3, repeats=10) -> float:
    """Median time of ``fn`` in ms: CUDA events on a GPU host, the wall clock on a CPU-only one."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            continue
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
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_device() -> tuple[str, torch.dtype]:
    """``("cuda", float16)`` on a GPU host; ``("cpu", float32)`` elsewhere (CPU smoke runs, not figures)."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def kernel_profile(fn, top: int = 12) -> dict:
    """GPU kernel time of one call of ``fn``, by kind (matmul/conv, attention, norm, other; inductor's
    generated Triton kernels as fused norm / fused other) and top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    rows = []
    for evt in prof.key_averages():
        ms = getattr(evt, "self_device_time_total", 0) / 1e3
        if ms <= 0:
            continue
        name = evt.key.lower()
        kind = ("attention" if any(k in name for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated"))
                else "matmul/conv" if any(k in name for k in ("gemm", "sm90", "cutlass", "conv", "xmma", "cublas",
                                                               "implicit", "wgrad", "dgrad", "fprop"))
                else ("fused norm" if "norm" in name else "fused other") if name.startswith("triton_")  # inductor's
                else "norm" if "norm" in name else "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        rows.append((ms, kind, evt.key[:90], evt.count))
    rows.sort(reverse=True)
    return {"total_ms": sum(kinds.values()), "by_kind_ms": kinds, "top": rows[:top]}


def layout_variants(eng, step_args) -> dict:
    """Where the UNet step's GPU time goes (eager kernel profile), and two layout candidates, each with a
    CUDA graph as the engine runs: channels-last weights and cuDNN autotuning."""
    import copy

    from katz.engines.torch.cuda_graphs import CudaGraphs

    out: dict = {}
    with torch.no_grad():
        out["unet_eager_kernels"] = kernel_profile(lambda: eng.eager_step(*step_args, None, None))
        # the UNet in channels-last layout (no NCHW<->NHWC conversions around cuDNN convolutions), on a copy:
        # converting the engine's own weights would leave its captured graphs reading the old storage
        ref = eng.eager_step(*step_args, None, None)
        unet_cl = copy.deepcopy(eng.unet).to(memory_format=torch.channels_last)

        def step_cl(sample, t, hidden, added):
            return unet_cl(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

        graph = CudaGraphs(step_cl, "unet.step.channels_last")
        graph.capture(*step_args)
        out["unet_graph_channels_last_ms"] = device_ms(lambda: graph(*step_args))
        out["unet_channels_last_max_abs_diff"] = float((graph(*step_args) - ref).abs().max())
        del graph, unet_cl
        torch.cuda.empty_cache()
        # cuDNN autotuning: the convolutions' algorithms timed at capture instead of picked by heuristics
        was = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            graph = CudaGraphs(eng.eager_step, "unet.step.cudnn_benchmark")
            graph.capture(*step_args, None, None)
            out["unet_graph_cudnn_benchmark_ms"] = device_ms(lambda: graph(*step_args, None, None))
            out["unet_cudnn_benchmark_max_abs_diff"] = float((graph(*step_args, None, None) - ref).abs().max())
            print(f"UNet graph, cuDNN autotuned: {out['unet_graph_cudnn_benchmark_ms']:.1f} ms "
                  f"(max |diff| {out['unet_cudnn_benchmark_max_abs_diff']:.2e})", flush=True)
            del graph
        finally:
            torch.backends.cudnn.benchmark = was
        torch.cuda.empty_cache()
    print_kernels("UNet step", out["unet_eager_kernels"])
    print(f"UNet graph, channels-last: {out['unet_graph_channels_last_ms']:.1f} ms "
          f"(max |diff| to NCHW {out['unet_channels_last_max_abs_diff']:.2e})", flush=True)
    return out


def print_kernels(what: str, k: dict) -> None:
    print(f"{what} GPU kernel time {k['total_ms']:.1f} ms by kind "
          f"{ {a: round(b, 1) for a, b in k['by_kind_ms'].items()} }", flush=True)
    for row in k["top"]:
        print(f"   {row[0]:7.2f} ms  {row[1]:12} x{row[3]:<4} {row[2]}")


def compiled_graph(fn, args: tuple, name: str, eager=None) -> tuple[object, float]:
    """``fn`` under torch.compile (inductor default mode) captured as one CUDA graph for ``args``;
    returns ``(graph, seconds to compile and capture)``."""
    from katz.engines.torch.cuda_graphs import CudaGraphs

    t0 = time.perf_counter()
    graph = CudaGraphs(torch.compile(fn, dynamic=False), name, eager=eager or fn)
    graph.capture(*args)
    return graph, time.perf_counter() - t0


def compile_variant(eng, step_args) -> dict:
    """The UNet step compiled (inductor default mode) + one CUDA graph (batch 2), and its kernels."""
    out: dict = {}
    with torch.no_grad():
        ref = eng.eager_step(*step_args, None, None)
        graph, out["unet_compile_s"] = compiled_graph(eng.eager_step, (*step_args, None, None), "unet.step.compiled")
        out["unet_graph_compiled_ms"] = device_ms(lambda: graph(*step_args, None, None))
        out["unet_compiled_max_abs_diff"] = float((graph(*step_args, None, None) - ref).abs().max())
        print(f"compiled + graph: {out['unet_graph_compiled_ms']:.1f} ms (compile {out['unet_compile_s']:.0f} s, "
              f"max |diff| {out['unet_compiled_max_abs_diff']:.2e})", flush=True)
        # the compiled step's kernels (the same the graph replays; already compiled, so no recompile)
        out["unet_compiled_kernels"] = kernel_profile(lambda: graph.fn(*step_args, None, None))
        print_kernels("compiled UNet step", out["unet_compiled_kernels"])
        del graph
        torch.cuda.empty_cache()
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def _float32(tree):
    return torch.utils._pytree.tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t,
                                        tree)


@contextlib.contextmanager
def eager_modules(eng, cne, unet, controlnets: dict):
    """Run the in-process ensemble's UNet engine ``eng`` with ``unet`` and its ControlNet engine ``cne`` with
    ``controlnets`` (name -> net), eagerly (no captured graphs), for the length of the block."""
    saved = eng.unet, eng._graphs, dict(cne.nets), cne._graphs
    eng.unet, eng._graphs, cne._graphs = unet, {}, {}
    cne.nets.update(controlnets)
    try:
        yield
    finally:
        eng.unet, eng._graphs, cne._graphs = saved[0], saved[1], saved[3]
        cne.nets.clear()
        cne.nets.update(saved[2])


def fp8_variants(ens, eng, cne, step_args, img, requests: dict, res: dict, rowwise: bool = False,
                 controlnet: bool = True) -> dict:
    """Float8 transformer linears (:mod:`katz.engines.torch.experimental.fp8`; ``rowwise``: per-row/channel scales, keys end
    in ``_row``) on copies of the engines' UNet and (``controlnet``) ControlNet:

    * the UNet step (batch 2) and the ControlNet step, each with a CUDA graph and compiled + graph,
      against float16 compiled + graph (:func:`compile_variant` here unless it ran already);
    * the divergence: one step's noise prediction (relative L2 error of float16 and of float8 against a
      float32 copy of the UNet; the ControlNet's residuals against float16), and whole requests
      (``requests``: name -> request, run eagerly with float16 and with float8 modules) as PSNR of the
      uint8 images and their largest pixel difference.
    """
    import copy
    import functools

    from bench.bal_quality import psnr
    from katz.engines.torch.cuda_graphs import CudaGraphs
    from katz.engines.torch.experimental.fp8 import quantize_linears
    from katz.engines.torch.controlnet import ControlNetEngine

    out: dict = {}
    tag = "_row" if rowwise else ""

    def timed(name, fn, args, compile_):
        if compile_:
            graph, out[f"{name}_compile_s"] = compiled_graph(fn, args, name)
        else:
            graph = CudaGraphs(fn, name)
            graph.capture(*args)
        ms = out[f"{name}_ms"] = device_ms(lambda: graph(*args))
        result = graph(*args)
        print(f"{name}: {ms:.1f} ms" + (f" (compile {out[f'{name}_compile_s']:.0f} s)" if compile_ else ""), flush=True)
        return graph, result

    with torch.no_grad():
        # ---- UNet
        ref = eng.eager_step(*step_args, None, None)
        unet32 = copy.deepcopy(eng.unet).float()
        a32 = _float32(step_args)
        ref32 = unet32(a32[0], a32[1], encoder_hidden_states=a32[2], added_cond_kwargs=a32[3], return_dict=False)[0]
        del unet32
        torch.cuda.empty_cache()
        unet8 = copy.deepcopy(eng.unet)
        out[f"fp8{tag}_unet_linears"] = len(quantize_linears(unet8, rowwise))

        def step8(sample, t, hidden, added):
            return unet8(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

        out8 = step8(*step_args)
        out["unet_fp16_rel_err_to_fp32"] = _rel_err(ref, ref32)
        out[f"unet_fp8{tag}_rel_err_to_fp32"] = _rel_err(out8, ref32)
        out[f"unet_fp8{tag}_rel_err_to_fp16"] = _rel_err(out8, ref)
        print(f"UNet step's noise prediction, relative L2 error to float32: float16 {out['unet_fp16_rel_err_to_fp32']:.2e}, "
              f"float8{tag} {out[f'unet_fp8{tag}_rel_err_to_fp32']:.2e} ({out[f'fp8{tag}_unet_linears']} linears)",
              flush=True)
        graph, _ = timed(f"unet_graph_fp8{tag}", step8, step_args, False)
        del graph
        if "unet_graph_compiled_ms" not in res:  # float16 compiled + graph in this run, unless measured already
            out.update(compile_variant(eng, step_args))
        graph, _ = timed(f"unet_graph_fp8{tag}_compiled", step8, step_args, True)
        out[f"unet_fp8{tag}_compiled_kernels"] = kernel_profile(lambda: graph.fn(*step_args))
        print_kernels(f"compiled float8{tag} UNet step", out[f"unet_fp8{tag}_compiled_kernels"])
        del graph
        torch.cuda.empty_cache()

        # ---- ControlNet (the engine's graph body: features in, residuals at scale 1 out)
        name = sorted(cne.nets)[0]
        net8 = None
        if controlnet:
            net = cne.nets[name]
            feats = net.controlnet_cond_embedding.inner(img)
            cn_args = (*step_args, feats)
            net8 = copy.deepcopy(net)
            out[f"fp8{tag}_controlnet_linears"] = len(quantize_linears(net8, rowwise))
            body16 = functools.partial(ControlNetEngine.graph_body, net)
            body8 = functools.partial(ControlNetEngine.graph_body, net8)
            if "controlnet_graph_compiled_ms" not in res:
                graph, (down16, mid16) = timed("controlnet_graph_compiled", body16, cn_args, True)
            else:
                graph, (down16, mid16) = None, body16(*cn_args)
            down16, mid16 = [d.clone() for d in down16], mid16.clone()
            del graph
            graph, _ = timed(f"controlnet_graph_fp8{tag}", body8, cn_args, False)
            del graph
            graph, (down8, mid8) = timed(f"controlnet_graph_fp8{tag}_compiled", body8, cn_args, True)
            out[f"controlnet_fp8{tag}_rel_err_to_fp16"] = max(
                _rel_err(a, b) for a, b in zip([*down8, mid8], [*down16, mid16]))
            del graph
            torch.cuda.empty_cache()

    # ---- whole requests, eagerly, float16 vs float8 modules (the same seeds, the same everything else)
    for case, req in requests.items():
        with eager_modules(eng, cne, eng.unet, {}):
            a = np.asarray(ens.generate(dict(req))["image"])
        with eager_modules(eng, cne, unet8, {name: net8} if net8 is not None else {}):
            b = np.asarray(ens.generate(dict(req))["image"])
        out[f"fp8{tag}_{case}_image_psnr_db"] = psnr(a, b)
        out[f"fp8{tag}_{case}_image_max_abs_diff"] = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        print(f"float8{tag} vs float16 image, {case} request: PSNR {out[f'fp8{tag}_{case}_image_psnr_db']:.1f} dB, "
              f"largest pixel difference {out[f'fp8{tag}_{case}_image_max_abs_diff']}", flush=True)
    del unet8, net8
    torch.cuda.empty_cache()
    return out


def vae_variants(vae_engine, latents: torch.Tensor, compile_variant: bool = False) -> dict:
    """Where the VAE decode's GPU time goes (kernel profile) and candidate speed-ups, each against the
    engine's own decode: cuDNN autotuning (``torch.backends.cudnn.benchmark``), channels-last, bf16,
    one CUDA graph, and (``compile_variant``) torch.compile + CUDA graph. ``latents``: ``[1, 4, h, w]``."""
    import copy

    from katz.engines.torch.cuda_graphs import CudaGraphs

    out: dict = {}
    vae = vae_engine.vae
    lat = latents.to(vae_engine.device, vae_engine.compute_dtype) / vae_engine.scaling_factor

    def decode(net, x):
        return net.decode(x, return_dict=False)[0]

    def variant(name, fn, ref=None):
        ms = device_ms(fn, warmup=2, repeats=3)
        out[f"vae_{name}_ms"] = ms
        diff = float((fn().float() - ref).abs().max()) if ref is not None else 0.0
        out[f"vae_{name}_max_abs_diff"] = diff
        print(f"VAE decode {name}: {ms:.1f} ms (max |diff| to NCHW fp16 {diff:.2e})", flush=True)

    was = torch.backends.cudnn.benchmark
    with torch.no_grad():
        ref = decode(vae, lat).float()
        variant("eager", lambda: decode(vae, lat))
        out["vae_eager_kernels"] = kernel_profile(lambda: decode(vae, lat))
        k = out["vae_eager_kernels"]
        print(f"VAE decode GPU kernel time {k['total_ms']:.1f} ms by kind "
              f"{ {a: round(b, 1) for a, b in k['by_kind_ms'].items()} }", flush=True)
        for row in k["top"]:
            print(f"   {row[0]:7.2f} ms  {row[1]:12} x{row[3]:<4} {row[2]}")
        torch.backends.cudnn.benchmark = True
        try:
            variant("cudnn_benchmark", lambda: decode(vae, lat), ref)
            vae_cl = copy.deepcopy(vae).to(memory_format=torch.channels_last)
            lat_cl = lat.contiguous(memory_format=torch.channels_last)
            variant("cudnn_benchmark_channels_last", lambda: decode(vae_cl, lat_cl), ref)
            del vae_cl
            vae_bf = copy.deepcopy(vae).to(torch.bfloat16)
            lat_bf = lat.to(torch.bfloat16)
            variant("cudnn_benchmark_bf16", lambda: decode(vae_bf, lat_bf), ref)
            del vae_bf
            graph = CudaGraphs(lambda x: decode(vae, x), "vae.decode")
            graph.capture(lat)
            variant("cudnn_benchmark_graph", lambda: graph(lat), ref)
            out["vae_cudnn_benchmark_kernels"] = kernel_profile(lambda: graph(lat))
            del graph
            torch.cuda.empty_cache()
            if compile_variant:
                t0 = time.perf_counter()
                graph = CudaGraphs(torch.compile(lambda x: decode(vae, x), dynamic=False), "vae.decode.compiled")
                graph.capture(lat)
                out["vae_compile_s"] = time.perf_counter() - t0
                variant("compiled_graph", lambda: graph(lat), ref)
                del graph
                torch.cuda.empty_cache()
        finally:
            torch.backends.cudnn.benchmark = was
    return out


def diffusers_baseline(folder: Path, lora_dir: Path, args, control, prompt: str, res: dict,
                       requests: bool = True) -> None:
    """Stock diffusers on this GPU: UNet/ControlNet step and VAE decode alone, then (``requests``) whole
    requests (plain, with the ControlNet, with the cold LoRA loaded and fused per request, and with
    both unless ``args.cases`` leaves that case out); into ``res``."""
    import diffusers

    from katz.models.unet import unet_example_inputs
    from katz.models.folder import ModelFolder

    device, dtype = bench_device()
    model_folder = ModelFolder(folder)
    sdxl = model_folder.family == "sdxl"
    cn = diffusers.ControlNetModel.from_pretrained(folder / "controlnets" / "canny", torch_dtype=dtype)
    with_cn = diffusers.StableDiffusionXLControlNetPipeline if sdxl else diffusers.StableDiffusionControlNetPipeline
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = with_cn.from_pretrained(folder, controlnet=cn, torch_dtype=dtype, **extra).to(device)
    plain = (diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline).from_pipe(
        pipe, torch_dtype=dtype)
    for q in (pipe, plain):
        q.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np")

    # UNet step alone (batch 2)
    x = unet_example_inputs(model_folder, 2, args.size, args.size, device, dtype)
    lat, ehs, cond = x["sample"], x["encoder_hidden_states"], x["added_cond"]
    with torch.no_grad():
        res["unet_step_ms"] = device_ms(lambda: plain.unet(lat, 500, ehs, added_cond_kwargs=cond))
        img = torch.rand(2, 3, args.size, args.size, device=device, dtype=dtype)
        res["controlnet_step_ms"] = device_ms(lambda: cn(lat, 500, ehs, img, added_cond_kwargs=cond))
        lat1 = lat[:1] / plain.vae.config.scaling_factor

        def diffusers_decode():  # as the SDXL pipeline decodes: upcast to fp32 when the VAE asks for it
            vae = plain.vae
            if sdxl and vae.config.force_upcast and dtype == torch.float16:
                vae.to(torch.float32)
                out = vae.decode(lat1.float(), return_dict=False)[0]
                vae.to(torch.float16)
                return out
            return vae.decode(lat1, return_dict=False)[0]

        res["vae_decode_ms"] = device_ms(diffusers_decode, warmup=1, repeats=3)
    if sdxl and args.size == 1024 and not getattr(args, "preset", None):  # the full-size count
        res["unet_tflops"] = UNET_STEP_TFLOP / res["unet_step_ms"] * 1e3
    print(f"UNet step {res['unet_step_ms']:.1f} ms ({res.get('unet_tflops', float('nan')):.0f} TFLOP/s), "
          f"ControlNet step {res['controlnet_step_ms']:.1f} ms, matmul {res['matmul_tflops']:.2f} TFLOP/s", flush=True)

    def gen(q, **extra):
        return lambda: q(prompt, generator=torch.Generator().manual_seed(1), **kw, **extra)

    if not requests:
        del pipe, plain, cn
        if device == "cuda":
            torch.cuda.empty_cache()
        return

    plain(prompt, **{**kw, "num_inference_steps": 2})  # warm-up
    res["diffusers_plain_s"] = wall(gen(plain), args.repeats)
    res["diffusers_controlnet_s"] = wall(gen(pipe, image=control), args.repeats)

    def cold_lora(q, **extra):
        def run():
            evict(lora_dir / "style.safetensors")
            q.load_lora_weights(lora_dir, weight_name="style.safetensors", adapter_name="style")
            q.fuse_lora(lora_scale=1.0)
            gen(q, **extra)()
            q.unfuse_lora()
            q.unload_lora_weights()
        return run

    res["diffusers_cold_lora_s"] = wall(cold_lora(plain), args.repeats)
    if getattr(args, "cases", None) is None or "controlnet_cold_lora" in args.cases:
        res["diffusers_controlnet_cold_lora_s"] = wall(cold_lora(pipe, image=control), args.repeats)
    res["diffusers_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    # what the process held at its peak (torch's cache included; its CUDA context comes on top), the
    # figure comparable to a server process's nvidia-smi memory
    res["diffusers_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9 if device == "cuda" else float("nan")
    print(f"diffusers: plain {res['diffusers_plain_s']:.2f}s, ControlNet {res['diffusers_controlnet_s']:.2f}s, "
          f"cold LoRA {res['diffusers_cold_lora_s']:.2f}s", flush=True)
    del pipe, plain, cn
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()



def prepare(args) -> tuple[Path, Path, object, str, dict]:
    """Build (or reuse) the random SDXL folder and its LoRA, measure the matmul ceiling; returns
    ``(folder, lora_dir, control image, prompt, results)``."""
    device, _ = bench_device()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    res: dict = {"device": name, "torch": torch.__version__, "steps": args.steps,
                 "python": platform.python_version()}
    t0 = time.perf_counter()
    if getattr(args, "preset", None):  # a tiny preset: the CPU smoke run; LoRAs copied to a folder of its own
        from katz.models.folder import ModelFolder
        from katz.models.presets import ensure_preset

        folder = ensure_preset(args.preset)
        args.size = args.size or ModelFolder(folder).default_size
        lora_dir = Path(tempfile.mkdtemp(prefix="katz-bench-loras-"))
        shutil.copy(folder / "loras" / "style.safetensors", lora_dir / "style.safetensors")
    else:
        folder = build(args.model_dir)
        args.size = args.size or 1024
        # a rank-64 LoRA on every attention projection of the UNet (issue 3's 186 MB case in float16)
        lora_dir = args.model_dir / "loras"
        write_lora(lora_dir / "style.safetensors", rank=args.lora_rank, dtype=args.lora_dtype)
    res["build_s"] = time.perf_counter() - t0
    res["size"] = args.size
    res["lora_mb"] = (lora_dir / "style.safetensors").stat().st_size / 1e6
    print(f"model folder ready in {res['build_s']:.0f}s", flush=True)

    # ---------------------------------------------------------------- ceilings
    n, mm_dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    x = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm = device_ms(lambda: x @ x)
    res["matmul_tflops"] = 2 * n**3 / mm / 1e9
    del x

    from PIL import Image

    rng = np.random.RandomState(0)
    control = Image.fromarray(rng.randint(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    prompt = "a photo of a red house on a mountain"
    return folder, lora_dir, control, prompt, res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-dtype", default="float16", choices=["float16", "float32"],
                   help="the benchmark LoRA's weights: 186 MB (float16) or 372 MB (float32) at rank 64")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="Katz engines eager")
    p.add_argument("--compile", action="store_true", help="Katz engines: torch.compile before graph capture")
    p.add_argument("--variants", default="layout,vae",
                   help="comma-separated engine variants to measure: layout (the UNet step's eager kernels, "
                        "channels-last, cuDNN autotuning), vae (the VAE decode's kernels, cuDNN autotuning, "
                        "channels-last, bf16, one graph), compile (the UNet step compiled + graph and its kernels; "
                        "with vae also the VAE decode), fp8 (float8 transformer linears: UNet and ControlNet step "
                        "with a graph and compiled + graph, their error, and the image divergence of a plain and "
                        "a ControlNet request); none: no variant")
    p.add_argument("--compile-variant", action="store_true", help="add compile to --variants (compiles for minutes)")
    p.add_argument("--fp8-rowwise", action="store_true",
                   help="the fp8 variant with per-row (input) and per-channel (weight) scales instead of per tensor")
    p.add_argument("--fp8-unet-only", action="store_true", help="the fp8 variant without the ControlNet's steps")
    p.add_argument("--only-engines", action="store_true",
                   help="stop after the per-component engine timings (no request-level runs)")
    args = p.parse_args()
    variants = {v for v in args.variants.split(",") if v and v != "none"} | ({"compile"} if args.compile_variant else set())
    unknown = variants - {"layout", "vae", "compile", "fp8"}
    if unknown:
        p.error(f"unknown --variants {', '.join(sorted(unknown))}")
    folder, lora_dir, control, prompt, res = prepare(args)

    def save() -> None:  # after every part, so a run cut off at the device limit keeps what it measured
        if args.out:
            args.out.write_text(json.dumps(res, indent=2))
    diffusers_baseline(folder, lora_dir, args, control, prompt, res, requests=not args.only_engines)

    # ---------------------------------------------------------------- Katz
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.deployment import Deployment
    from katz.serving.local import LocalEnsemble

    mf = ModelFolder(folder, discover_controlnets(folder / "controlnets"))
    dep = Deployment(mf.path, mf.controlnets, lora_dir, Limits(default_width=args.size, default_height=args.size),
                     device="cuda", dtype="float16", cuda_graphs=args.cuda_graphs, compile=args.compile,
                     compile_cache=Path("/tmp/katz-inductor"), graph_sizes=[(args.size, args.size)], controlnet_mode="inline")
    t0 = time.perf_counter()
    ens = LocalEnsemble(dep)
    res["katz_load_s"] = time.perf_counter() - t0
    print(f"Katz loaded in {res['katz_load_s']:.0f}s", flush=True)
    unet = ens.models["unet"]

    # ---------------------------------------------------------------- Katz engines alone
    from katz.models.unet import unet_example_inputs

    eng = unet.engine
    x = unet_example_inputs(mf, 2, args.size, args.size, "cuda", torch.float16)
    step_args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"])
    cne = ens.models["controlnet"].engine
    img = torch.rand(2, 3, args.size, args.size, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        res["katz_unet_step_eager_ms"] = device_ms(lambda: eng.eager_step(*step_args, None, None))
        res["katz_unet_step_ms"] = device_ms(lambda: eng(*step_args))
        res["katz_unet_graph_max_abs_diff"] = float((eng(*step_args) - eng.eager_step(*step_args, None, None)).abs().max())
        state = eng.down(*step_args)
        res["katz_unet_down_ms"] = device_ms(lambda: eng.down(*step_args))
        res["katz_unet_up_ms"] = device_ms(lambda: eng.up(state, None, None))
        cn_args = ("canny", x["sample"], x["timestep"][:1], x["encoder_hidden_states"], x["added_cond"], img, 1.0)
        res["katz_controlnet_step_ms"] = device_ms(lambda: cne(*cn_args, "bench-image"))
        vae = ens.models["vae_decoder"].engine
        res["katz_vae_decode_ms"] = device_ms(lambda: vae(x["sample"][:1]), warmup=1, repeats=3)
    res["katz_unet_tflops"] = UNET_STEP_TFLOP / res["katz_unet_step_ms"] * 1e3
    res["katz_warmup_s"] = {"unet": eng.warmup_s, "controlnet": cne.warmup_s, "vae_decoder": vae.warmup_s}
    save()
    if "layout" in variants:
        res.update(layout_variants(eng, step_args))
        save()
    if "compile" in variants:
        res.update(compile_variant(eng, step_args))
        save()
    if "vae" in variants:
        res.update(vae_variants(vae, x["sample"][:1], "compile" in variants))
        save()
    print(f"Katz engines: UNet step {res['katz_unet_step_ms']:.1f} ms (eager {res['katz_unet_step_eager_ms']:.1f}, "
          f"graph vs eager max |diff| {res['katz_unet_graph_max_abs_diff']:.2e}; down {res['katz_unet_down_ms']:.1f} "
          f"+ up {res['katz_unet_up_ms']:.1f}), ControlNet step {res['katz_controlnet_step_ms']:.1f} ms, "
          f"VAE decode {res['katz_vae_decode_ms']:.1f} ms (diffusers {res['vae_decode_ms']:.1f})", flush=True)
    print(f"ratios to diffusers eager: UNet {res['katz_unet_step_ms'] / res['unet_step_ms']:.2f}, "
          f"ControlNet {res['katz_controlnet_step_ms'] / res['controlnet_step_ms']:.2f}, "
          f"VAE {res['katz_vae_decode_ms'] / res['vae_decode_ms']:.2f}", flush=True)
    import io

    buf = io.BytesIO()
    control.save(buf, "PNG")

    def req(**extra):
        r = {"prompt": np.array([prompt.encode()], object), "seed": np.array([1], np.int64),
             "steps": np.array([args.steps], np.int32)}
        r.update(extra)
        return r

    cn_req = dict(controlnets=np.array([b"canny"], object), control_images=np.array([buf.getvalue()], object))
    if "fp8" in variants:
        tag = "_row" if args.fp8_rowwise else ""
        res.update(fp8_variants(ens, eng, cne, step_args, img, {"plain": req(), "controlnet": req(**cn_req)}, res,
                                rowwise=args.fp8_rowwise, controlnet=not args.fp8_unet_only))
        ratios = [f"UNet step {res[f'unet_graph_fp8{tag}_compiled_ms'] / res['unet_step_ms']:.2f} (float16 compiled "
                  f"{res['unet_graph_compiled_ms'] / res['unet_step_ms']:.2f})"]
        if not args.fp8_unet_only:
            ratios.append(f"ControlNet step {res[f'controlnet_graph_fp8{tag}_compiled_ms'] / res['controlnet_step_ms']:.2f} "
                          f"(float16 compiled {res['controlnet_graph_compiled_ms'] / res['controlnet_step_ms']:.2f})")
        print(f"float8{tag} ratios to diffusers eager: {', '.join(ratios)}", flush=True)
        save()
    if args.only_engines:
        return

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

    ens.generate(req(steps=np.array([2], np.int32)))  # warm-up
    res["katz_plain_s"] = wall(lambda: ens.generate(req()), args.repeats)
    res["katz_controlnet_s"] = wall(lambda: ens.generate(req(**cn_req)), args.repeats)

    applied = []

    def katz_cold_lora(k):
        def run():
            ens.forget_loras()
            evict(lora_dir / "style.safetensors")
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
    save()


if __name__ == "__main__":
    main()
