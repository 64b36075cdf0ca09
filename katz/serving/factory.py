"""The model class for each ``role`` parameter of a model's config.pbtxt (the backend calls this)."""

from __future__ import annotations

from katz.deployment import Deployment

# the models only ever called over BLS (by katz_pipeline or unet): they mark their INVALID_ARG messages
# (see katz.errors.INVALID_ARG_MARK)
BLS_ONLY_ROLES = ("unet", "controlnet")


def create_model(role: str, params: dict[str, str], device: str, call=None, call_stream=None):
    """Build the model class for ``role`` (the ``role`` parameter of its config.pbtxt). ``call`` is the
    BLS transport, ``call_stream`` its form for decoupled callees (an iterator of responses)."""
    deployment = Deployment.from_parameters(params, device)
    if role == "preprocessing":
        from katz.serving.preprocessing import Preprocessing as cls
    elif role == "text_encoder":
        from katz.serving.text_encoder import TextEncoder as cls
    elif role == "pipeline":
        from katz.serving.pipeline import Pipeline

        return Pipeline(deployment, call)
    elif role == "stream":
        from katz.serving.stream import Stream

        return Stream(deployment, call)
    elif role == "unet":
        if deployment.folder.family == "flux":  # the denoiser of a FLUX model is its transformer
            from katz.serving.transformer import Transformer

            return Transformer(deployment, call, call_stream)
        from katz.serving.unet import UNet

        return UNet(deployment, call)
    elif role == "controlnet":
        if deployment.folder.family == "flux":  # mode service: one response per block residual
            from katz.serving.controlnet import FluxControlNets as cls
        else:
            from katz.serving.controlnet import ControlNet as cls
    elif role == "vae_decoder":
        from katz.serving.vae_decoder import VaeDecoder as cls
    elif role == "postprocessing":
        from katz.serving.postprocessing import Postprocessing as cls
    elif role == "png_encoder":
        from katz.serving.postprocessing import PngEncoder as cls
    else:
        raise ValueError(f"unknown katz model role {role!r}")
    return cls(deployment)
