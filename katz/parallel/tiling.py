"""Spatial sharding of a latent: overlapping bands, one per UNet shard, and their blend.

A latent ``[B, C, h, w]`` is cut along its longer side into bands that overlap
by at least ``overlap`` latent pixels; each band runs through the UNet on its
own shard, and the noise predictions are blended in the overlaps with linear
ramps: across the overlap of two neighbours one band's weight falls from 1 to
0 while the other's rises, so at every latent position the weights sum to 1.

Band offsets and sizes are multiples of the UNet's downsampling factor
``align`` (``2 ** (down blocks - 1)``), so each level of a band's UNet sees
the same grid as the full latent's (skip connections line up) and ControlNet
residuals crop exactly at each of their scales.

The UNet's self-attention is global and a band does not see the rest of the
image, so the blend approximates the unsharded prediction; it is not equal to
it (docs/techniques.md, "Latent parallelism": the measured distance).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """One band of a latent: ``[start, start + size)`` along ``axis`` of a ``[B, C, h, w]`` tensor."""

    axis: int  # 2: rows (bands stacked top to bottom), 3: columns (left to right)
    start: int  # latent pixels
    size: int
    length: int  # the whole latent's extent along the axis

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def key(self) -> str:
        """Names the band, e.g. ``h24+40/64``: rows 24..63 of 64 (feature-cache keys of crops)."""
        return f"{'hw'[self.axis - 2]}{self.start}+{self.size}/{self.length}"

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """This band of ``x``: the latent, a ControlNet residual (a coarser scale) or a control
        image (pixels); the band's extent is scaled from the latent's length to ``x``'s."""
        n = x.shape[self.axis]
        if (self.start * n) % self.length or (self.size * n) % self.length:
            raise ValueError(f"band {self.key} does not fall on whole elements of a side of {n}")
        return x.narrow(self.axis, self.start * n // self.length, self.size * n // self.length)


def _band_starts(length: int, count: int, overlap: int, align: int) -> tuple[list[int], int] | None:
    """``count`` bands of one aligned size covering ``length`` with overlaps >= ``overlap``
    (aligned), or None when they would not be smaller than the latent or a position would lie
    in three bands."""
    size = align * math.ceil((length + (count - 1) * overlap) / (count * align))
    if size >= length:
        return None
    units, gaps = (length - size) // align, count - 1
    strides = [align * (units // gaps + (i < units % gaps)) for i in range(gaps)]
    if min(strides) == 0 or any(a + b < size for a, b in zip(strides, strides[1:])):
        return None
    return [0, *itertools.accumulate(strides)], size


def plan_tiles(height: int, width: int, count: int, overlap: int, align: int) -> list[Tile]:
    """Up to ``count`` bands along the longer side of an ``height x width`` latent.

    ``overlap`` (latent pixels) is rounded up to a multiple of ``align``. Fewer bands come back
    where the latent is too small for ``count`` of them, one band (the whole latent) where it is
    too small to split or its longer side is not a multiple of ``align``.
    """
    if count < 1:
        raise ValueError(f"tile count must be >= 1, not {count}")
    if overlap < 0:
        raise ValueError(f"tile overlap must be >= 0 latent pixels, not {overlap}")
    if align < 1:
        raise ValueError(f"alignment must be >= 1, not {align}")
    axis, length = (2, height) if height >= width else (3, width)
    overlap = align * math.ceil(overlap / align)
    if length % align == 0:
        for n in range(count, 1, -1):
            plan = _band_starts(length, n, overlap, align)
            if plan is not None:
                starts, size = plan
                return [Tile(axis, s, size, length) for s in starts]
    return [Tile(axis, 0, length, length)]


def blend_weights(tiles: list[Tile]) -> list[torch.Tensor]:
    """Per band, float32 ``[size]``: the weight of each of its positions along the axis.

    1 inside a band, a linear ramp across each overlap with a neighbour (0 towards the
    neighbour's side); normalised so the weights of the bands covering a position sum to 1.
    """
    raw = []
    for i, t in enumerate(tiles):
        x = torch.arange(t.start, t.end, dtype=torch.float64) + 0.5
        w = torch.ones(t.size, dtype=torch.float64)
        if i > 0 and tiles[i - 1].end > t.start:
            w = torch.minimum(w, (x - t.start) / (tiles[i - 1].end - t.start))
        if i + 1 < len(tiles) and tiles[i + 1].start < t.end:
            w = torch.minimum(w, (t.end - x) / (t.end - tiles[i + 1].start))
        raw.append(w)
    total = torch.zeros(tiles[0].length, dtype=torch.float64)
    for t, w in zip(tiles, raw):
        total[t.start : t.end] += w
    if bool((total <= 0).any()):
        raise ValueError("the bands do not cover the latent")
    return [(w / total[t.start : t.end]).float() for t, w in zip(tiles, raw)]


@functools.lru_cache(maxsize=32)
def _weights_on(tiles: tuple[Tile, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`blend_weights` on ``device``, shaped to broadcast over ``[B, C, h, w]`` bands; computed
    once per band layout and device (a request's bands are the same at every step)."""
    out = []
    for t, w in zip(tiles, blend_weights(list(tiles))):
        view = [1, 1, 1, 1]
        view[t.axis] = t.size
        out.append(w.to(device).view(view))
    return tuple(out)


def blend(preds: list[torch.Tensor], tiles: list[Tile]) -> torch.Tensor:
    """The bands' predictions ``[B, C, ., .]`` -> one over the whole latent: ``sum w_i * eps_i``
    (weights from :func:`blend_weights`, accumulated in float32, returned in the inputs' dtype)."""
    axis, length = tiles[0].axis, tiles[0].length
    shape = list(preds[0].shape)
    shape[axis] = length
    out = torch.zeros(shape, dtype=torch.float32, device=preds[0].device)
    for pred, t, w in zip(preds, tiles, _weights_on(tuple(tiles), preds[0].device)):
        out.narrow(axis, t.start, t.size).add_(pred.float() * w)
    return out.to(preds[0].dtype)
