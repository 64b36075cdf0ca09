"""``katz_stream``: the ``katz`` ensemble's chain in one decoupled model that reports progress.

It takes the same request tensors as the ``katz`` ensemble and runs the same
steps — preprocessing → ``text_encoder`` → denoising loop → ``vae_decoder`` →
``postprocessing`` → ``png_encoder`` — with the same classes, so its images are the ensemble's.
Preprocessing (validation, tokenization, image decoding: CPU work) runs in this model's process and
the loop where :class:`katz.serving.pipeline.Pipeline` runs it: by default in the UNet's (FLUX: the
transformer's) process, which reports each step here (:mod:`katz.serving.progress`); with ``loop``
``pipeline`` here, one BLS call per step. The networks, postprocessing and the PNG encode are BLS
calls to their own models. Preprocessing runs here because BLS loses the callee's error code
(Triton 2.51 reports every BLS error as INTERNAL): a bad field must still come back as INVALID_ARG.

Responses, over gRPC streaming (``model_transaction_policy { decoupled: true }``):

* one per denoising step: ``step`` int32 ``[1]`` (1-based), ``steps`` int32 ``[1]``,
  ``elapsed_s`` fp32 ``[1]`` (seconds since the request started);
* then the last one, flagged final: ``image``, ``png``, ``seed``, ``lora_applied_step``
  (as the ensemble's outputs).

A request whose client cancelled (closed the stream) stops at the next step
boundary (or between stages) and frees the instance; nothing more is sent.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from katz.serving.pipeline import Pipeline
from katz.serving.preprocessing import Preprocessing

PROGRESS_OUTPUTS = ("step", "steps", "elapsed_s")
FINAL_OUTPUTS = ("image", "png", "seed", "lora_applied_step")


class Cancelled(Exception):
    """The client cancelled the request; the stream ends without a result."""


class Stream:
    def __init__(self, deployment, call):
        self.deployment = deployment
        self.call = call
        self.preprocessing = Preprocessing(deployment)
        self.pipeline = Pipeline(deployment, call)
        two = len(deployment.folder.tokenizer_parts) == 2  # SDXL, FLUX: a second tokenizer and encoder
        self.ids = ["input_ids", "input_ids_2"] if two else ["input_ids"]
        self.embeds = ["prompt_embeds", "pooled_prompt_embeds"] if two else ["prompt_embeds"]

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        return self.pipeline.metrics()

    def execute_stream(
        self,
        inputs: dict,
        send: Callable[[dict, bool], None],
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """Run one request: ``send(outputs, final)`` once per step, then once with the image."""
        start = time.monotonic()

        def check(where: str) -> None:
            if is_cancelled():
                raise Cancelled(f"cancelled by the client {where}")

        pre = self.preprocessing.execute(inputs)  # raises InvalidArgument naming the field
        check("after preprocessing")
        text = self.call("text_encoder", {k: pre[k] for k in (*self.ids, "params")}, self.embeds)
        check("after text encoding")

        def on_step(i: int, n: int) -> None:
            check(f"at step {i + 1}/{n}")
            send(
                {
                    "step": np.array([i + 1], dtype=np.int32),
                    "steps": np.array([n], dtype=np.int32),
                    "elapsed_s": np.array([time.monotonic() - start], dtype=np.float32),
                },
                False,
            )

        denoised = self.pipeline.execute(
            {**text, "control_images": pre["control_images"], "params": pre["params"]}, on_step=on_step
        )
        check("after denoising")
        image = self.call("vae_decoder", {"latents": denoised["latents"]}, ["image"])["image"]
        pixels = self.call("postprocessing", {"image": image}, ["image"])["image"]
        png = self.call("png_encoder", {"image": pixels, "params": pre["params"]}, ["png"])["png"]
        lora_step = denoised["lora_applied_step"]
        if not isinstance(lora_step, torch.Tensor):
            lora_step = torch.as_tensor(np.asarray(lora_step))
        final = {"image": pixels, "png": png, "seed": pre["seed"]}
        send({**final, "lora_applied_step": lora_step.to(torch.int32).reshape(1)}, True)
