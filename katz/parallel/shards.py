"""Latent parallelism: one step's UNet evaluation split over several UNet shards, run concurrently.

Each shard is its own Triton model (``unet``, ``unet_1``, ...; one per GPU). A step's batch of
rows (the two CFG halves, or one) is cut into jobs: one per row when there are as many shards
as rows, else each row into overlapping latent bands (:mod:`katz.parallel.tiling`) whose noise
predictions are blended back into one. A job carries its row of every input and, for a band, its
crop of the latent, of each ControlNet residual and of the control images.

The shards must run a step on the same weights: the loop decides when a request's LoRAs go in
for all of them (:class:`katz.lora.bal.RequestLoras` with ``sharded=True``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from katz.parallel.tiling import Tile, blend, plan_tiles

UNET_OUTPUTS = ["noise_pred", "lora_applied", "lora_ready"]


def unet_model_names(shards: int) -> list[str]:
    """The Triton models holding the UNet shards: ``unet``, ``unet_1``, ..."""
    return ["unet"] + [f"unet_{i}" for i in range(1, shards)]


def shard_inputs(tensors: dict, row: int, tile: Tile | None) -> dict:
    """One shard's job: row ``row`` of every input and, for a band, its crop of the latent,
    of each ControlNet residual (at that residual's scale) and of the control images (pixels).
    Feature-cache keys name the band, so features of the whole control image are not reused
    for a crop. SDXL ``time_ids`` stay the whole image's (docs/techniques.md, "Latent parallelism")."""
    part = {k: v[row : row + 1] for k, v in tensors.items()}
    if tile is None:
        return part
    for k, v in part.items():
        if k in ("sample", "mid_residual", "control_images") or k.startswith("down_residual_"):
            part[k] = tile.crop(v).contiguous()
        elif k == "control_image_keys":
            suffix = f"@{tile.key}".encode()
            part[k] = np.array([[bytes(key) + suffix if bytes(key) else bytes(key) for key in r] for r in v],
                               dtype=object)
    return part


class ShardedUNet:
    """The UNet shards of a deployment, called over BLS (``call(model, inputs, outputs)``)."""

    def __init__(self, call, shards: int, overlap: int, align: int):
        self.call = call
        self.names = unet_model_names(shards)
        self.overlap, self.align = overlap, align
        self.pool = ThreadPoolExecutor(max_workers=max(1, shards), thread_name_prefix="katz-shard")

    def plan(self, rows: int, height: int, width: int) -> list[Tile | None]:
        """The bands each batch row is cut into: ``[None]`` (the whole row on one shard) unless
        there are more shards than rows; then up to ``shards // rows`` bands."""
        if len(self.names) <= rows:
            return [None]
        tiles = plan_tiles(height, width, len(self.names) // rows, self.overlap, self.align)
        return tiles if len(tiles) > 1 else [None]

    def splits(self, rows: int, tiles: list[Tile | None]) -> bool:
        """Whether a step of ``rows`` rows cut into ``tiles`` runs on several shards."""
        return len(self.names) > 1 and rows * len(tiles) > 1

    def run(self, tensors: dict, rows: int, tiles: list[Tile | None]) -> list[dict]:
        """One job per row and band, each on its own shard, concurrently; their outputs in job order."""
        jobs = [shard_inputs(tensors, r, t) for r in range(rows) for t in tiles]
        return list(self.pool.map(lambda job: self.call(job[0], job[1], UNET_OUTPUTS), zip(self.names, jobs)))

    @staticmethod
    def join(preds: list[torch.Tensor], rows: int, tiles: list[Tile | None]) -> torch.Tensor:
        """The jobs' noise predictions as one batch: bands blended per row, rows concatenated."""
        if tiles != [None]:
            preds = [blend(preds[r * len(tiles) : (r + 1) * len(tiles)], tiles) for r in range(rows)]
        return torch.cat(preds)
