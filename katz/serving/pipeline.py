"""``katz_pipeline``: the denoising loop, calling ``unet`` and ``controlnet`` over BLS.

Where the deployment runs the loop in the UNet's process (``loop`` ``unet``, the default with one
UNet shard; :mod:`katz.diffusion.loop`), this model hands each request to ``unet`` in one
call instead and the per-step path below is ``katz_stream``'s (it reports every step).

With several UNet shards (latent parallelism) each step's UNet evaluation is
split into jobs run concurrently, one per shard: one per CFG half when there
are as many shards as batch rows, else each row cut into overlapping latent
bands (:mod:`katz.parallel.tiling`) whose noise predictions are blended.

Inputs: ``prompt_embeds [B, 77, D]``, SDXL ``pooled_prompt_embeds [B, P]``,
``control_images [n, 3, H, W]``, ``params``. Outputs: ``latents [1, 4, h, w]`` and
``lora_applied_step`` int32 ``[1]`` (the step from which the LoRAs were in; -1 without LoRAs).

``call(model, inputs, output_names) -> outputs`` is the BLS transport, given by
the Triton glue (or by a test, wiring the models together in-process).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from katz.diffusion.loop import LOOP_OUTPUTS, bls_controlnet, loop_place, loop_request, run_loop, step_tensors
from katz.diffusion.schedulers import DEFAULT, make_scheduler
from katz.parallel.tiling import Tile, blend, plan_tiles
from katz.serving.preprocessing import read_params


def unet_model_names(shards: int) -> list[str]:
    """The Triton models holding the UNet shards: ``unet``, ``unet_1``, ..."""
    return ["unet"] + [f"unet_{i}" for i in range(1, shards)]


def _rows(value, start: int, count: int):
    """Rows ``start:start+count`` of a batch-first tensor or numpy array."""
    return value[start : start + count]


def _shard_inputs(tensors: dict, row: int, tile: Tile | None) -> dict:
    """One shard's job: row ``row`` of every input and, for a band, its crop of the latent,
    of each ControlNet residual (at that residual's scale) and of the control images (pixels).
    Feature-cache keys name the band, so features of the whole control image are not reused
    for a crop. SDXL ``time_ids`` stay the whole image's (see README, "Latent parallelism")."""
    part = {k: _rows(v, row, 1) for k, v in tensors.items()}
    if tile is None:
        return part
    for k, v in part.items():
        if k in ("sample", "mid_residual", "control_images") or k.startswith("down_residual_"):
            part[k] = tile.crop(v).contiguous()
        elif k == "control_image_keys":
            suffix = f"@{tile.key}".encode()
            part[k] = np.array([[bytes(key) + suffix if bytes(key) else bytes(key) for key in r] for r in v],
                               dtype=object)
    return part


def _control_inputs(controls, batch: int) -> dict:
    """The step's active ControlNets as ``unet`` inputs (batch dimension first, rows repeat)."""
    names = [c.name.encode() for c, _, _ in controls]
    keys = [c.key.encode() for c, _, _ in controls]
    return {
        "controlnets": np.array([names] * batch, dtype=object),
        "controlnet_scales": torch.tensor([[s for _, _, s in controls]] * batch, dtype=torch.float32),
        "control_image_keys": np.array([keys] * batch, dtype=object),
        # [B, 3n, H, W]: each ControlNet's image (already doubled for CFG) side by side in channels
        "control_images": torch.cat([image for _, image, _ in controls], dim=1).contiguous(),
    }


class _BoundedLora:
    """Per-request BAL state: which step we are at and whether the LoRAs are in yet.

    Step ``i`` asks the UNet to wait for the LoRAs once ``i >= k`` or once they
    were applied at an earlier step (so a request never goes back to base weights).
    Before that, one UNet decides by itself (the LoRAs go in as soon as they are
    on its device). Several UNet shards must agree, so the pipeline decides for
    them: the LoRAs go in at the step after every shard reported them ready,
    and until then every shard runs on base weights (``lora_skip``).
    """

    def __init__(self, names: list[str], scales: list[float], k: int):
        self.names, self.scales, self.k = names, scales, k
        self.step = 0
        self.applied_at: int | None = None
        self.all_ready = False

    def inputs(self, batch: int, sharded: bool = False) -> dict:
        if not self.names:
            return {}
        wait = self.applied_at is not None or self.step >= self.k or (sharded and self.all_ready)
        out = {
            "loras": np.array([[n.encode() for n in self.names]] * batch, dtype=object),
            "lora_scales": torch.tensor([self.scales] * batch, dtype=torch.float32),
            "lora_wait": torch.full((batch, 1), wait, dtype=torch.bool),
        }
        if sharded and not wait:
            out["lora_skip"] = torch.ones((batch, 1), dtype=torch.bool)
        return out

    def step_done(self, applied: list[torch.Tensor], ready: list[torch.Tensor]) -> None:
        flags = [bool(a.reshape(-1)[0]) for a in applied]
        if self.names and self.applied_at is None and any(flags):
            if not all(flags):
                raise RuntimeError("UNet shards disagreed on the LoRA weights of one step")
            self.applied_at = self.step
        self.all_ready = all(bool(r.reshape(-1)[0]) for r in ready)
        self.step += 1


class Pipeline:
    def __init__(self, deployment, call):
        self.deployment = deployment
        self.call = call
        folder = deployment.folder
        self.family = folder.family
        make_scheduler(DEFAULT, folder.scheduler_config)  # imports diffusers at load, not on the first request
        self.num_residuals = folder.num_down_residuals
        self.residual_names = folder.residual_names
        self.device = torch.device(deployment.device)
        self.unet_shards = unet_model_names(deployment.unet_shards)
        self.latent_overlap = deployment.latent_overlap
        self.loop = loop_place(deployment.loop, deployment.unet_shards)  # where katz_pipeline's loop runs
        self.align = folder.unet_downsampling_factor
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.unet_shards)), thread_name_prefix="katz-shard")
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

    def _steps_run(self, params: dict) -> int:
        """How many UNet steps the request's loop runs (some schedulers run more than ``steps``)."""
        scheduler = make_scheduler(params["scheduler"], self.deployment.folder.scheduler_config)
        scheduler.set_timesteps(params["steps"])
        return len(scheduler.timesteps)

    def shard_plan(self, rows: int, height: int, width: int) -> list[Tile | None]:
        """The bands each batch row is cut into: ``[None]`` (the whole row on one shard) unless
        there are more shards than rows; then up to ``shards // rows`` bands."""
        if len(self.unet_shards) <= rows:
            return [None]
        tiles = plan_tiles(height, width, len(self.unet_shards) // rows, self.latent_overlap, self.align)
        return tiles if len(tiles) > 1 else [None]

    def execute(self, inputs: dict, on_step=None) -> dict:
        params = read_params(inputs)
        if self.loop == "unet" and on_step is None:
            # the whole loop in the UNet's process: one BLS call (katz.diffusion.loop)
            out = self._timed_unet_call(
                lambda: self.call("unet", loop_request(inputs), list(LOOP_OUTPUTS)), steps=self._steps_run(params))
            return {"latents": out["latents"], "lora_applied_step": out["lora_applied_step"].reshape(1)}
        dtype = self.deployment.torch_dtype
        embeds = inputs["prompt_embeds"].to(self.device, dtype)
        pooled = inputs.get("pooled_prompt_embeds")
        pooled = pooled.to(self.device, dtype) if pooled is not None else None
        bal = _BoundedLora(params["loras"], params["lora_scales"], params.get("lora_k", 0))

        def unet(sample, t, hidden, added, down, mid, controls=()):
            tensors = step_tensors(sample, t, hidden, added, batched=True, device=self.device)
            if down is not None:
                tensors.update({f"down_residual_{i}": r for i, r in enumerate(down)})
                tensors["mid_residual"] = mid
            if controls:  # ControlNet-as-a-Service: the unet model calls the ControlNets itself
                tensors.update(_control_inputs(controls, sample.shape[0]))
            rows = sample.shape[0]
            tiles = self.shard_plan(rows, sample.shape[2], sample.shape[3])
            if len(self.unet_shards) > 1 and rows * len(tiles) > 1:
                # latent parallelism: one job per CFG half and band, each on its own UNet shard, concurrently
                tensors.update(bal.inputs(rows, sharded=True))
                parts = [_shard_inputs(tensors, r, t) for r in range(rows) for t in tiles]
                outs = self._timed_unet_call(lambda: list(self.pool.map(
                    lambda job: self.call(job[0], job[1], ["noise_pred", "lora_applied", "lora_ready"]),
                    zip(self.unet_shards, parts),
                )))
                bal.step_done([o["lora_applied"] for o in outs], [o["lora_ready"] for o in outs])
                preds = [o["noise_pred"] for o in outs]
                if tiles != [None]:
                    preds = [blend(preds[r * len(tiles) : (r + 1) * len(tiles)], tiles) for r in range(rows)]
                return torch.cat(preds)
            tensors.update(bal.inputs(sample.shape[0]))
            out = self._timed_unet_call(
                lambda: self.call("unet", tensors, ["noise_pred", "lora_applied", "lora_ready"]))
            bal.step_done([out["lora_applied"]], [out["lora_ready"]])
            return out["noise_pred"]

        latents = run_loop(
            params, embeds, pooled, inputs["control_images"], self.deployment.folder,
            unet=unet,
            controlnet=bls_controlnet(self.call, self.residual_names, self.device),
            controlnet_in_unet=self.deployment.controlnet_mode != "inline",
            on_step=on_step,  # katz_stream: progress and cancellation
        )
        applied_at = -1 if bal.applied_at is None else bal.applied_at
        return {"latents": latents, "lora_applied_step": torch.tensor([applied_at], dtype=torch.int32)}
