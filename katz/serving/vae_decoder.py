"""``vae_decoder``: ``latents [1, 4, h, w]`` -> ``image [1, 3, H, W]`` in ``[-1, 1]``."""

from __future__ import annotations

from katz.engines import engine_class


class VaeDecoder:
    def __init__(self, deployment):
        self.engine = engine_class(deployment, "vae_decoder")(
            deployment.folder, deployment.device, deployment.torch_dtype
        )
        if hasattr(self.engine, "warm_up"):  # compile / CUDA graphs: at load, never on a request
            self.engine.warm_up(deployment.accel.sizes)

    def execute(self, inputs: dict) -> dict:
        return {"image": self.engine(inputs["latents"])}
