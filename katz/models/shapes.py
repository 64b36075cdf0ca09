"""Tensor shapes shared by the engines and the exported graphs: batch and size ranges, tensor specs.

Runtime code (the TensorRT engines, :mod:`katz.models.unet`) and build-time code (:mod:`katz.export`)
describe the same tensors with these, so an engine and the graph it was built from agree by construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

TEXT_LEN = 77  # CLIP's model_max_length; prompts are always padded to it (katz.diffusion.text_encoding.tokenize)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# --------------------------------------------------------------------------- #
# Shape ranges
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ShapeRanges:
    """Batch and image-size ranges (pixels, both sides) the graphs and engines are built for.

    ``batch`` counts UNet/ControlNet rows: 2 with classifier-free guidance, 1 without
    (and 1 per GPU when latent parallelism splits the CFG pair). TensorRT
    optimization profiles are built from ``min``/``opt``/``max`` of each.
    """

    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 2
    min_size: int = 256
    opt_size: int = 1024
    max_size: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got {self.batch}")
        if not 8 <= self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"size range must satisfy 8 <= min <= opt <= max, got {self.size}")
        for s in self.size:
            if s % 8:
                raise ValueError(f"sizes must be multiples of 8, got {s}")

    @property
    def batch(self) -> tuple[int, int, int]:
        return (self.min_batch, self.opt_batch, self.max_batch)

    @property
    def size(self) -> tuple[int, int, int]:
        return (self.min_size, self.opt_size, self.max_size)

    @classmethod
    def for_folder(
        cls,
        folder,
        min_size: int | None = None,
        opt_size: int | None = None,
        max_size: int | None = None,
        max_batch: int = 2,
    ) -> "ShapeRanges":
        """Defaults from the model: opt = its native size, min = native / 4, max = native × 2."""
        native = folder.default_size
        opt = opt_size or native
        lo = min_size or max(8, (native // 4) // 8 * 8)
        hi = max_size or native * 2
        lo, hi = min(lo, opt), max(hi, opt)
        return cls(min_batch=1, opt_batch=min(2, max_batch), max_batch=max_batch,
                   min_size=lo, opt_size=opt, max_size=hi)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ShapeRanges":
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})

    def missing_from(self, other: "ShapeRanges") -> list[str]:
        """What of ``self`` lies outside ``other`` (empty when ``other`` covers it)."""
        out = []
        if self.min_batch < other.min_batch or self.max_batch > other.max_batch:
            out.append(f"batch {self.min_batch}..{self.max_batch} (engine: {other.min_batch}..{other.max_batch})")
        if self.min_size < other.min_size or self.max_size > other.max_size:
            out.append(f"size {self.min_size}..{self.max_size} px (engine: {other.min_size}..{other.max_size} px)")
        return out


def down_sizes(size: int, times: int) -> list[int]:
    """``size`` after 0..times stride-2 convs (3x3, padding 1): each halves, rounding up."""
    out = [size]
    for _ in range(times):
        out.append(math.ceil(out[-1] / 2))
    return out


# --------------------------------------------------------------------------- #
# Graph specs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``dtype``: "float" (the export's dtype), "float32" or "int64".
    ``dims``: ints are fixed, strings are dynamic axes (their ONNX dim_param)."""

    name: str
    dtype: str
    dims: tuple

    def onnx_dtype(self, float_dtype: str) -> str:
        return float_dtype if self.dtype == "float" else self.dtype


@dataclass
class Shape:
    """Concrete sizes one set of sample inputs or one profile point is made for."""

    batch: int
    height: int  # pixels
    width: int
