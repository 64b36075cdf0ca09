"""Run the ``katz`` ensemble in one process, with the same model classes Triton runs.

For tests, benchmarks of the engines without a server, and debugging: the
step order and tensor names are those of ``model_repository/katz``, and BLS
calls become direct calls.
"""

from __future__ import annotations

from katz.deployment import Deployment
from katz.serving.factory import create_model

ROLES = {
    "preprocessing": "preprocessing",
    "text_encoder": "text_encoder",
    "katz_pipeline": "pipeline",
    "unet": "unet",
    "controlnet": "controlnet",
    "vae_decoder": "vae_decoder",
    "postprocessing": "postprocessing",
    "png_encoder": "png_encoder",
}


class LocalEnsemble:
    def __init__(self, deployment: Deployment):
        params = deployment.to_parameters()
        roles = dict(ROLES)
        if deployment.folder.family == "flux":  # as the rendered repository: its transformer holds the ControlNets
            del roles["controlnet"]
        roles.update({f"unet_{i}": "unet" for i in range(1, deployment.unet_shards)})
        self.models = {
            name: create_model(role, params, deployment.device, call=self._call) for name, role in roles.items()
        }

    def _call(self, model: str, inputs: dict, output_names: list[str]) -> dict:
        out = self.models[model].execute(inputs)
        return {k: out[k] for k in output_names}

    def generate(self, request: dict) -> dict:
        """Request tensors (see :mod:`katz.request`) -> ``{"image", "png", "seed"}``."""
        pre = self.models["preprocessing"].execute(request)
        shared = {"params": pre["params"], "control_images": pre["control_images"]}
        text = self.models["text_encoder"].execute(
            {k: v for k, v in pre.items() if k.startswith("input_ids") or k == "params"}
        )
        denoised = self.models["katz_pipeline"].execute({**text, **shared})
        latents = denoised["latents"]
        image = self.models["vae_decoder"].execute({"latents": latents})["image"]
        pixels = self.models["postprocessing"].execute({"image": image})["image"]
        png = self.models["png_encoder"].execute({"image": pixels, "params": pre["params"]})["png"]
        return {"image": pixels, "png": png, "seed": pre["seed"], "lora_applied_step": denoised["lora_applied_step"]}
