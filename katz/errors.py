"""Katz's error types and how each reaches the client.

A request's fault (a bad field, a bad LoRA) is an ``INVALID_ARG`` naming what is wrong; a dependency
that is down or out of memory is ``UNAVAILABLE`` (try again later); anything else is ``INTERNAL``.
The Triton glue (``backends/python_katz/model.py``) maps them with :func:`error_kind`.
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A request field is missing or out of range; ``field`` names it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field


class LoraError(ValueError):
    """Bad LoRA file/request; ``str(e)`` names the LoRA and says why."""


def lora_error(name: str, msg: str) -> LoraError:
    """A :class:`LoraError` for the LoRA ``name``."""
    return LoraError(f"lora {name!r}: {msg}")


class RequestGone(RuntimeError):
    """The request's client went away (a cancelled stream) while a model still worked on it: the
    work stops; not a fault of the request or of the server (nothing is logged for it)."""


class ExportError(RuntimeError):
    """An export or an export folder is unusable; the message says why."""


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


def error_kind(exc: BaseException) -> str:
    """``"invalid_arg"`` for errors caused by the request, ``"unavailable"`` for a dependency
    that is down or overloaded, ``"gone"`` for work stopped because its client went away, else
    ``"internal"``."""
    if isinstance(exc, ModelCallError):
        return exc.kind
    if isinstance(exc, RequestGone):
        return "gone"
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
