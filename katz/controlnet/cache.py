"""The conditioning-feature cache of the ControlNets: a control image's features, computed once per
image and size, reused by every step and request that sends the same image."""

from __future__ import annotations

from collections import OrderedDict

import torch


class FeatureCache:
    """LRU of ControlNet conditioning features by (net, image content hash, shape), bytes-bounded."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        t = self.items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.budget:
            return
        self.items[key] = t
        self.used += size
        while self.used > self.budget:
            _, old = self.items.popitem(last=False)
            self.used -= old.numel() * old.element_size()
