"""Send a generation request to the ``katz`` ensemble with tritonclient (HTTP or gRPC)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import numpy as np

MODEL = "katz"


@dataclass
class Generation:
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    controlnets: list[str] = field(default_factory=list)
    control_images: list[bytes] = field(default_factory=list)
    controlnet_scales: list[float] | None = None
    control_guidance_start: list[float] | None = None
    control_guidance_end: list[float] | None = None
    loras: list[str] = field(default_factory=list)
    lora_scales: list[float] | None = None
    lora_k: int | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """The request as named numpy arrays, only the fields that are set."""
        t: dict[str, np.ndarray] = {"prompt": np.array([self.prompt.encode()], dtype=object)}
        if self.negative_prompt is not None:
            t["negative_prompt"] = np.array([self.negative_prompt.encode()], dtype=object)
        for name, value, dtype in (
            ("seed", self.seed, np.int64),
            ("steps", self.steps, np.int32),
            ("guidance_scale", self.guidance_scale, np.float32),
            ("width", self.width, np.int32),
            ("height", self.height, np.int32),
            ("lora_k", self.lora_k, np.int32),
        ):
            if value is not None:
                t[name] = np.array([value], dtype=dtype)
        if self.scheduler is not None:
            t["scheduler"] = np.array([self.scheduler.encode()], dtype=object)
        if self.controlnets:
            t["controlnets"] = np.array([n.encode() for n in self.controlnets], dtype=object)
            t["control_images"] = np.array(list(self.control_images), dtype=object)
        if self.controlnet_scales is not None:
            t["controlnet_scales"] = np.array(self.controlnet_scales, dtype=np.float32)
        for name in ("control_guidance_start", "control_guidance_end"):
            if getattr(self, name) is not None:
                t[name] = np.array(getattr(self, name), dtype=np.float32)
        if self.loras:
            t["loras"] = np.array([n.encode() for n in self.loras], dtype=object)
        if self.lora_scales is not None:
            t["lora_scales"] = np.array(self.lora_scales, dtype=np.float32)
        return t


@dataclass
class Result:
    image: np.ndarray  # uint8 [H, W, 3]
    png: bytes
    seed: int
    lora_applied_step: int = -1  # BAL: the step from which the LoRAs were patched in


def _datatype(arr: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(arr.dtype)


def make_client(url: str, protocol: str = "http", timeout: float = 600.0):
    if protocol == "http":
        import tritonclient.http as http

        return http.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    if protocol == "grpc":
        import tritonclient.grpc as grpc

        return grpc.InferenceServerClient(url)
    raise ValueError(f"protocol must be http or grpc, not {protocol!r}")


def infer(client, request: Generation, protocol: str = "http", timeout: float = 600.0, png: bool = True) -> Result:
    """Run one generation; raises ``tritonclient.utils.InferenceServerException`` on errors.

    ``png`` False: request the pixels only; the server skips the PNG encode (``Result.png`` is empty)."""
    if protocol == "http":
        import tritonclient.http as mod
    else:
        import tritonclient.grpc as mod
    if request.seed is None:
        # The ensemble's `seed` output echoes the `seed` input (Triton ensembles share one
        # tensor namespace), so the client picks the random seed and gets it back.
        request = replace(request, seed=secrets.randbelow(2**63))
    inputs = []
    for name, arr in request.tensors().items():
        inp = mod.InferInput(name, list(arr.shape), _datatype(arr))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    names = ("image", "png", "seed", "lora_applied_step") if png else ("image", "seed", "lora_applied_step")
    outputs = [mod.InferRequestedOutput(n) for n in names]
    kwargs = {"client_timeout": timeout} if protocol == "grpc" else {}
    res = client.infer(MODEL, inputs, outputs=outputs, **kwargs)
    return Result(
        image=res.as_numpy("image"),
        png=bytes(res.as_numpy("png").reshape(-1)[0]) if png else b"",
        seed=int(res.as_numpy("seed").reshape(-1)[0]),
        lora_applied_step=int(res.as_numpy("lora_applied_step").reshape(-1)[0]),
    )
