"""A ControlNet: ``controlnet_<name>``, one graph (and engine) per registered ControlNet.

Inputs are the Triton ``controlnet`` model's: ``sample``, ``timestep [B]`` (fp32; the engine
expands Triton's ``[1]``), ``encoder_hidden_states``, SDXL ``text_embeds`` / ``time_ids``,
``controlnet_cond [B, 3, H, W]`` in ``[0, 1]`` and ``conditioning_scale [1]`` (fp32), so one
engine serves every scale. Outputs: ``down_residual_0..N-1`` and ``mid_residual``, already
scaled, as diffusers' ``ControlNetModel`` returns them.
"""

from __future__ import annotations

import torch

from katz.export.graph import Graph
from katz.models.shapes import TensorSpec
from katz.models.unet import UNetLayout, sample_conditioning


class _ControlNetWrapper(torch.nn.Module):
    def __init__(self, net, sdxl: bool):
        super().__init__()
        self.net, self.sdxl = net, sdxl

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.sdxl:
            added, rest = {"text_embeds": rest[0], "time_ids": rest[1]}, rest[2:]
        cond, scale = rest
        down, mid = self.net(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=cond,
            # a 0-d tensor of the sample's dtype multiplies exactly as diffusers' Python float does
            conditioning_scale=scale.reshape(()).to(sample.dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )
        return (*down, mid)


class ControlNetGraph(Graph):
    model = "controlnet"
    component = "controlnet"
    lora_component = None
    refit = True  # weights can be swapped in (another ControlNet of the same architecture, stripped plans)

    def __init__(self, folder, controlnet: str):
        super().__init__(folder)
        self.controlnet = controlnet
        self.name = f"controlnet_{controlnet}"
        self.layout = UNetLayout(folder)

    @property
    def inputs(self):
        return self.layout.conditioning_specs() + [
            TensorSpec("controlnet_cond", "float", ("batch", 3, "image_height", "image_width")),
            TensorSpec("conditioning_scale", "float32", (1,)),
        ]

    @property
    def outputs(self):
        return self.layout.residual_specs("down_residual_", "mid_residual")

    def shapes(self, shape):
        s = self.folder.vae_scale_factor
        out = self.layout.conditioning_shapes(shape.batch, shape.height // s, shape.width // s)
        out["controlnet_cond"] = (shape.batch, 3, shape.height, shape.width)
        out["conditioning_scale"] = (1,)
        return out

    def load(self, dtype):
        return self.folder.load_controlnet(self.controlnet, "cpu", dtype)

    def wrapper(self, component):
        return _ControlNetWrapper(component, self.layout.sdxl)

    def sample_value(self, spec, shape, dtype, gen):
        value = sample_conditioning(spec.name, shape, dtype, gen)
        if value is not None:
            return value
        if spec.name == "controlnet_cond":
            return torch.rand(shape, generator=gen).to(dtype)
        if spec.name == "conditioning_scale":
            return torch.full(shape, 0.75, dtype=dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    def reference(self, component, inputs):
        # what katz.engines.torch.controlnet.ControlNetEngine runs: diffusers' forward, scale a float
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]} if self.layout.sdxl else None
        with torch.no_grad():
            down, mid = component(
                inputs["sample"],
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                controlnet_cond=inputs["controlnet_cond"],
                conditioning_scale=float(inputs["conditioning_scale"].reshape(-1)[0]),
                added_cond_kwargs=added,
                return_dict=False,
            )
        out = {f"down_residual_{i}": r for i, r in enumerate(down)}
        out["mid_residual"] = mid
        return out
