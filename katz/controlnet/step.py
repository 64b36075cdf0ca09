"""ControlNet-as-a-Service: one UNet evaluation with the request's ControlNets beside it.

The ControlNet residuals only enter the UNet after its down and mid blocks, so the step submits
the ControlNets first (:mod:`katz.controlnet.transports`: another Triton model over BLS, another
server, or this process), runs the UNet's down path while they compute, joins their residuals
(:func:`sum_residuals`) and runs the up path. In the same process (mode ``local``) the
ControlNets' work is queued on the UNet's CUDA stream ahead of its own, and the step runs whole.

The loop hands a step's ControlNets to the UNet model as tensors (:func:`control_inputs`), which
the UNet model reads back as jobs (:func:`control_jobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass
class ControlJob:
    """One ControlNet evaluation: which net, its image (``[B, 3, H, W]``), scale and cache key."""

    name: str
    image: torch.Tensor
    scale: float
    key: str


def job_inputs(job: ControlJob, common: dict) -> dict:
    """The ``controlnet`` model's input tensors for one job (``common`` = sample, timestep, ...)."""
    return {
        **common,
        "controlnet_name": np.array([job.name.encode()], dtype=object),
        "controlnet_cond": job.image.contiguous(),
        "conditioning_scale": torch.tensor([job.scale], dtype=torch.float32),
        "cond_key": np.array([(job.key or "").encode()], dtype=object),
    }


def sum_residuals(
    outputs: Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor] | tuple[None, None]:
    """``(down residuals, mid residual)`` summed over ControlNets, in their order (as diffusers'
    ``MultiControlNetModel`` sums); ``(None, None)`` for none."""
    down, mid = None, None
    for d, m in outputs:
        if down is None:
            down, mid = list(d), m
        else:
            down = [a + b for a, b in zip(down, d)]
            mid = mid + m
    return down, mid


def jobs_of(controls) -> list[ControlJob]:
    """The loop's active ControlNets ``[(ControlInput, image, scale at this step), ...]`` as jobs."""
    return [ControlJob(c.name, image, scale, c.key) for c, image, scale in controls]


def control_inputs(controls, batch: int) -> dict:
    """The loop's active ControlNets as ``unet`` inputs (batch dimension first, rows repeat)."""
    jobs = jobs_of(controls)
    return {
        "controlnets": np.array([[j.name.encode() for j in jobs]] * batch, dtype=object),
        "controlnet_scales": torch.tensor([[j.scale for j in jobs]] * batch, dtype=torch.float32),
        "control_image_keys": np.array([[j.key.encode() for j in jobs]] * batch, dtype=object),
        # [B, 3n, H, W]: each ControlNet's image (already doubled for CFG) side by side in channels
        "control_images": torch.cat([j.image for j in jobs], dim=1).contiguous(),
    }


def control_jobs(inputs: dict) -> list[ControlJob]:
    """The jobs a ``unet`` call's :func:`control_inputs` name (row 0; images ``[B, 3n, H, W]``)."""
    names = inputs["controlnets"].reshape(inputs["controlnets"].shape[0], -1)[0]
    scales = inputs["controlnet_scales"].reshape(inputs["controlnet_scales"].shape[0], -1)[0].tolist()
    keys = inputs["control_image_keys"].reshape(inputs["control_image_keys"].shape[0], -1)[0]
    images = inputs["control_images"]
    return [
        ControlJob(bytes(n).decode(), images[:, 3 * j : 3 * j + 3], float(s), bytes(k).decode())
        for j, (n, s, k) in enumerate(zip(names, scales, keys))
    ]


class ControlNetStep:
    """One UNet evaluation, with ControlNet jobs beside its down path or with residuals given.

    ``engine``: a UNet engine (whole step, or ``down``/``up`` halves); ``controlnets``: a
    transport (:class:`katz.controlnet.transports.ControlNetClient`) or None (mode inline)."""

    def __init__(self, engine, controlnets=None):
        self.engine = engine
        self.controlnets = controlnets

    def __call__(self, sample, timestep, hidden, cond, jobs=None, down=None, mid=None) -> torch.Tensor:
        """``sample [B, C, h, w]``, ``timestep [B, 1]`` float32 -> noise ``[B, C, h, w]``. With ``jobs``
        the ControlNets run beside the down path; else ``down``/``mid`` are residuals already
        computed (mode inline) or None."""
        if jobs:
            common = {"sample": sample, "timestep": timestep[:1].reshape(1), "encoder_hidden_states": hidden,
                      **(cond or {})}
            pending = self.controlnets.submit(jobs, common)
            if not self.controlnets.cross_process:  # local: queued on this stream already; one whole step
                down, mid = pending.result()
                return self.engine(sample, timestep.reshape(-1), hidden, cond, down, mid)
            state = self.engine.down(sample, timestep.reshape(-1), hidden, cond)
            down, mid = pending.result()
            return self.engine.up(state, down, mid)
        return self.engine(sample, timestep.reshape(-1), hidden, cond, down, mid)
