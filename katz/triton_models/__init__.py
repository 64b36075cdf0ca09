"""The Triton models of a Katz deployment, as plain Python classes.

Each class takes its deployment (:class:`Deployment`) and maps a dict of input
tensors to a dict of output tensors; ``backends/python_katz/model.py`` only
converts Triton tensors to and from these dicts. Numeric tensors are
``torch.Tensor``; BYTES tensors are numpy object arrays.

========================  ==========================================================
model                     job
========================  ==========================================================
``preprocessing``         validate the request, tokenize, decode control images
``text_encoder``          token ids -> prompt embeddings (LoRAs on text encoders)
``katz_pipeline``         the denoising loop; calls ``unet``/``controlnet`` over BLS
``unet``                  one UNet evaluation (LoRAs merged in)
``controlnet``            one ControlNet evaluation -> residuals
``vae_decoder``           latents -> image in [-1, 1]
``postprocessing``        image -> uint8 [H, W, 3] and PNG bytes
========================  ==========================================================
"""

from __future__ import annotations

from katz.lora import LoraError
from katz.request import InvalidArgument


class ModelCallError(RuntimeError):
    """A BLS call to another model failed; ``invalid_arg`` keeps the callee's error kind."""

    def __init__(self, model: str, message: str, invalid_arg: bool):
        super().__init__(message if invalid_arg else f"{model}: {message}")
        self.model = model
        self.invalid_arg = invalid_arg


def is_user_error(exc: BaseException) -> bool:
    """Errors caused by the request (reported as INVALID_ARG), not by the server."""
    if isinstance(exc, ModelCallError):
        return exc.invalid_arg
    return isinstance(exc, (InvalidArgument, LoraError))


def create_model(role: str, params: dict[str, str], device: str, call=None):
    """Build the model class for ``role`` (the ``role`` parameter of its config.pbtxt)."""
    from katz.triton_models.deployment import Deployment

    deployment = Deployment.from_parameters(params, device)
    if role == "preprocessing":
        from katz.triton_models.preprocessing import Preprocessing as cls
    elif role == "text_encoder":
        from katz.triton_models.text_encoder import TextEncoder as cls
    elif role == "pipeline":
        from katz.triton_models.pipeline import Pipeline

        return Pipeline(deployment, call)
    elif role == "unet":
        from katz.triton_models.unet import UNet as cls
    elif role == "controlnet":
        from katz.triton_models.controlnet import ControlNet as cls
    elif role == "vae_decoder":
        from katz.triton_models.vae_decoder import VaeDecoder as cls
    elif role == "postprocessing":
        from katz.triton_models.postprocessing import Postprocessing as cls
    else:
        raise ValueError(f"unknown katz model role {role!r}")
    return cls(deployment)
