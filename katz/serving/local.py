"""Run the ``katz`` ensemble in one process, with the same model classes Triton runs.

For tests, benchmarks of the engines without a server, and debugging: the
step order and tensor names are those of ``model_repository/katz``, and BLS
calls become direct calls.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

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
        # wall seconds in each model's execute, by model name (a caller's include its callees'): where a
        # request's time goes, for benchmarks
        self.seconds: dict[str, float] = defaultdict(float)
        self.models = {
            name: create_model(role, params, deployment.device, call=self._call, call_stream=self._call_stream)
            for name, role in roles.items()
        }

    def execute(self, model: str, inputs: dict) -> dict:
        """``model``'s ``execute``, its time added to :attr:`seconds`."""
        start = time.perf_counter()
        try:
            return self.models[model].execute(inputs)
        finally:
            self.seconds[model] += time.perf_counter() - start

    def _call(self, model: str, inputs: dict, output_names: list[str]) -> dict:
        out = self.execute(model, inputs)
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

    def forget_loras(self) -> None:
        """Make the next LoRA request load cold: the base weights back in every model that merges LoRAs,
        their loaded LoRAs dropped, and any parsed-file cache emptied (a benchmark's cold case; the OS
        page cache is the caller's: :func:`katz.lora.readahead.evict`)."""
        for model in self.models.values():
            if hasattr(model, "bal"):
                model.bal.switch_to(())
                model.loras.clear_caches()
            deployment = getattr(model, "deployment", None)
            if deployment is not None and "loras" in vars(deployment):  # a LoRA store made (cached_property)
                deployment.loras.clear_cache()

    def generate(self, request: dict) -> dict:
        """Request tensors (see :mod:`katz.request`) -> ``{"image", "png", "seed"}``."""
        pre = self.execute("preprocessing", request)
        shared = {"params": pre["params"], "control_images": pre["control_images"]}
        text = self.execute("text_encoder", {k: v for k, v in pre.items() if k.startswith("input_ids") or k == "params"})
        denoised = self.execute("katz_pipeline", {**text, **shared})
        latents = denoised["latents"]
        image = self.execute("vae_decoder", {"latents": latents})["image"]
        pixels = self.execute("postprocessing", {"image": image})["image"]
        png = self.execute("png_encoder", {"image": pixels, "params": pre["params"]})["png"]
        return {"image": pixels, "png": png, "seed": pre["seed"], "lora_applied_step": denoised["lora_applied_step"]}
