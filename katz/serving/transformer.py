"""``unet`` of a FLUX.1 deployment: the transformer, running whole loop requests with BAL.

A FLUX request reaches it as a loop request (:mod:`katz.diffusion.loop`, :func:`run_flux_loop`):
the loop runs here, next to the transformer, its ControlNets and, where the folder has ControlNets,
the VAE whose encoder turns control images into latents. On a GPU the deployment's ``compile`` and
``fp8`` apply to the transformer's and ControlNets' blocks (:mod:`katz.engines.torch.transformer`),
compiled here at load for the deployment's graph sizes. Mode ``local``: the ControlNets run beside
each transformer evaluation, their residuals streamed block by block
(:class:`katz.controlnet.blocks.TransformerControlNetStep`); mode ``service``: the same, the
ControlNets running in the ``controlnet`` model, which streams each block's residual back over BLS;
mode ``inline`` (the baseline): one after the other before it. BAL is the UNet's
(:class:`katz.lora.bal.UNetLoras`, the same manager and bound): the LoRAs go in at the first step
they are on the device, at step *k* at the latest. Outputs: ``latents [1, C, h, w]`` and ``lora_applied_step [1, 1]``. A loop request from
``katz_stream`` names a progress channel (``loop_progress``, :mod:`katz.serving.progress`): the loop
reports each step there and stops at a step boundary once the stream is cancelled.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from katz.controlnet.blocks import FLUX_RESIDUAL_OUTPUTS, TransformerControlNetStep, block_counts
from katz.diffusion.loop import is_loop_request, read_loop_request, run_flux_loop
from katz.engines.torch.transformer import FluxControlNetEngine, FluxTransformerEngine, flux_text_len
from katz.engines.torch.vae import VaeDecoderEngine
from katz.errors import InvalidArgument
from katz.lora.bal import instance_loras, queued_loop_order
from katz.serving.progress import loop_progress


def _remote_residuals(call_stream, name, scale, hidden_states, cond, timestep, guidance, pooled,
                      encoder_hidden_states, txt_ids, img_ids):
    """One ControlNet on one step in the ``controlnet`` model (mode service): ``(kind, block, residual)``
    per block residual, as that model sends them (:class:`katz.serving.controlnet.FluxControlNets`)."""
    inputs = {
        "controlnet_name": np.array([name.encode()], dtype=np.object_),
        "conditioning_scale": torch.tensor([scale], dtype=torch.float32),
        "hidden_states": hidden_states, "controlnet_cond": cond, "timestep": timestep, "guidance": guidance,
        "pooled_projections": pooled, "encoder_hidden_states": encoder_hidden_states, "txt_ids": txt_ids,
        "img_ids": img_ids,
    }
    for out in call_stream("controlnet", inputs, FLUX_RESIDUAL_OUTPUTS):
        kind = "single" if bool(out["single"].reshape(-1)[0]) else "double"
        yield kind, int(out["block"].reshape(-1)[0]), out["residual"].to(hidden_states.device)


def _config_block_counts(folder, name: str) -> tuple[int, int]:
    return block_counts(folder.controlnet_config(name))


class Transformer:
    def __init__(self, deployment, call=None, call_stream=None):
        self.deployment = deployment
        folder, device, dtype = deployment.folder, deployment.device, deployment.torch_dtype
        accel = deployment.accel  # compile (per block) and fp8 on a GPU; the CPU runs eagerly
        self.engine = FluxTransformerEngine(folder, device, dtype, accel=accel)
        # compiled blocks at load, never on a request (the ControlNets beside it share the code)
        self.engine.warm_up(accel.sizes, text_len=flux_text_len(folder), vae_scale_factor=folder.vae_scale_factor)
        service = deployment.controlnet_mode == "service"  # the ControlNets in the controlnet model
        self.controlnets = FluxControlNetEngine(folder, device, dtype, accel=accel) \
            if folder.controlnets and not service else None
        self.vae = VaeDecoderEngine(folder, device, dtype) if folder.controlnets else None
        self.beside = deployment.controlnet_mode in ("local", "service")  # else inline: before each step
        remote = counts = None
        if service and folder.controlnets:
            if call_stream is None:
                raise ValueError("controlnet_mode service needs the BLS stream to the controlnet model")
            remote = functools.partial(_remote_residuals, call_stream)
            counts = functools.partial(_config_block_counts, folder)  # no ControlNet weights in this process
        self.step = TransformerControlNetStep(self.engine, self.controlnets, remote, counts)
        self.loras, self.bal, self.hints = instance_loras(deployment, self.engine)
        self._sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.runs, self.run_seconds = 0, 0.0  # transformer evaluations and their time

    @property
    def applied(self):
        """The LoRA set in place (``()``: the base weights)."""
        return self.bal.applied

    def _run_loop(self, inputs: dict) -> dict:
        params, embeds, pooled, images = read_loop_request(inputs, self.deployment.device, self.deployment.torch_dtype)
        if pooled is None:
            raise InvalidArgument("loop_pooled_prompt_embeds", "required for a FLUX model")
        bal = self.bal.begin(params.lora_set, params.lora_k)

        def transformer(*args, controls=()):
            bal.before_step()
            start = time.perf_counter()
            out = self.step(*args, controls=controls)
            self._sync()  # the step's time on the device is the BAL estimate's step time
            seconds = time.perf_counter() - start
            self.runs, self.run_seconds = self.runs + 1, self.run_seconds + seconds
            self.bal.observe_step(seconds)
            return out

        vae = self.vae
        progress = loop_progress(inputs)  # katz_stream's request: a report per step
        try:
            latents = run_flux_loop(
                params, embeds, pooled, images, self.deployment.folder, transformer, self.controlnets, self.beside,
                vae.encode_distribution if vae is not None else None,
                vae.shift_factor if vae is not None else 0.0, vae.scaling_factor if vae is not None else 1.0,
                on_step=progress,
            )
        finally:
            if progress is not None:
                progress.close()
        bal.finish()
        return {"latents": latents, "lora_applied_step": torch.tensor([[bal.applied_step]], dtype=torch.int32)}

    def execute(self, inputs: dict) -> dict:
        result = self.execute_batch([inputs])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def execute_batch(self, batch: list[dict]) -> list:
        """Run the queued loop requests, those wanting the LoRA set in place first; an error fails
        only its own request."""
        results: list = [None] * len(batch)
        loops = []
        for i, inputs in enumerate(batch):
            if is_loop_request(inputs):
                loops.append(i)
            else:
                results[i] = InvalidArgument("loop_params", "required: a FLUX transformer runs whole loop requests")
        for i in queued_loop_order(self.bal, batch, loops):
            try:
                results[i] = self._run_loop(batch[i])
            except Exception as exc:
                results[i] = exc
        return results

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        return [
            ("katz_unet_runs_total", "denoiser evaluations (FLUX: transformer steps)", {}, self.runs),
            ("katz_unet_run_seconds_total", "time of the denoiser evaluations (s)", {}, self.run_seconds),
            ("katz_controlnet_residual_wait_seconds_total",
             "time the transformer waited for ControlNet residuals not made yet (mode local; s)", {},
             self.step.waited_seconds),
            *self.loras.stats.metrics(),
            ("katz_lora_hints_total", "LoRA name lists received from preprocessing for arriving requests", {},
             self.hints.received if self.hints is not None else 0),
        ]

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        return list(self.loras.gauges())
