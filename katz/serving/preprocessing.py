"""``preprocessing``: validate every field, tokenize the prompts, decode control images.

Outputs ``input_ids`` (and ``input_ids_2`` for SDXL) int64 ``[B, 77]``,
``control_images`` float32 ``[n, 3, H, W]`` in ``[0, 1]`` (``n`` may be 0),
``params`` (the normalized request as one JSON BYTES element, read by the
later models) and ``seed`` int64 ``[1]`` (returned to the client).

A valid request's LoRA files are handed to :class:`katz.lora.readahead.LoraReadahead`
at once, so they are in the page cache by the time the UNet's loader reads them, and its LoRA
names go to every UNet instance's loader (:mod:`katz.lora.hints`), which starts loading them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from katz.diffusion.images import control_image_processor, decode_control_image
from katz.diffusion.text_encoding import tokenize
from katz.lora.hints import HintSender
from katz.lora.readahead import LoraReadahead
from katz.request import RequestParams, parse_request


class Preprocessing:
    def __init__(self, deployment):
        self.deployment = deployment
        self.tokenizers = deployment.folder.load_tokenizers()
        self.readahead = LoraReadahead() if deployment.lora_readahead and deployment.lora_dir else None
        self.hints = HintSender(deployment.lora_hints) if deployment.lora_hints and deployment.lora_dir else None
        if deployment.folder.controlnets:
            # at load: its import took the first ControlNet request of a fresh server 2.4-2.7 s more
            control_image_processor()

    def execute(self, inputs: dict) -> dict:
        dep = self.deployment
        req = parse_request(inputs, dep.request_limits, frozenset(dep.folder.controlnets), dep.loras.exists)
        if self.readahead is not None and req.loras:
            self.readahead.hint(dep.loras.path(name) for name in req.loras)
        if self.hints is not None and req.loras:
            self.hints.send(req.loras)  # the UNets' loaders start on them now (katz.lora.hints)
        images = [
            decode_control_image(data, req.width, req.height, dep.limits.max_image_pixels)
            for data in req.control_images
        ]
        control = torch.cat(images) if images else torch.zeros((0, 3, req.height, req.width))
        params = RequestParams(
            seed=req.seed,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            width=req.width,
            height=req.height,
            scheduler=req.scheduler,
            controlnets=req.controlnets,
            controlnet_scales=req.controlnet_scales,
            control_guidance_start=req.control_guidance_start,
            control_guidance_end=req.control_guidance_end,
            control_image_keys=[
                hashlib.sha256(data + f"@{req.width}x{req.height}".encode()).hexdigest()[:32]
                for data in req.control_images
            ],
            loras=req.loras,
            lora_scales=req.lora_scales,
            lora_k=req.lora_k,
            zero_negative=bool(req.do_cfg and req.negative_prompt is None and dep.folder.force_zeros_for_empty_prompt),
        )
        ids = tokenize(self.tokenizers, req.prompt, req.negative_prompt,
                       req.do_cfg and dep.folder.classifier_free_guidance)
        return {
            **{k: torch.from_numpy(v) for k, v in ids.items()},
            "control_images": control,
            "params": params.to_tensor(),
            "seed": np.array([req.seed], dtype=np.int64),
        }

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        """Counters for Triton's metrics endpoint: ``(name, description, labels, total)``."""
        if self.readahead is None:
            return []
        s = self.readahead.stats
        files = ("katz_lora_readahead_files_total", "LoRA files named by requests, by what the readahead found")
        return [
            (*files, {"result": "read"}, s.files_read),
            (*files, {"result": "resident"}, s.resident),
            (*files, {"result": "error"}, s.errors),
            ("katz_lora_readahead_bytes_total", "LoRA file bytes read into the page cache ahead of the UNet", {},
             s.bytes_read),
            ("katz_lora_readahead_seconds_total", "time the readahead spent reading LoRA files (s)", {},
             s.read_seconds),
        ]

