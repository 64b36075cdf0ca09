"""``katz_pipeline``: the denoising loop, calling ``unet`` and ``controlnet`` over BLS.

Where the deployment runs the loop in the UNet's process (``loop`` ``unet``, the default with one
UNet shard; :mod:`katz.diffusion.loop`), this model hands each request to ``unet`` in one
call instead; ``katz_stream`` does too, and the loop reports each step back to it
(:mod:`katz.serving.progress`).

With several UNet shards (latent parallelism) each step's UNet evaluation is
split over the shards (:mod:`katz.parallel.shards`). BAL's loop side is
:class:`katz.lora.bal.RequestLoras`; a step's ControlNets go to the UNet as tensors
(:func:`katz.controlnet.step.control_inputs`) unless they run inline.

Inputs: ``prompt_embeds [B, 77, D]``, SDXL ``pooled_prompt_embeds [B, P]``,
``control_images [n, 3, H, W]``, ``params``. Outputs: ``latents [1, 4, h, w]`` and
``lora_applied_step`` int32 ``[1]`` (the step from which the LoRAs were in; -1 without LoRAs).

``call(model, inputs, output_names) -> outputs`` is the BLS transport, given by
the Triton glue (or by a test, wiring the models together in-process).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from katz.controlnet.step import control_inputs
from katz.controlnet.transports import inline_controlnet
from katz.diffusion.loop import LOOP_OUTPUTS, loop_request, run_loop, step_tensors
from katz.diffusion.schedulers import DEFAULT, make_scheduler
from katz.lora.bal import RequestLoras
from katz.parallel.shards import UNET_OUTPUTS, ShardedUNet
from katz.request import read_params
from katz.serving.progress import ProgressListener


class Pipeline:
    def __init__(self, deployment, call):
        self.deployment = deployment
        self.call = call
        folder = deployment.folder
        self.family = folder.family
        make_scheduler(DEFAULT, folder.scheduler_config)  # imports diffusers at load, not on the first request
        self.device = torch.device(deployment.device)
        # FLUX: the loop runs in the transformer's process only (Deployment checks loop_place), so the
        # per-step path below, with its UNet residuals and shards, is the UNet families'
        unet = folder.family != "flux"
        self.residual_names = folder.residual_names if unet else []
        self.shards = ShardedUNet(call, deployment.unet_shards, deployment.latent_overlap,
                                  folder.unet_downsampling_factor) if unet else None
        self.loop = deployment.loop_place  # where katz_pipeline's loop runs
        # where a step's time goes on this side: waiting for the UNet calls vs the loop's own work
        self.steps, self.unet_call_seconds = 0, 0.0
        self._count = threading.Lock()

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        """Counters for Triton's metrics endpoint: ``(name, description, labels, total)``."""
        return [
            ("katz_pipeline_steps_total", "denoising steps run", {}, self.steps),
            ("katz_pipeline_unet_call_seconds_total",
             "time the denoising loop waited for its UNet calls over BLS, request to response (s)", {},
             self.unet_call_seconds),
        ]

    def _timed_unet_call(self, fn, steps: int = 1):
        """Run the UNet call(s) ``fn()`` of ``steps`` steps (a loop request: all) and count the wait."""
        start = time.perf_counter()
        try:
            return fn()
        finally:
            with self._count:
                self.steps += steps
                self.unet_call_seconds += time.perf_counter() - start

    def _loop_with_progress(self, request: dict, on_step) -> dict:
        """The loop request ``request`` over BLS (on a thread of its own) while this thread hands each
        step the loop reports to ``on_step(i, n)``. When ``on_step`` raises (the client cancelled),
        the progress channel is closed, which stops the loop at its next step, and this waits for it."""
        listener = ProgressListener()
        request = {**request, "loop_progress": np.array([[listener.name.encode()]], dtype=np.object_)}
        done: dict = {}

        def run() -> None:
            try:
                done["out"] = self.call("unet", request, list(LOOP_OUTPUTS))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                done["error"] = exc

        worker = threading.Thread(target=run, name="katz-stream-loop", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                step = listener.get(timeout=0.05)
                if step is not None:
                    on_step(*step)
            # every step the loop finished was sent before its response: all are queued by now
            while (step := listener.get(timeout=0)) is not None:
                on_step(*step)
        finally:
            listener.close()
            worker.join()
        if "error" in done:
            raise done["error"]
        return done["out"]

    def _steps_run(self, params) -> int:
        """How many UNet steps the request's loop runs (some schedulers run more than ``steps``)."""
        if self.family == "flux":  # flow-match Euler: one evaluation per step
            return params.steps
        scheduler = make_scheduler(params.scheduler, self.deployment.folder.scheduler_config)
        scheduler.set_timesteps(params.steps)
        return len(scheduler.timesteps)

    def execute(self, inputs: dict, on_step=None) -> dict:
        params = read_params(inputs)
        if self.loop == "unet":
            # the whole loop in the UNet's process: one BLS call (katz.diffusion.loop)
            request, steps = loop_request(inputs), self._steps_run(params)
            if on_step is None:
                out = self._timed_unet_call(lambda: self.call("unet", request, list(LOOP_OUTPUTS)), steps)
            else:  # katz_stream: the loop reports its steps
                out = self._timed_unet_call(lambda: self._loop_with_progress(request, on_step), steps)
            return {"latents": out["latents"], "lora_applied_step": out["lora_applied_step"].reshape(1)}
        dtype = self.deployment.torch_dtype
        embeds = inputs["prompt_embeds"].to(self.device, dtype)
        pooled = inputs.get("pooled_prompt_embeds")
        pooled = pooled.to(self.device, dtype) if pooled is not None else None
        bal = RequestLoras(params.loras, params.lora_scales, params.lora_k)

        def unet(sample, t, hidden, added, down, mid, controls=()):
            rows = sample.shape[0]
            tensors = step_tensors(sample, t, hidden, added, batched=True, device=self.device)
            if down is not None:
                tensors.update({f"down_residual_{i}": r for i, r in enumerate(down)})
                tensors["mid_residual"] = mid
            if controls:  # ControlNet-as-a-Service: the unet model calls the ControlNets itself
                tensors.update(control_inputs(controls, rows))
            tiles = self.shards.plan(rows, sample.shape[2], sample.shape[3])
            if self.shards.splits(rows, tiles):  # latent parallelism
                tensors.update(bal.inputs(rows, sharded=True))
                outs = self._timed_unet_call(lambda: self.shards.run(tensors, rows, tiles))
                bal.step_done([o["lora_applied"] for o in outs], [o["lora_ready"] for o in outs])
                return self.shards.join([o["noise_pred"] for o in outs], rows, tiles)
            tensors.update(bal.inputs(rows))
            out = self._timed_unet_call(lambda: self.call("unet", tensors, UNET_OUTPUTS))
            bal.step_done([out["lora_applied"]], [out["lora_ready"]])
            return out["noise_pred"]

        latents = run_loop(
            params, embeds, pooled, inputs["control_images"], self.deployment.folder,
            unet=unet,
            controlnet=inline_controlnet(self.call, self.residual_names, self.device),
            controlnet_in_unet=self.deployment.controlnet_mode != "inline",
            on_step=on_step,  # katz_stream: progress and cancellation
        )
        return {"latents": latents, "lora_applied_step": torch.tensor([bal.applied_step], dtype=torch.int32)}
