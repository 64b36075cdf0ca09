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
``katz_pipeline``         the denoising loop: hands it to ``unet`` or calls it every step
``katz_stream``           decoupled: the whole chain over BLS, one response per step
``unet``                  one UNet evaluation, or a request's whole loop (LoRAs merged in)
``controlnet``            one ControlNet evaluation -> residuals
``vae_decoder``           latents -> image in [-1, 1]
``postprocessing``        image -> uint8 [H, W, 3]
``png_encoder``           uint8 image -> PNG bytes with the settings (run only when ``png`` is asked for)
========================  ==========================================================
"""

from __future__ import annotations

from katz.lora.weights import LoraError
from katz.request import InvalidArgument


class ModelCallError(RuntimeError):
    """A call to another model (BLS, or a remote server) failed; ``kind`` keeps the error's kind:
    ``"invalid_arg"`` (the request's fault), ``"unavailable"`` (try again later) or ``"internal"``."""

    def __init__(self, model: str, message: str, kind: str = "internal"):
        if INVALID_ARG_MARK in message:  # the request's fault, said by a BLS callee (see INVALID_ARG_MARK)
            kind, message = "invalid_arg", message.replace(INVALID_ARG_MARK, "", 1)
        if kind == "unavailable" and UNAVAILABLE_MARK not in message:
            message = f"{UNAVAILABLE_MARK}{model}: {message}"
        elif kind == "internal":
            message = f"{model}: {message}"
        super().__init__(message)
        self.model = model
        self.kind = kind

    @classmethod
    def from_error(cls, model: str, message: str, kind: str) -> "ModelCallError":
        """From a callee's error; Triton 2.51 does not keep UNAVAILABLE through BLS, the message mark does."""
        if UNAVAILABLE_MARK in message:
            kind = "unavailable"
        return cls(model, message, kind)


UNAVAILABLE_MARK = "UNAVAILABLE: "
# Triton 2.51 turns every BLS error into INTERNAL, so the models only ever called over BLS
# (unet, controlnet) mark their INVALID_ARG messages; the caller removes the mark again.
INVALID_ARG_MARK = "INVALID_ARG: "
BLS_ONLY_ROLES = ("unet", "controlnet")


def error_kind(exc: BaseException) -> str:
    """``"invalid_arg"`` for errors caused by the request, ``"unavailable"`` for a dependency
    that is down or overloaded, else ``"internal"``."""
    if isinstance(exc, ModelCallError):
        return exc.kind
    if isinstance(exc, (InvalidArgument, LoraError)):
        return "invalid_arg"
    if is_out_of_memory(exc):
        return "unavailable"
    return "internal"


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failed (host ``MemoryError``, torch's CPU allocator, CUDA out of memory)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def is_user_error(exc: BaseException) -> bool:
    """Errors caused by the request (reported as INVALID_ARG), not by the server."""
    return error_kind(exc) == "invalid_arg"


def c_order(value):
    """``value`` (a torch tensor) with the C-order strides Triton's DLPack import checks (every dim
    not of size 1). torch calls a tensor with zero elements contiguous whatever its strides (one made
    from an empty numpy array has all strides 0), so ``contiguous()`` alone does not give them."""
    import torch

    value = value.contiguous()
    expected = 1
    for size, stride in zip(reversed(value.shape), reversed(value.stride())):
        if size != 1 and stride != expected:
            return torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)
        expected *= size
    return value


def memory_gauges(device: str) -> list[tuple[str, str, dict, float]]:
    """The process's CUDA memory on ``device`` as Triton gauges ``(name, description, labels, value)``:
    torch's caching allocator, ``allocated`` (in tensors) and ``reserved`` (held from the driver; what
    nvidia-smi shows, less the CUDA context). Empty on the CPU."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_initialized():
        return []
    description = "GPU memory of this model's process, torch's caching allocator (bytes)"
    return [
        ("katz_gpu_memory_bytes", description, {"kind": "allocated"}, float(torch.cuda.memory_allocated(device))),
        ("katz_gpu_memory_bytes", description, {"kind": "reserved"}, float(torch.cuda.memory_reserved(device))),
    ]


def create_model(role: str, params: dict[str, str], device: str, call=None):
    """Build the model class for ``role`` (the ``role`` parameter of its config.pbtxt)."""
    from katz.deployment import Deployment

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
        from katz.serving.unet import UNet

        return UNet(deployment, call)
    elif role == "controlnet":
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
