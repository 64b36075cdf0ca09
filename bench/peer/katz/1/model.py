"""The diffusers peer: stock diffusers SDXL in one Triton Python model (NVIDIA's tutorial pattern).

What a careful diffusers user deploys instead of Katz, behind the same request tensors as Katz's
``katz`` ensemble (so one client, one ``katz trace replay``, drives both servers):

* the pipeline is loaded once (``StableDiffusionXLPipeline.from_pretrained``, fp16 on the GPU,
  diffusers' default SDPA attention processors), with every registered ControlNet loaded once
  beside it; a request naming ControlNets runs ``StableDiffusionXLControlNetPipeline`` built over
  the same modules with the ControlNets it names (a list: diffusers' ``MultiControlNetModel``),
  one such pipeline object per subset, made on first use (they share every module);
* LoRAs: a bounded set of loaded adapters (``max_adapters``), least recently used first out
  (``delete_adapters``), each loaded with ``load_lora_weights(adapter_name=...)`` on first use;
  per request ``set_adapters`` with its scales, then (``lora_mode`` ``fuse``, the default)
  ``fuse_lora`` before the pipeline call and ``unfuse_lora`` after it; ``lora_mode`` ``unfused``
  keeps the adapters as separate layers (peft computes ``x @ A @ B`` in every adapted projection at
  every step). Fusing is the default because it costs one merge and one unmerge per request
  (~3 small kernels per adapted layer and adapter, twice), whereas the unfused path adds, per
  step and per adapter, two matmuls and an add to each of SDXL's 560 attention projections
  (thousands of small kernels a step, run 30 times); bench/README.md has the reasoning and the
  flag to measure both (``--peer-lora-mode``);
* requests without LoRAs run with the LoRA layers disabled (``disable_lora``).

Validation reuses Katz's request schema (:func:`katz.request.parse_request`) so that a bad field
fails the same way (``INVALID_ARG``, the message starting with the field's name); everything that
generates is diffusers. One request at a time (one instance per GPU, ``KIND_GPU``; ``KIND_CPU`` for
the CPU smoke run). Counters for Triton's metrics endpoint: ``peer_lora_*`` (loads, load time,
hits/misses of the loaded set, evictions, time setting/fusing/unfusing adapters) and
``peer_pipeline_seconds_total``.
"""

import io
import json
import re
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler",
          "controlnets", "control_images", "controlnet_scales", "control_guidance_start", "control_guidance_end",
          "loras", "lora_scales", "lora_k")
LORA_COMPONENTS = ["unet", "text_encoder", "text_encoder_2"]


class BadRequest(ValueError):
    """A request that cannot run as given (its message starts with the field's name): INVALID_ARG."""


def _adapter_name(lora: str) -> str:
    # peft keeps adapters in ModuleDicts, whose keys may not contain '.'
    return "a_" + re.sub(r"[^A-Za-z0-9_]", "_", lora)


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from diffusers import ControlNetModel, StableDiffusionXLPipeline
        from diffusers.utils import logging as dlogging

        from katz.request import Limits

        dlogging.set_verbosity_error()  # "no LoRA keys for text_encoder" for every UNet-only LoRA
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        if args.get("model_instance_kind") == "GPU":
            self.device = f"cuda:{args['model_instance_device_id']}"
            torch.cuda.set_device(self.device)
        else:
            self.device = "cpu"
        if int(params.get("torch_threads", "0") or 0) > 0:
            torch.set_num_threads(int(params["torch_threads"]))
        self.dtype = getattr(torch, params.get("dtype", "float16"))
        model_dir = Path(params["model_dir"])
        index = json.loads((model_dir / "model_index.json").read_text())
        if index.get("_class_name") != "StableDiffusionXLPipeline":
            raise ValueError(f"{model_dir}: the peer serves SDXL folders, not {index.get('_class_name')}")
        self.lora_dir = Path(params["lora_dir"])
        self.max_adapters = int(params.get("max_adapters", "8"))
        self.lora_mode = params.get("lora_mode", "fuse")
        if self.lora_mode not in ("fuse", "unfused"):
            raise ValueError(f"lora_mode must be fuse or unfused, not {self.lora_mode!r}")

        start = time.perf_counter()
        # torch_dtype, not dtype: older diffusers ignore an unknown `dtype` and would load float32
        self.base = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=self.dtype,
                                                              add_watermarker=False).to(self.device)
        self.base.set_progress_bar_config(disable=True)
        if self.base.unet.dtype != self.dtype:
            raise RuntimeError(f"the UNet loaded as {self.base.unet.dtype}, not {self.dtype}")
        self.controlnets = {}
        for item in params.get("controlnets", "").split(","):
            if item.strip():
                name, _, folder = item.strip().partition("=")
                self.controlnets[name] = ControlNetModel.from_pretrained(folder, torch_dtype=self.dtype).to(self.device)
        self._cn_pipes = {}
        self._schedulers = {"default": self.base.scheduler}
        vae_scale = 2 ** (len(self.base.vae.config.block_out_channels) - 1)
        side = self.base.unet.config.sample_size * vae_scale
        self.limits = Limits(default_width=side, default_height=side, default_guidance=5.0,
                             max_loras=min(8, self.max_adapters))
        self.adapters = OrderedDict()  # LoRA name -> adapter name, least recently used first
        self.lora_enabled = True
        self.stats = {"loads": 0, "load_seconds": 0.0, "hits": 0, "misses": 0, "evictions": 0,
                      "switch_seconds": 0.0, "requests": 0, "pipeline_seconds": 0.0, "failures": 0}
        self._published = {}
        self._families = {}
        processors = {type(p).__name__ for p in self.base.unet.attn_processors.values()}
        pb_utils.Logger.log_info(
            f"{self.model_name} (diffusers peer): {model_dir} on {self.device} {self.dtype}, ControlNets "
            f"{sorted(self.controlnets)}, LoRAs {self.lora_dir} (<= {self.max_adapters} loaded, {self.lora_mode}), "
            f"attention {sorted(processors)}; loaded in {time.perf_counter() - start:.1f}s")
        self._publish_metrics()

    # ------------------------------------------------------------------ pipelines
    def _pipeline(self, controlnets):
        if not controlnets:
            return self.base
        key = tuple(controlnets)
        if key not in self._cn_pipes:
            from diffusers import StableDiffusionXLControlNetPipeline

            b = self.base
            pipe = StableDiffusionXLControlNetPipeline(
                vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
                tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=b.scheduler,
                controlnet=[self.controlnets[n] for n in key],  # a list: diffusers wraps it in MultiControlNetModel
                force_zeros_for_empty_prompt=b.config.force_zeros_for_empty_prompt, add_watermarker=False)
            pipe.set_progress_bar_config(disable=True)
            self._cn_pipes[key] = pipe
        return self._cn_pipes[key]

    def _scheduler(self, name):
        if name not in self._schedulers:
            from katz.diffusion.schedulers import make_scheduler  # the request's name -> the diffusers class

            self._schedulers[name] = make_scheduler(name, dict(self.base.scheduler.config))
        return self._schedulers[name]

    # ------------------------------------------------------------------ LoRAs
    def _sync(self):
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize(self.device)

    def _ensure_loaded(self, names):
        """Load the request's LoRAs not in the set, evicting the least recently used others."""
        for name in names:
            if name in self.adapters:
                self.adapters.move_to_end(name)
                self.stats["hits"] += 1
                continue
            self.stats["misses"] += 1
            while len(self.adapters) >= self.max_adapters:
                victim = next(n for n in self.adapters if n not in names)
                self.base.delete_adapters(self.adapters.pop(victim))
                self.stats["evictions"] += 1
            adapter = _adapter_name(name)
            start = time.perf_counter()
            try:
                self.base.load_lora_weights(str(self.lora_dir), weight_name=f"{name}.safetensors",
                                            adapter_name=adapter, low_cpu_mem_usage=True)
            except Exception as exc:
                try:  # leave no half-loaded adapter behind
                    self.base.delete_adapters(adapter)
                except Exception:
                    pass
                raise BadRequest(f"loras: LoRA {name!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
            self._sync()
            self.stats["loads"] += 1
            self.stats["load_seconds"] += time.perf_counter() - start
            self.adapters[name] = adapter

    def _activate(self, names, scales):
        """Make the request's adapters (or none) the active ones; True when fused."""
        start = time.perf_counter()
        fused = False
        if names:
            if not self.lora_enabled:
                self.base.enable_lora()
                self.lora_enabled = True
            adapters = [self.adapters[n] for n in names]
            self.base.set_adapters(adapters, adapter_weights=list(scales))
            if self.lora_mode == "fuse":
                self.base.fuse_lora(components=LORA_COMPONENTS, lora_scale=1.0, adapter_names=adapters)
                fused = True
        elif self.adapters and self.lora_enabled:
            self.base.disable_lora()
            self.lora_enabled = False
        self._sync()
        self.stats["switch_seconds"] += time.perf_counter() - start
        return fused

    def _unfuse(self):
        start = time.perf_counter()
        self.base.unfuse_lora(components=LORA_COMPONENTS)
        self._sync()
        self.stats["switch_seconds"] += time.perf_counter() - start

    # ------------------------------------------------------------------ requests
    def _parse(self, request):
        from katz.request import parse_request

        inputs = {}
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        try:
            return parse_request(inputs, self.limits, frozenset(self.controlnets),
                                 lambda n: (self.lora_dir / f"{n}.safetensors").is_file())
        except ValueError as exc:  # katz.request.InvalidArgument: "<field>: <reason>"
            raise BadRequest(str(exc)) from exc

    def _control_images(self, req):
        from PIL import Image

        images = []
        for data in req.control_images:
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
            except Exception as exc:
                raise BadRequest(f"control_images: cannot decode image ({type(exc).__name__}: {exc})") from exc
            images.append(img.convert("RGB"))
        return images

    def _generate(self, req):
        import torch

        pipe = self._pipeline(req.controlnets)
        pipe.scheduler = self._scheduler(req.scheduler)
        kwargs = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                      guidance_scale=req.guidance_scale, width=req.width, height=req.height, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(req.seed))  # latents drawn as Katz draws them
        if req.controlnets:
            kwargs.update(image=self._control_images(req), controlnet_conditioning_scale=list(req.controlnet_scales),
                          control_guidance_start=list(req.control_guidance_start),
                          control_guidance_end=list(req.control_guidance_end))
        self._ensure_loaded(req.loras)
        fused = self._activate(req.loras, req.lora_scales)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = pipe(**kwargs).images[0]
        finally:
            self.stats["pipeline_seconds"] += time.perf_counter() - start
            if fused:
                self._unfuse()
        return (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding

    def _png(self, pixels):
        from PIL import Image

        buf = io.BytesIO()
        # compress level 1, as Katz's png_encoder writes (katz/images.py), so both pay the same encode
        Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def _one(self, request):
        req = self._parse(request)
        pixels = self._generate(req)
        wanted = set(request.requested_output_names())
        outputs = [
            pb_utils.Tensor("image", pixels),
            pb_utils.Tensor("seed", np.array([req.seed], dtype=np.int64)),
            pb_utils.Tensor("lora_applied_step", np.array([0 if req.loras else -1], dtype=np.int32)),
        ]
        if not wanted or "png" in wanted:
            outputs.append(pb_utils.Tensor("png", np.array([self._png(pixels)], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def execute(self, requests):
        responses = []
        for request in requests:
            self.stats["requests"] += 1
            try:
                responses.append(self._one(request))
            except BadRequest as exc:
                self.stats["failures"] += 1
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
            except Exception as exc:
                self.stats["failures"] += 1
                message = f"{self.model_name}: {type(exc).__name__}: {exc}"
                code = pb_utils.TritonError.INTERNAL
                if "out of memory" in str(exc).lower():
                    import torch

                    torch.cuda.empty_cache()
                    code = pb_utils.TritonError.UNAVAILABLE
                else:
                    pb_utils.Logger.log_error(f"{self.model_name}: {traceback.format_exc()}")
                error = pb_utils.TritonError(message, code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        self._publish_metrics()
        return responses

    # ------------------------------------------------------------------ metrics
    COUNTERS = (
        ("peer_lora_loads_total", "LoRAs loaded with load_lora_weights", {}, "loads"),
        ("peer_lora_load_seconds_total", "time in load_lora_weights (s)", {}, "load_seconds"),
        ("peer_lora_cache_hits_total", "requested LoRAs already in the loaded set", {"tier": "device"}, "hits"),
        ("peer_lora_cache_misses_total", "requested LoRAs not in the loaded set", {"tier": "device"}, "misses"),
        ("peer_lora_evictions_total", "adapters deleted to make room (delete_adapters)", {}, "evictions"),
        ("peer_lora_switch_seconds_total", "time in set_adapters/fuse_lora/unfuse_lora/disable_lora (s)", {},
         "switch_seconds"),
        ("peer_requests_total", "requests executed", {}, "requests"),
        ("peer_request_failures_total", "requests that failed", {}, "failures"),
        ("peer_pipeline_seconds_total", "time in the diffusers pipeline call (s)", {}, "pipeline_seconds"),
    )

    def _publish_metrics(self):
        for name, description, labels, key in self.COUNTERS:
            slot = (name, tuple(sorted(labels.items())))
            if slot not in self._published:
                if name not in self._families:
                    self._families[name] = pb_utils.MetricFamily(name=name, description=description,
                                                                 kind=pb_utils.MetricFamily.COUNTER)
                self._published[slot] = [self._families[name].Metric(labels={"model": self.model_name, **labels}), 0.0]
            metric = self._published[slot]
            value = float(self.stats[key])
            if value > metric[1]:
                metric[0].increment(value - metric[1])
                metric[1] = value
        if self.device != "cpu":
            import torch

            name = "peer_gpu_memory_bytes"
            if name not in self._families:
                self._families[name] = pb_utils.MetricFamily(
                    name=name, description="GPU memory of the peer's process, torch's caching allocator (bytes)",
                    kind=pb_utils.MetricFamily.GAUGE)
            for kind, value in (("allocated", torch.cuda.memory_allocated(self.device)),
                                ("reserved", torch.cuda.memory_reserved(self.device))):
                slot = (name, (("kind", kind),))
                if slot not in self._published:
                    self._published[slot] = [self._families[name].Metric(labels={"model": self.model_name,
                                                                                 "kind": kind}), 0.0]
                self._published[slot][0].set(float(value))

    def finalize(self):
        self.adapters.clear()
