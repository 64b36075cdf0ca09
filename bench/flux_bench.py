"""Katz vs stock diffusers, FLUX.1-dev architecture (random weights), one GPU, one process (issue 25).

    python bench/flux_bench.py --compile --fp8 --compile-cache out/inductor --out flux.json   # GPU host
    python bench/flux_bench.py --preset tiny-flux --steps 2 --repeats 1                        # CPU smoke run

The modules are built once, directly on the GPU, with seeded random weights at FLUX.1-dev's sizes
(transformer 12 B parameters, T5-XXL encoder, CLIP-L, the FLUX VAE, an InstantX-layout ControlNet
with 5 double and 10 single blocks), in bfloat16: two copies of the transformer do not fit one
80 GB GPU, so diffusers' pipelines and Katz's engines share the same module objects. Katz's models
(:class:`katz.serving.local.LocalEnsemble`, the classes Triton runs) load them from a folder that
holds the configs, tokenizers and scheduler, whose weight loads return the shared modules.

Phases (``--phases``, in this order, since Katz changes the shared modules in place: float8 block
linears, compiled blocks, LoRAs merged into the weights), each a median of ``--repeats`` after a
warm-up; the JSON is written after each part, so a run cut off keeps what it measured:

* ``step``: one transformer evaluation at batch 1 (CUDA events): diffusers' module call, then Katz's
  engine eager, compiled (``--compile``: each block class compiled once) and with float8 block
  linears (``--fp8``; compiled too with ``--compile``);
* ``request``: whole requests (``--steps``, 1024², guidance 3.5): plain, and with one ControlNet and
  a cold LoRA (a rank-64 bfloat16 file on every attention and feed-forward linear of the transformer,
  its pages dropped from the page cache before each request). diffusers: ``FluxPipeline`` /
  ``FluxControlNetPipeline`` with ``load_lora_weights`` + ``fuse_lora`` per request (and
  ``unfuse_lora`` + ``unload_lora_weights`` after it, inside the timing); Katz: the in-process ensemble
  with its LoRA manager loading the same file cold, synchronously (k = 0) and with BAL (``--bal-k``).

Prints the elapsed time per phase and a ratio table at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_bench import device_ms, wall  # noqa: E402
from katz.lora.readahead import evict  # noqa: E402
from katz.models.folder import provided_modules  # noqa: E402

PHASES = ("step", "request")
PROMPT = "a photo of a red house on a mountain"
GUIDANCE = 3.5
CONTROL_SCALE = 0.9

# black-forest-labs/FLUX.1-dev's components
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
CONTROLNET = dict(TRANSFORMER, num_layers=5, num_single_layers=10)  # InstantX layout (no input_hint_block)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
              is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
              bos_token_id=0, eos_token_id=2)  # eos 2: pool at the highest token id, as the local tokenizer's
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
PARTS = ("transformer", "controlnet", "text_encoder", "text_encoder_2", "vae")


def elapsed(res: dict, phase: str, start: float) -> None:
    res.setdefault("phase_s", {})[phase] = round(time.perf_counter() - start, 1)
    print(f"[{phase}: {res['phase_s'][phase]:.1f} s]", flush=True)


# ------------------------------------------------------------------------------------------ modules
@torch.no_grad()
def _random_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded random weights scaled like a trained net's (std 1/sqrt(fan_in)), so activations stay finite in
    bfloat16 over 57 blocks; norms and biases keep their initial values."""
    for p in module.parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)


def build_full(device: str, dtype: torch.dtype) -> dict:
    """The FLUX.1-dev-size modules, made on ``device`` in ``dtype`` (no copy ever on the host)."""
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    gen = torch.Generator(device).manual_seed(0)
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            modules = {
                "transformer": FluxTransformer2DModel(**TRANSFORMER),
                "controlnet": FluxControlNetModel(**CONTROLNET),
                "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "vae": AutoencoderKL(**VAE),
            }
    finally:
        torch.set_default_dtype(was)
    for m in modules.values():
        _random_(m, gen)
        m.to(dtype).eval().requires_grad_(False)
    return modules


def build_tiny(device: str, dtype: torch.dtype) -> dict:
    """The tiny-flux preset's modules (:mod:`katz.models.presets`), for the CPU smoke run."""
    from katz.models.presets import _controlnet_flux, _t5_encoder, _text_encoder, _transformer_flux, _vae_flux

    transformer = _transformer_flux(seed=4, guidance=True)
    modules = {"transformer": transformer, "controlnet": _controlnet_flux(transformer, seed=5),
               "text_encoder_2": _t5_encoder(seed=3), "text_encoder": _text_encoder(with_projection=False, seed=2),
               "vae": _vae_flux(seed=1)}
    return {k: m.to(device, dtype).eval().requires_grad_(False) for k, m in modules.items()}


def write_folder(out: Path, modules: dict) -> Path:
    """A diffusers FLUX folder of ``modules``' configs, tokenizers (built locally) and scheduler; each weight
    file is an empty placeholder, as the weights come from ``modules`` (:func:`katz.models.folder.provided_modules`)."""
    from safetensors.torch import save_file

    from katz.models.presets import _scheduler_flux, write_t5_tokenizer, write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for part, weights in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("controlnets/canny", "diffusion_pytorch_model"), ("text_encoder", "model"),
                          ("text_encoder_2", "model")):
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        module = modules["controlnet" if part.startswith("controlnets") else part]
        if hasattr(module, "save_config"):  # diffusers
            module.save_config(folder)
        else:  # transformers
            module.config.save_pretrained(folder)
        save_file({}, str(folder / f"{weights}.safetensors"))
    write_tokenizer(out / "tokenizer")
    write_t5_tokenizer(out / "tokenizer_2")
    _scheduler_flux(schnell=False).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_lora(path: Path, transformer: torch.nn.Module, rank: int, dtype: torch.dtype) -> Path:
    """A seeded random FLUX LoRA (peft names) of ``rank`` on every attention and feed-forward linear of the
    transformer's blocks (the single blocks' ``proj_mlp`` / ``proj_out`` too), down/up in ``dtype``."""
    from katz.engines.torch.experimental.fp8 import FLUX_TARGETS
    from katz.lora.random import make_random_flux_lora

    make_random_flux_lora(path, transformer, None, rank, seed=1, fmt="peft", dtype=dtype, pattern=FLUX_TARGETS)
    return path


def step_args(transformer, size: int, device, dtype, text_len: int) -> dict:
    from katz.diffusion.flux import latent_image_ids, latent_size
    from katz.engines.torch.transformer import flux_example_inputs

    gen = torch.Generator(device).manual_seed(2)
    x = flux_example_inputs(transformer.config, size, size, device, dtype, text_len)
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        x[name] = torch.randn(x[name].shape, generator=gen, device=device, dtype=dtype)
    x["img_ids"] = latent_image_ids(*latent_size(size, size, 8), device, dtype)  # each token's (0, row, column)
    return x


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------ phases
def step_phase_diffusers(modules, args, res, device, dtype, text_len) -> None:
    transformer = modules["transformer"]
    x = step_args(transformer, args.size, device, dtype, text_len)
    with torch.no_grad():
        res["diffusers_step_ms"] = device_ms(lambda: transformer(**x, return_dict=False), warmup=2,
                                             repeats=args.repeats)
    print(f"diffusers transformer step: {res['diffusers_step_ms']:.1f} ms", flush=True)


def step_phase_katz(modules, args, res, device, dtype, text_len, save) -> None:
    from katz.engines.torch.cuda_graphs import Acceleration
    from katz.engines.torch.transformer import FluxTransformerEngine

    transformer = modules["transformer"]
    x = step_args(transformer, args.size, device, dtype, text_len)
    outputs: dict[str, torch.Tensor] = {}

    def measure(name: str, accel: Acceleration | None) -> None:
        t0 = time.perf_counter()
        engine = FluxTransformerEngine.from_module(transformer, accel=accel)
        res[f"katz_step_{name}_warmup_s"] = engine.warm_up([(args.size, args.size)], text_len)
        with torch.no_grad():
            out = outputs[name] = engine(**x).clone()
            # against Katz eager on these weights (diffusers' LoRA fuse + unfuse in bfloat16 left them
            # a rounding away from the ones its own step ran on)
            res[f"katz_step_{name}_rel_err"] = _rel_err(out, outputs["eager"])
            res[f"katz_step_{name}_ms"] = device_ms(lambda: engine(**x), warmup=2, repeats=args.repeats)
        res[f"katz_step_{name}_accelerated"] = engine.accel is not None
        engine.release()  # the next variant attaches its own compiled blocks
        print(f"Katz transformer step, {name}: {res[f'katz_step_{name}_ms']:.1f} ms "
              f"({res[f'katz_step_{name}_ms'] / res['diffusers_step_ms']:.2f}x diffusers; warm-up "
              f"{res[f'katz_step_{name}_warmup_s']:.0f} s, relative error to eager "
              f"{res[f'katz_step_{name}_rel_err']:.1e}; phase {time.perf_counter() - t0:.0f} s)", flush=True)
        save()

    measure("eager", None)
    common = dict(cuda_graphs=False, compile_cache=args.compile_cache)
    if args.compile:
        measure("compiled", Acceleration(compile=True, **common))
    if args.fp8:  # last: it leaves the module's block linears float8 (the requests then run them so)
        measure("compiled_fp8" if args.compile else "fp8", Acceleration(compile=args.compile, fp8=True, **common))


def diffusers_pipelines(folder: Path, modules: dict):
    import diffusers

    from katz.models.folder import ModelFolder

    tokenizers = ModelFolder(folder).load_tokenizers()
    common = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                  vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizers["tokenizer"],
                  text_encoder_2=modules["text_encoder_2"], tokenizer_2=tokenizers["tokenizer_2"],
                  transformer=modules["transformer"])
    plain = diffusers.FluxPipeline(**common)
    with_cn = diffusers.FluxControlNetPipeline(**common, controlnet=modules["controlnet"])
    for p in (plain, with_cn):
        p.set_progress_bar_config(disable=True)
    return plain, with_cn


def request_phase_diffusers(folder, modules, args, res, control, lora_dir: Path, save) -> None:
    plain, with_cn = diffusers_pipelines(folder, modules)
    kw = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=GUIDANCE,
              output_type="np")
    cn = dict(control_image=control, controlnet_conditioning_scale=CONTROL_SCALE)

    def gen(pipe, steps=None, **extra):
        call = {**kw, **extra, **({"num_inference_steps": steps} if steps else {})}
        return lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(1), **call)

    def cold_lora(pipe, steps=None, **extra):
        def run():
            evict(lora_dir / "style.safetensors")
            pipe.load_lora_weights(lora_dir, weight_name="style.safetensors", adapter_name="style")
            pipe.fuse_lora(lora_scale=1.0)
            gen(pipe, steps, **extra)()
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        return run

    gen(plain, 2)()  # warm-up
    res["diffusers_plain_s"] = wall(gen(plain), args.repeats)
    print(f"diffusers plain request: {res['diffusers_plain_s']:.2f} s", flush=True)
    save()
    gen(with_cn, 2, **cn)()  # warm-up
    res["diffusers_controlnet_s"] = wall(gen(with_cn, **cn), args.repeats)
    print(f"diffusers ControlNet request: {res['diffusers_controlnet_s']:.2f} s", flush=True)
    save()
    cold_lora(with_cn, 2, **cn)()  # warm-up: the LoRA loader's first use
    res["diffusers_controlnet_cold_lora_s"] = wall(cold_lora(with_cn, **cn), args.repeats)
    print(f"diffusers ControlNet + cold LoRA request: {res['diffusers_controlnet_cold_lora_s']:.2f} s", flush=True)
    if torch.cuda.is_available():
        res["diffusers_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    save()


def request_phase_katz(folder, args, res, control_png: bytes, lora_dir: Path, device, save) -> None:
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    mf = ModelFolder(folder, discover_controlnets(folder / "controlnets"))
    limits = Limits(default_width=args.size, default_height=args.size, default_guidance=GUIDANCE)
    dep = Deployment(mf.path, mf.controlnets, lora_dir, limits, device=device,
                     dtype="bfloat16" if device == "cuda" else "float32", controlnet_mode=args.controlnet_mode,
                     compile=args.compile, fp8=args.fp8, compile_vae=args.compile_vae,
                     compile_cache=args.compile_cache, graph_sizes=[(args.size, args.size)]).validate()
    t0 = time.perf_counter()
    ens = LocalEnsemble(dep)
    res["katz_load_s"] = time.perf_counter() - t0
    transformer = ens.models["unet"]
    res["katz_transformer_warmup_s"] = transformer.engine.warmup_s
    print(f"Katz loaded in {res['katz_load_s']:.0f} s (transformer warm-up {transformer.engine.warmup_s:.0f} s)",
          flush=True)

    def req(steps=None, **extra):
        r = {"prompt": np.array([PROMPT.encode()], object), "seed": np.array([1], np.int64),
             "steps": np.array([steps or args.steps], np.int32)}
        r.update(extra)
        return r

    cn = dict(controlnets=np.array([b"canny"], object), control_images=np.array([control_png], object),
              controlnet_scales=np.array([CONTROL_SCALE], np.float32))
    applied: dict[int, list[int]] = {}

    def cold_lora(k, steps=None):
        def run():
            ens.forget_loras()
            evict(lora_dir / "style.safetensors")
            out = ens.generate(req(steps, **cn, loras=np.array([b"style"], object), lora_k=np.array([k], np.int32)))
            applied.setdefault(k, []).append(int(out["lora_applied_step"][0]))
        return run

    def measured(case: str, fn) -> float:
        """The median of ``fn`` over the repeats, and where the time went on average (seconds per model's
        execute, the transformer's step, the LoRA weight switches), as ``katz_<case>_breakdown``."""
        regions = transformer.engine.regions
        eager_before = regions.eager_calls if regions is not None else 0
        before = dict(ens.seconds), transformer.runs, transformer.run_seconds, transformer.loras.stats.switch_seconds
        res[f"katz_{case}_s"] = median = wall(fn, args.repeats)
        seconds, runs, run_s, switch_s = before
        n = args.repeats
        breakdown = {f"{m}_s": (ens.seconds[m] - seconds.get(m, 0.0)) / n for m in ens.seconds}
        breakdown["transformer_step_ms"] = 1e3 * (transformer.run_seconds - run_s) / max(transformer.runs - runs, 1)
        breakdown["lora_switch_s"] = (transformer.loras.stats.switch_seconds - switch_s) / n
        if regions is not None:  # with --compile: blocks that ran eagerly (a shape not warmed up)
            breakdown["eager_block_calls"] = (regions.eager_calls - eager_before) / n
        res[f"katz_{case}_breakdown"] = breakdown
        print(f"Katz {case.replace('_', ' ')} request: {median:.2f} s ({', '.join(f'{k} {v:.3f}' for k, v in breakdown.items())})",
              flush=True)
        save()
        return median

    ens.generate(req(2))  # warm-up
    measured("plain", lambda: ens.generate(req()))
    ens.generate(req(2, **cn))  # warm-up: the ControlNet's first use
    measured("controlnet", lambda: ens.generate(req(**cn)))
    cold_lora(0, 2)()  # warm-up: the LoRA loader's first use
    measured("controlnet_cold_lora_k0", cold_lora(0))
    k = min(args.bal_k, args.steps - 1)
    if k > 0:
        res["katz_bal_k"] = k
        measured("controlnet_cold_lora_bal", cold_lora(k))
        res["katz_bal_applied_steps"] = applied.get(k, [])
        print(f"Katz BAL k = {k}: LoRA in from steps {res['katz_bal_applied_steps']}", flush=True)
    s = transformer.loras.stats
    res["katz_lora_load_s_mean"] = s.load_seconds / max(s.loads, 1)
    res["katz_transformer_step_s_mean"] = transformer.run_seconds / max(transformer.runs, 1)
    if torch.cuda.is_available():
        res["katz_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    save()


def print_table(res: dict, args) -> None:
    print(f"\n{res['device']}, torch {res['torch']}, diffusers {res['diffusers']}, {res['model']}, {args.size}², "
          f"{args.steps} steps, {res['dtype']}, median of {args.repeats}")
    print(f"{'case':52} {'diffusers':>10} {'Katz':>10} {'Katz/diff':>9}")
    rows = []
    if "diffusers_step_ms" in res:
        for name in ("eager", "compiled", "fp8", "compiled_fp8"):
            if f"katz_step_{name}_ms" in res:
                rows.append((f"transformer step, Katz {name} (ms)", res["diffusers_step_ms"], res[f"katz_step_{name}_ms"]))
    base = res.get("diffusers_controlnet_cold_lora_s")
    for label, d, k in (("request, plain (s)", res.get("diffusers_plain_s"), res.get("katz_plain_s")),
                        ("request + ControlNet (s)", res.get("diffusers_controlnet_s"), res.get("katz_controlnet_s")),
                        ("request + ControlNet + cold LoRA, Katz k = 0 (s)", base,
                         res.get("katz_controlnet_cold_lora_k0_s")),
                        (f"request + ControlNet + cold LoRA, Katz BAL k = {res.get('katz_bal_k')} (s)", base,
                         res.get("katz_controlnet_cold_lora_bal_s"))):
        if d is not None and k is not None:
            rows.append((label, d, k))
    for label, d, k in rows:
        print(f"{label:52} {d:10.2f} {k:10.2f} {k / d:9.2f}")
    res["ratios"] = {label: k / d for label, d, k in rows}
    if not rows:
        print("(no phase measured both)")
    print(f"elapsed per phase (s): {res.get('phase_s', {})}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; tiny preset: 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--compile", action="store_true", help="Katz: each block class compiled (inductor) at load")
    p.add_argument("--fp8", action="store_true", help="Katz: the blocks' linears in float8 e4m3 (GPUs of CC 8.9+)")
    p.add_argument("--compile-cache", type=Path, default=None,
                   help="TORCHINDUCTOR_CACHE_DIR: a second run reuses the compiled code")
    p.add_argument("--no-compile-vae", dest="compile_vae", action="store_false",
                   help="Katz: VAE decoder eager (default: compiled at load, the server's default)")
    p.add_argument("--controlnet-mode", choices=["local", "inline"], default="inline",
                   help="Katz: the ControlNet before each transformer step (inline, katz serve's FLUX default) or "
                        "beside it, block by block (local)")
    p.add_argument("--skip-diffusers", action="store_true", help="Katz's figures only (no ratios)")
    p.add_argument("--bal-k", type=int, default=2, help="Katz's BAL bound for the second cold-LoRA case (0: skip)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the config folder and LoRA are written (default: a temporary folder)")
    p.add_argument("--preset", choices=["tiny-flux"], default=None,
                   help="the tiny-flux preset's architecture (CPU smoke run) instead of FLUX.1-dev's sizes")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    if unknown := set(phases) - set(PHASES):
        p.error(f"unknown --phases {', '.join(sorted(unknown))}")
    if args.compile_cache is not None:  # before anything compiles
        args.compile_cache = args.compile_cache.resolve()
        args.compile_cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache)
    cuda = torch.cuda.is_available()
    if not cuda and args.preset is None:
        p.error("FLUX.1-dev's sizes need a GPU; on the CPU run --preset tiny-flux")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    import diffusers

    res: dict = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
                 "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
                 "model": "tiny-flux preset" if args.preset else "FLUX.1-dev architecture (random weights)",
                 "dtype": str(dtype).removeprefix("torch."), "steps": args.steps, "repeats": args.repeats,
                 "compile": args.compile, "fp8": args.fp8, "phases": phases,
                 "controlnet_mode": args.controlnet_mode}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(res, indent=2))

    # ------------------------------------------------------------------ build
    t0 = time.perf_counter()
    modules = build_tiny(device, dtype) if args.preset else build_full(device, dtype)
    root = args.model_dir or Path(tempfile.mkdtemp(prefix="katz-flux-bench-"))
    folder = write_folder(root / "model", modules)
    lora_dir = root / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    write_lora(lora_dir / "style.safetensors", modules["transformer"], args.lora_rank, torch.bfloat16)
    res["lora_mb"] = (lora_dir / "style.safetensors").stat().st_size / 1e6
    res["transformer_params_b"] = sum(p.numel() for p in modules["transformer"].parameters()) / 1e9
    from katz.models.folder import ModelFolder
    from katz.engines.torch.transformer import flux_text_len

    mf = ModelFolder(folder)
    args.size = args.size or (1024 if args.preset is None else 64)  # the tiny preset: as tests/test_flux.py
    res["size"] = args.size
    text_len = flux_text_len(mf)
    print(f"modules built and folder written in {time.perf_counter() - t0:.0f} s (transformer "
          f"{res['transformer_params_b']:.2f} B parameters, LoRA {res['lora_mb']:.0f} MB)", flush=True)
    elapsed(res, "build", t0)
    save()

    from PIL import Image

    rng = np.random.RandomState(0)
    control = Image.fromarray(rng.randint(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    control.save(buf, "PNG")

    # diffusers first: Katz's engines change the shared modules in place
    if "step" in phases and not args.skip_diffusers:
        t0 = time.perf_counter()
        step_phase_diffusers(modules, args, res, device, dtype, text_len)
        elapsed(res, "diffusers_step", t0)
        save()
    if "request" in phases and not args.skip_diffusers:
        t0 = time.perf_counter()
        request_phase_diffusers(folder, modules, args, res, control, lora_dir, save)
        elapsed(res, "diffusers_request", t0)
        save()
    with provided_modules(modules):
        if "step" in phases:
            t0 = time.perf_counter()
            step_phase_katz(modules, args, res, device, dtype, text_len, save)
            elapsed(res, "katz_step", t0)
            save()
        if "request" in phases:
            t0 = time.perf_counter()
            request_phase_katz(folder, args, res, buf.getvalue(), lora_dir, device, save)
            elapsed(res, "katz_request", t0)
            save()
    print_table(res, args)
    save()


if __name__ == "__main__":
    main()
