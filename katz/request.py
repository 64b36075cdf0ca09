"""The request schema of the ``katz`` ensemble and its validation.

Every field is checked here, before any compute; a bad field raises
:class:`InvalidArgument` whose message starts with the field's name. The Triton
glue turns that into an ``INVALID_ARG`` error.

=====================  =========  ========  ==============================================
tensor                 type       shape     meaning
=====================  =========  ========  ==============================================
prompt                 BYTES      [1]       required, UTF-8
negative_prompt        BYTES      [1]       optional; SDXL: absent -> zero embeddings; not for FLUX
seed                   INT64      [1]       optional, 0 <= seed < 2**63; absent -> random
steps                  INT32      [1]       optional, 1..max_steps
guidance_scale         FP32       [1]       optional, 0..max_guidance; <= 1 turns CFG off
                                            (FLUX dev: the guidance input; schnell: not taken)
width, height          INT32      [1]       optional, multiples of 8 (FLUX: 16), min..max (min: see Limits)
scheduler              BYTES      [1]       optional, see :mod:`katz.diffusion.schedulers`; not for FLUX
controlnets            BYTES      [n]       ControlNet names
control_images         BYTES      [n]       PNG/JPEG bytes, one per ControlNet
controlnet_scales      FP32       [n]       optional, default 1.0 each
control_guidance_start FP32       [n]       optional, fraction of the steps where each starts (default 0)
control_guidance_end   FP32       [n]       optional, fraction where each stops (default 1)
loras                  BYTES      [m]       LoRA names (file stems in the LoRA store)
lora_scales            FP32       [m]       optional, default 1.0 each
lora_k                 INT32      [1]       optional; LoRAs are patched in by this step at the latest
                                            (0 = before the first step); default per deployment
=====================  =========  ========  ==============================================

A field that does not apply to the served model's family (:func:`inapplicable_fields`) is refused
naming it, rather than ignored.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from katz.diffusion.schedulers import scheduler_names
from katz.errors import InvalidArgument

INPUT_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "scheduler",
    "controlnets",
    "control_images",
    "controlnet_scales",
    "control_guidance_start",
    "control_guidance_end",
    "loras",
    "lora_scales",
    "lora_k",
)

_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class Limits:
    """Server-side bounds and defaults for requests (set per deployment)."""

    max_steps: int = 150
    # the smallest size the models run (katz.models.folder.min_image_size); a deployment raises it to its folder's
    min_width: int = 8
    min_height: int = 8
    max_width: int = 2048
    max_height: int = 2048
    max_prompt_bytes: int = 4096
    max_guidance: float = 50.0
    max_controlnet_scale: float = 10.0
    max_lora_scale: float = 10.0
    max_controlnets: int = 4
    max_loras: int = 8
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    default_steps: int = 30
    default_guidance: float = 5.0
    default_width: int = 1024
    default_height: int = 1024
    default_scheduler: str = "default"
    # BAL's bound when a request sends none: 0, the LoRA in from the first step, since later bounds kept
    # well under 90 % of a LoRA's effect wherever that was measured (docs/techniques.md, "Choosing k")
    default_lora_k: int = 0
    # widths and heights are multiples of this (FLUX: 16, whole 2x2 patches of latent pixels)
    size_multiple: int = 8
    # ((field, why it does not apply), ...): fields the served model's family refuses (inapplicable_fields)
    refused_fields: tuple[tuple[str, str], ...] = ()


def inapplicable_fields(family: str, guidance_input: bool) -> tuple[tuple[str, str], ...]:
    """The request fields a model of ``family`` cannot honour, each with the reason a client is told.
    FLUX.1 runs one transformer evaluation a step on its flow-match schedule: no negative prompt (no
    classifier-free guidance) and no other scheduler; schnell (``guidance_input`` False) also takes no
    guidance scale."""
    if family != "flux":
        return ()
    out = [("negative_prompt", "does not apply to FLUX models (no classifier-free guidance); leave it out"),
           ("scheduler", "does not apply to FLUX models (they run their flow-match Euler schedule); leave it out")]
    if not guidance_input:
        out.append(("guidance_scale", "does not apply to this FLUX model (schnell: no guidance input); leave it out"))
    return tuple(out)


@dataclass
class GenerationRequest:
    """A validated request; control images are still encoded bytes."""

    prompt: str
    negative_prompt: str | None
    scheduler: str
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    controlnets: list[str] = field(default_factory=list)
    control_images: list[bytes] = field(default_factory=list)
    controlnet_scales: list[float] = field(default_factory=list)
    control_guidance_start: list[float] = field(default_factory=list)
    control_guidance_end: list[float] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    lora_scales: list[float] = field(default_factory=list)
    lora_k: int = 0

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs when ``guidance_scale > 1`` (diffusers' rule)."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class RequestParams:
    """The normalized request as every model after ``preprocessing`` reads it (text encoder, loop,
    UNet, PNG encoder). It travels between them as one JSON BYTES element, ``params``."""

    scheduler: str
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    controlnets: list[str]
    controlnet_scales: list[float]
    loras: list[str]
    lora_scales: list[float]
    control_guidance_start: list[float] = field(default_factory=list)  # empty: 0 for each ControlNet
    control_guidance_end: list[float] = field(default_factory=list)  # empty: 1 for each ControlNet
    # content hashes of the control images at this size: keys of the ControlNets' feature cache
    control_image_keys: list[str] = field(default_factory=list)
    lora_k: int = 0  # BAL bound (katz.lora.bal)
    zero_negative: bool = False  # SDXL without a negative prompt: zero negative embeddings

    def to_tensor(self) -> np.ndarray:
        return np.array([json.dumps(asdict(self)).encode()], dtype=object)

    @classmethod
    def from_tensor(cls, value, name: str = "params") -> "RequestParams":
        """From the BYTES tensor ``name`` (``[1]`` or ``[1, 1]``); :class:`InvalidArgument` naming it if
        it is not the JSON :meth:`to_tensor` writes."""
        data = params_json(value, name)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise InvalidArgument(name, f"lacks {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @property
    def lora_set(self) -> tuple[tuple[str, float], ...]:
        """The request's LoRAs as ``((name, scale), ...)`` (:data:`katz.lora.bal.LoraSet`)."""
        return tuple((n, float(s)) for n, s in zip(self.loras, self.lora_scales))


def params_json(value, name: str = "params") -> dict:
    """The JSON object in the BYTES tensor ``name`` (see :class:`RequestParams`)."""
    try:
        data = json.loads(bytes(value.reshape(-1)[0]).decode())
    except (ValueError, IndexError) as exc:
        raise InvalidArgument(name, f"not the preprocessing params JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgument(name, "not the preprocessing params JSON (not an object)")
    return data


def read_params(inputs: dict) -> RequestParams:
    """The request's :class:`RequestParams` from a model's ``params`` input."""
    return RequestParams.from_tensor(inputs["params"])


# ----------------------------------------------------------------- helpers
def _scalar(inputs: dict, name: str, kind: type):
    value = inputs.get(name)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        raise InvalidArgument(name, f"expected one value, got shape {list(arr.shape)}")
    item = arr.reshape(-1)[0]
    if kind is str:
        return _text(name, item)
    if kind is int:
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidArgument(name, f"expected an integer, got {arr.dtype}")
        return int(item)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgument(name, f"expected a number, got {arr.dtype}")
    return _decimal(item)


def _decimal(value) -> float:
    """An FP32 wire value as the decimal the client wrote (0.6f -> 0.6, not 0.6000000238),
    so step windows and scales compare as they do in diffusers with Python floats."""
    if isinstance(value, np.float32):
        return float(repr(value).removeprefix("np.float32(").removesuffix(")"))
    return float(value)


def _text(name: str, item) -> str:
    if isinstance(item, (bytes, np.bytes_)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(name, "is not valid UTF-8") from None
    if isinstance(item, str):
        return item
    raise InvalidArgument(name, f"expected BYTES, got {type(item).__name__}")


def _list(inputs: dict, name: str) -> list | None:
    value = inputs.get(name)
    if value is None:
        return None
    return np.asarray(value).reshape(-1).tolist()


def _floats(inputs: dict, name: str, count: int, limit: float, low: float, default: float = 1.0) -> list[float]:
    if inputs.get(name) is None:
        return [default] * count
    values = list(np.asarray(inputs[name]).reshape(-1))  # numpy scalars: float32 stays float32
    if len(values) != count:
        raise InvalidArgument(name, f"has {len(values)} values but {count} were expected (one per name)")
    out = []
    for v in values:
        f = _decimal(v)
        if not math.isfinite(f):
            raise InvalidArgument(name, f"value {f} is not finite")
        if not low <= f <= limit:
            raise InvalidArgument(name, f"value {f} is outside [{low}, {limit}]")
        out.append(f)
    return out


def check_lora_name(name: str) -> None:
    """LoRA names are plain file stems: no path separators, no ``..``."""
    if not _LORA_NAME.match(name) or ".." in name:
        raise InvalidArgument("loras", f"invalid LoRA name {name!r} (letters, digits, '_', '-', '.'; no paths)")


# ------------------------------------------------------------------- parse
def parse_request(
    inputs: dict,
    limits: Limits,
    controlnet_names: set[str] | frozenset[str],
    lora_exists,
) -> GenerationRequest:
    """Validate raw request tensors (name -> numpy array, absent fields missing or None).

    ``lora_exists(name) -> bool`` asks the LoRA store whether a name is known.
    """
    unknown = set(k for k, v in inputs.items() if v is not None) - set(INPUT_FIELDS)
    if unknown:
        raise InvalidArgument(sorted(unknown)[0], "is not a known input")
    for name, reason in limits.refused_fields:
        if inputs.get(name) is not None:
            raise InvalidArgument(name, reason)

    prompt = _scalar(inputs, "prompt", str)
    if prompt is None:
        raise InvalidArgument("prompt", "is required")
    if len(prompt.encode()) > limits.max_prompt_bytes:
        raise InvalidArgument("prompt", f"is longer than {limits.max_prompt_bytes} bytes")
    negative = _scalar(inputs, "negative_prompt", str)
    if negative is not None and len(negative.encode()) > limits.max_prompt_bytes:
        raise InvalidArgument("negative_prompt", f"is longer than {limits.max_prompt_bytes} bytes")

    seed = _scalar(inputs, "seed", int)
    if seed is None:
        seed = secrets.randbelow(2**63)
    elif not 0 <= seed < 2**63:
        raise InvalidArgument("seed", f"{seed} is outside [0, 2**63)")

    steps = _scalar(inputs, "steps", int)
    steps = limits.default_steps if steps is None else steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument("steps", f"{steps} is outside [1, {limits.max_steps}]")

    guidance = _scalar(inputs, "guidance_scale", float)
    guidance = limits.default_guidance if guidance is None else guidance
    if not math.isfinite(guidance) or not 0.0 <= guidance <= limits.max_guidance:
        raise InvalidArgument("guidance_scale", f"{guidance} is outside [0, {limits.max_guidance}]")

    sizes = {}
    for name, default, low, top in (
        ("width", limits.default_width, limits.min_width, limits.max_width),
        ("height", limits.default_height, limits.min_height, limits.max_height),
    ):
        v = _scalar(inputs, name, int)
        v = default if v is None else v
        step = max(limits.size_multiple, 8)
        if v < step or v % step:
            raise InvalidArgument(name, f"{v} is not a positive multiple of {step}")
        if v < low:
            raise InvalidArgument(name, f"{v} is below the minimum {low} (the smallest size this server's models run)")
        if v > top:
            raise InvalidArgument(name, f"{v} is above the maximum {top}")
        sizes[name] = v

    scheduler = _scalar(inputs, "scheduler", str)
    scheduler = limits.default_scheduler if scheduler is None else scheduler
    if scheduler not in scheduler_names():
        raise InvalidArgument("scheduler", f"unknown scheduler {scheduler!r}; known: {', '.join(scheduler_names())}")

    # ControlNets ------------------------------------------------------------
    cn_names = [_text("controlnets", v) for v in (_list(inputs, "controlnets") or [])]
    images = _list(inputs, "control_images") or []
    if len(cn_names) > limits.max_controlnets:
        raise InvalidArgument("controlnets", f"at most {limits.max_controlnets} per request")
    for n in cn_names:
        if n not in controlnet_names:
            known = ", ".join(sorted(controlnet_names)) or "none"
            raise InvalidArgument("controlnets", f"unknown ControlNet {n!r}; known: {known}")
    if len(images) != len(cn_names):
        raise InvalidArgument(
            "control_images", f"has {len(images)} images but {len(cn_names)} ControlNets were named"
        )
    image_bytes = []
    for img in images:
        if not isinstance(img, (bytes, np.bytes_)):
            raise InvalidArgument("control_images", "expected BYTES (PNG/JPEG file contents)")
        if len(img) > limits.max_image_bytes:
            raise InvalidArgument("control_images", f"image is larger than {limits.max_image_bytes} bytes")
        image_bytes.append(bytes(img))
    cn_scales = _floats(inputs, "controlnet_scales", len(cn_names), limits.max_controlnet_scale, 0.0)
    starts = _floats(inputs, "control_guidance_start", len(cn_names), 1.0, 0.0, default=0.0)
    ends = _floats(inputs, "control_guidance_end", len(cn_names), 1.0, 0.0, default=1.0)
    for s_, e_ in zip(starts, ends):
        if s_ > e_:
            raise InvalidArgument("control_guidance_start", f"start {s_} is after end {e_}")

    # LoRAs ------------------------------------------------------------------
    loras = [_text("loras", v) for v in (_list(inputs, "loras") or [])]
    if len(loras) > limits.max_loras:
        raise InvalidArgument("loras", f"at most {limits.max_loras} per request")
    if len(set(loras)) != len(loras):
        raise InvalidArgument("loras", "names a LoRA twice")
    for n in loras:
        check_lora_name(n)
        if not lora_exists(n):
            raise InvalidArgument("loras", f"unknown LoRA {n!r}")
    lora_scales = _floats(inputs, "lora_scales", len(loras), limits.max_lora_scale, -limits.max_lora_scale)
    lora_k = _scalar(inputs, "lora_k", int)
    lora_k = min(limits.default_lora_k, steps - 1) if lora_k is None else lora_k
    if not 0 <= lora_k < steps:
        raise InvalidArgument("lora_k", f"{lora_k} is outside [0, steps - 1 = {steps - 1}]")

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        width=sizes["width"],
        height=sizes["height"],
        scheduler=scheduler,
        controlnets=cn_names,
        control_images=image_bytes,
        controlnet_scales=cn_scales,
        control_guidance_start=starts,
        control_guidance_end=ends,
        loras=loras,
        lora_scales=lora_scales,
        lora_k=lora_k,
    )
