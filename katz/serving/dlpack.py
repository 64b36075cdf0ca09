"""Tensors handed to Triton through DLPack."""

from __future__ import annotations

import torch


def c_order(value):
    """``value`` (a torch tensor) with the C-order strides Triton's DLPack import checks (every dim
    not of size 1). torch calls a tensor with zero elements contiguous whatever its strides (one made
    from an empty numpy array has all strides 0), so ``contiguous()`` alone does not give them."""
    value = value.contiguous()
    expected = 1
    for size, stride in zip(reversed(value.shape), reversed(value.stride())):
        if size != 1 and stride != expected:
            return torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)
        expected *= size
    return value
