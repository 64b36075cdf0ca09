"""Run the ``katz`` ensemble in one process, with the same model classes Triton runs.

For tests, benchmarks of the engines without a server, and debugging: the
step order and tensor names are those of ``model_repository/katz``, and BLS
calls become direct calls.
"""

from __future__ import annotations

import queue
import threading

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
        if deployment.folder.family == "flux" and deployment.controlnet_mode != "service":
            del roles["controlnet"]  # as the rendered repository: its transformer holds the ControlNets
        roles.update({f"unet_{i}": "unet" for i in range(1, deployment.unet_shards)})
        self.models = {
            name: create_model(role, params, deployment.device, call=self._call, call_stream=self._call_stream)
            for name, role in roles.items()
        }

    def _call(self, model: str, inputs: dict, output_names: list[str]) -> dict:
        out = self.models[model].execute(inputs)
        return {k: out[k] for k in output_names}

    def _call_stream(self, model: str, inputs: dict, output_names: list[str]):
        """A decoupled model's responses as they are sent (its ``execute_stream`` on a thread of its
        own, as the callee runs in its own process under Triton); its error is raised at the end."""
        responses: queue.Queue = queue.Queue()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                self.models[model].execute_stream(inputs, lambda out, last: responses.put(None if last else out))
            except BaseException as exc:  # noqa: BLE001 - raised to the caller below
                failed.append(exc)
                responses.put(None)

        threading.Thread(target=run, name=f"katz-local-{model}", daemon=True).start()
        while (out := responses.get()) is not None:
            yield {k: out[k] for k in output_names}
        if failed:
            raise failed[0]

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
