"""The PyTorch ControlNet engine: the registered ControlNets behind one call, loaded on demand into a
bounded model cache, their conditioning features cached by image (:mod:`katz.controlnet.cache`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from katz.controlnet.cache import FeatureCache
from katz.engines.torch.cuda_graphs import Acceleration, CudaGraphs, process_pool
from katz.models.folder import ModelFolder
from katz.models.unet import unet_example_inputs


class _CachedCondEmbedding(torch.nn.Module):
    """Wraps a ControlNet's ``controlnet_cond_embedding``: the features of a control image
    are computed once (on one row of the CFG batch) and reused while the cache holds them.

    Under a CUDA graph the features come in as a graph input instead (``graph_input``): they
    are computed (or taken from the cache) eagerly, outside the graph, by :meth:`features`.
    """

    def __init__(self, inner: torch.nn.Module, cache: "FeatureCache", net_name: str):
        super().__init__()
        self.inner, self.cache, self.net_name = inner, cache, net_name
        self.key: str | None = None  # set by ControlNetEngine before each forward
        self.graph_input: torch.Tensor | None = None  # set while a graph of the net is captured

    def features(self, cond: torch.Tensor) -> torch.Tensor:
        """``cond [B, 3, H, W]`` -> features ``[B, C, h, w]`` (computed once per image while cached)."""
        if self.key is None:
            return self.inner(cond)
        key = (self.net_name, self.key, tuple(cond.shape[1:]), cond.dtype, cond.device)
        feats = self.cache.get(key)
        if feats is None:
            feats = self.inner(cond[:1])
            self.cache.put(key, feats)
        return feats.expand(cond.shape[0], *feats.shape[1:])

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if self.graph_input is not None:
            return self.graph_input
        return self.features(cond)


class ControlNetEngine:
    """The registered ControlNets of a deployment, by name.

    ``resident`` nets are loaded at start and never evicted; the others are
    loaded on first use into an LRU bounded by ``cache_bytes``. Control-image
    features are cached across requests (:class:`FeatureCache`).
    """

    def __init__(
        self,
        folder: ModelFolder,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        resident: Sequence[str] | None = None,
        cache_bytes: int = 8 << 30,
        feature_cache_bytes: int = 1 << 30,
        accel: Acceleration | None = None,
    ):
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.accel = accel if accel is not None and accel.active(self.device) else None
        self._pool, self._pool_lock = process_pool(self.device) if self.accel is not None else (None, None)
        self._graphs: dict[str, CudaGraphs] = {}
        self.warmup_s = 0.0  # graph capture (and compilation) at load
        self.names = set(folder.controlnets)
        self.resident = set(folder.controlnets if resident is None else resident) & self.names
        self.cache_bytes = cache_bytes
        self.features = FeatureCache(feature_cache_bytes)
        self.nets: "OrderedDict[str, torch.nn.Module]" = OrderedDict()
        self.loads = 0
        # one evaluation at a time, like one Triton instance (the feature-cache key lives on the net)
        self._lock = threading.Lock()
        for name in sorted(self.resident):
            self._load(name)


    @property
    def graphs(self) -> Mapping[str, object]:
        """The per-part callables the engine runs (:class:`CudaGraphs` where graphs are on), by part."""
        return MappingProxyType(self._graphs)

    @staticmethod
    def model_bytes(net) -> int:
        """Bytes of a ControlNet's parameters (what the model cache counts)."""
        return sum(p.numel() * p.element_size() for p in net.parameters())

    def _load(self, name: str):
        net = self.folder.load_controlnet(name, self.device, self.dtype)
        net.controlnet_cond_embedding = _CachedCondEmbedding(net.controlnet_cond_embedding, self.features, name)
        if self.accel is not None:
            self.accel.quantize(net, self.device)
        if self.accel is not None and self.accel.channels_last:
            net.to(memory_format=torch.channels_last)
        self.nets[name] = net
        self.loads += 1
        if self.accel is not None and name in self.resident:  # nets loaded on demand run eagerly
            eager = functools.partial(self.graph_body, net)
            fn = self.accel.compiled(eager)
            self._graphs[name] = (CudaGraphs(fn, f"controlnet.{name}", self._pool, self._pool_lock, eager=eager)
                                  if self.accel.cuda_graphs else fn)
        evictable = [n for n in self.nets if n not in self.resident and n != name]
        while evictable and sum(self.model_bytes(n_) for n_ in self.nets.values()) > self.cache_bytes:
            self.nets.pop(evictable.pop(0))
        return net

    @staticmethod
    def graph_body(net, sample, timestep, encoder_hidden_states, added_cond, features):
        """The net's forward at conditioning scale 1 with the image features as an input."""
        net.controlnet_cond_embedding.graph_input = features
        try:
            down, mid = net(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=features,
                conditioning_scale=1.0, added_cond_kwargs=added_cond, return_dict=False,
            )
        finally:
            net.controlnet_cond_embedding.graph_input = None
        return list(down), mid

    def warm_up(self, sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (2,),
                compile_batches: Sequence[int] | None = None) -> float:
        """Capture (and compile) every resident ControlNet for each ``(height, width)`` in pixels
        and batch size; ``compile_batches`` as :meth:`UNetEngine.warm_up`. Returns the seconds taken."""
        if self.accel is None:
            return 0.0
        start = time.perf_counter()
        for name, fn in self._graphs.items():
            emb = self.nets[name].controlnet_cond_embedding
            for height, width in sizes:
                for batch in batches:
                    x = unet_example_inputs(self.folder, batch, height, width, self.device, self.dtype)
                    cond = torch.rand(batch, 3, height, width, device=self.device, dtype=self.dtype)
                    with torch.no_grad():
                        feats = emb.inner(cond)
                    args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"], feats)
                    if isinstance(fn, CudaGraphs):
                        fn.capture(*args, compiled=compile_batches is None or batch in compile_batches)
                    else:
                        with torch.no_grad():
                            fn(*args)
        self.warmup_s += time.perf_counter() - start
        return time.perf_counter() - start

    def get(self, name: str):
        net = self.nets.get(name)
        if net is None:
            net = self._load(name)
        self.nets.move_to_end(name)
        return net

    @torch.no_grad()
    def __call__(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        cond_image: torch.Tensor,
        scale: float,
        cond_key: str | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``cond_image [B, 3, H, W]`` in ``[0, 1]`` -> (down residuals, mid residual), already scaled.

        ``cond_key`` (a content hash of the control image) lets the image's
        features come from the feature cache.
        """
        with self._lock:
            return self._run(name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale, cond_key)

    def _run(self, name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale, cond_key):
        net = self.get(name)
        net.controlnet_cond_embedding.key = cond_key
        graph = self._graphs.get(name)
        if graph is not None:
            try:
                feats = net.controlnet_cond_embedding.features(cond_image)
            finally:
                net.controlnet_cond_embedding.key = None
            # the graph's outputs are its own buffers: scaling makes the caller's copies
            # (diffusers multiplies by the scale too: x * 1.0 * s == x * s exactly)
            down, mid = graph(sample, timestep.reshape(-1).to(sample.device, torch.float32).expand(sample.shape[0]),
                              encoder_hidden_states, added_cond, feats.contiguous())
            return ([(d * scale).contiguous() for d in down], (mid * scale).contiguous())
        try:
            down, mid = net(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=cond_image,
                conditioning_scale=scale,
                added_cond_kwargs=added_cond,
                return_dict=False,
            )
        finally:
            net.controlnet_cond_embedding.key = None
        return list(down), mid
