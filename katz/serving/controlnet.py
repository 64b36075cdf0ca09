"""``controlnet``: one evaluation of a named ControlNet -> ``down_residual_0..N-1``, ``mid_residual``.

Inputs as :mod:`katz.serving.unet` (without residuals and LoRAs) plus
``controlnet_name`` BYTES ``[1]``, ``controlnet_cond [B, 3, H, W]`` in ``[0, 1]``
``conditioning_scale`` FP32 ``[1]`` and optional ``cond_key`` BYTES ``[1]`` (the
control image's content hash: its conditioning features are computed once and
cached across requests).

A FLUX deployment's ``controlnet`` (mode ``service``) is :class:`FluxControlNets`: decoupled, one
response per block residual.
"""

from __future__ import annotations

import torch

from katz.diffusion.loop import added_cond
from katz.engines import engine_class
from katz.errors import InvalidArgument
from katz.serving.metrics import graph_metrics


def _key(inputs: dict) -> str | None:
    key = inputs.get("cond_key")
    if key is None:
        return None
    return bytes(key.reshape(-1)[0]).decode() or None


class ControlNet:
    def __init__(self, deployment):
        self.engine = engine_class(deployment, "controlnet")(
            deployment.folder,
            deployment.device,
            deployment.torch_dtype,
            resident=deployment.controlnet_resident,
            cache_bytes=deployment.controlnet_cache_bytes,
            feature_cache_bytes=deployment.feature_cache_bytes,
        )
        if hasattr(self.engine, "warm_up"):  # CUDA graphs / compile: at load, never on a request
            self.engine.warm_up(deployment.accel.sizes, batches=(1, 2), compile_batches=deployment.compile_batches)

    def execute(self, inputs: dict) -> dict:
        name = bytes(inputs["controlnet_name"].reshape(-1)[0]).decode()
        if name not in self.engine.names:
            raise InvalidArgument("controlnets", f"unknown ControlNet {name!r}")
        down, mid = self.engine(
            name,
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            added_cond(inputs),
            inputs["controlnet_cond"],
            float(inputs["conditioning_scale"].reshape(-1)[0]),
            _key(inputs),
        )
        out = {f"down_residual_{i}": r for i, r in enumerate(down)}
        out["mid_residual"] = mid
        return out

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        f = self.engine.features
        return [
            ("katz_controlnet_feature_cache_hits_total", "control-image feature cache hits", {}, f.hits),
            ("katz_controlnet_feature_cache_misses_total", "control-image feature cache misses", {}, f.misses),
            ("katz_controlnet_loads_total", "ControlNets loaded into the model cache", {}, self.engine.loads),
            *graph_metrics(self.engine),
        ]


class _ResidualSender:
    """Where :func:`katz.controlnet.blocks.run_blocks` publishes one kind of residual: each one a
    response of the stream ``send``."""

    def __init__(self, send, single: bool):
        self.send, self.single = send, torch.tensor([single])

    def publish(self, block: int, _index: int, residual: torch.Tensor) -> None:
        self.send({"residual": residual, "block": torch.tensor([block], dtype=torch.int32), "single": self.single},
                  False)


class FluxControlNets:
    """``controlnet`` of a FLUX deployment in mode ``service``: one ControlNet on one transformer step,
    decoupled, one response per block residual as the block finishes (``residual [1, L, C]`` times the
    scale, ``block`` INT32 ``[1]``, ``single`` BOOL ``[1]``: a single-block residual), then an empty
    final response. Inputs: ``controlnet_name`` BYTES ``[1]``, ``conditioning_scale`` FP32 ``[1]`` and
    the step's ``hidden_states``, ``controlnet_cond`` (packed control latents), ``timestep``,
    ``guidance`` (FP32, dev only), ``pooled_projections``, ``encoder_hidden_states``, ``txt_ids``,
    ``img_ids`` (:class:`katz.controlnet.blocks.TransformerControlNetStep` sends them)."""

    def __init__(self, deployment):
        from katz.engines.torch.transformer import FluxControlNetEngine, flux_text_len

        folder = deployment.folder
        self.engine = FluxControlNetEngine(folder, deployment.device, deployment.torch_dtype, accel=deployment.accel)
        self.names = set(folder.controlnets)
        # with compile: the blocks compiled at load (this process has no transformer to do it)
        self.engine.warm_up(sorted(self.names), deployment.accel.sizes, text_len=flux_text_len(folder),
                            vae_scale_factor=folder.vae_scale_factor)
        self.runs = 0

    def execute_stream(self, inputs: dict, send, is_cancelled=lambda: False) -> None:
        from katz.controlnet.blocks import run_blocks

        name = bytes(inputs["controlnet_name"].reshape(-1)[0]).decode()
        if name not in self.names:
            raise InvalidArgument("controlnets", f"unknown ControlNet {name!r}")
        run_blocks(self.engine, name, _ResidualSender(send, False), _ResidualSender(send, True), 0,
                   float(inputs["conditioning_scale"].reshape(-1)[0]), inputs["hidden_states"],
                   inputs["controlnet_cond"], inputs["timestep"], inputs.get("guidance"),
                   inputs["pooled_projections"], inputs["encoder_hidden_states"], inputs["txt_ids"],
                   inputs["img_ids"])
        self.runs += 1
        send({}, True)

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        return [("katz_controlnet_runs_total", "FLUX ControlNet evaluations (one per step and ControlNet)", {},
                 self.runs)]
