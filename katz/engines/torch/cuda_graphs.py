"""CUDA graphs (and optionally ``torch.compile``) for the PyTorch engines.

A diffusion step is launch-bound on a fast GPU: an SDXL UNet step at 1024² issues
thousands of small kernels, and the host cannot launch them as fast as an H100
runs them (eager 77 ms, compiled + one CUDA graph 32 ms on the H100 host).
:class:`CudaGraphs` records a function once per input signature (shapes, dtypes,
devices, and the non-tensor arguments) and replays it: the inputs are copied
into the graph's static buffers, the graph is launched as one unit, and the
graph's static outputs are returned.

Capture happens at model load (:meth:`CudaGraphs.capture`, called by the engines'
``warm_up``), never on a request: a call whose signature was not captured runs
the function eagerly. Weights are read by address, so LoRAs merged in place
(:class:`katz.lora.patch.LoraPatcher` writes into the same storage) are seen by the
graph without a new capture.

The returned outputs are the graph's own buffers, overwritten by the next replay:
a caller that keeps them across calls must clone them (the engines do where the
output leaves the engine).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils import _pytree as pytree


@dataclass
class Acceleration:
    """How the PyTorch engines run on a CUDA device (ignored on the CPU).

    ``cuda_graphs``: replay the per-step work as CUDA graphs captured at load.
    ``compile``: also ``torch.compile`` the UNet and ControlNets (inductor, default mode) before
    capture (minutes per graph); ``compile_vae``: the VAE decoder (on an H200, 22 s at load for
    the 1024² decode, which goes from 85.7 to 36.0 ms: inductor's GroupNorm reductions use the
    whole GPU, where PyTorch's NCHW GroupNorm kernel ran 32 blocks for half of the eager decode).
    Compiled code is cached under ``compile_cache`` (``TORCHINDUCTOR_CACHE_DIR``), so a later
    start reuses it. ``sizes``: image sizes ``(height, width)`` in pixels captured at load
    (None: the model's default size); other sizes run eagerly. ``channels_last``: the UNet's and
    ControlNets' weights in channels-last layout (cuDNN convolutions without layout conversions).
    ``fp8``: the UNet's and ControlNets' transformer linears multiply in float8 e4m3
    (:mod:`katz.engines.torch.experimental.fp8`; GPUs of compute capability 8.9+; on an H200 no faster than float16 compiled).

    FLUX.1 (:mod:`katz.engines.torch.transformer`) takes ``compile`` per block (regional: each
    double and single block class compiled once, shared by its 19 / 38 instances and the
    ControlNets' blocks) and ``fp8`` (the blocks' linears); no CUDA graphs, since its step is
    GPU-bound and its ControlNet residuals arrive block by block while the step runs.
    ``compile_backend``: torch.compile's backend (inductor; tests on the CPU use ``aot_eager``).
    """

    cuda_graphs: bool = True
    compile: bool = False
    compile_vae: bool = True
    compile_cache: Path | None = None
    sizes: list[tuple[int, int]] | None = None
    channels_last: bool = False  # UNet and ControlNets in channels-last layout
    fp8: bool = False  # UNet and ControlNets: transformer linears in float8 (katz.engines.torch.experimental.fp8)
    compile_backend: str = "inductor"

    def active(self, device: torch.device) -> bool:
        return device.type == "cuda" and (self.cuda_graphs or self.compile or self.fp8)

    def quantize(self, module: torch.nn.Module, device: torch.device, targets=None) -> bool:
        """With ``fp8``: swap ``module``'s transformer linears (``targets``: their paths' pattern,
        :func:`katz.engines.torch.experimental.fp8.fp8_targets`) for float8 ones; returns whether it did.
        Raises on a GPU without float8 tensor cores."""
        if not self.fp8:
            return False
        from katz.engines.torch.experimental.fp8 import fp8_capable, quantize_linears

        if not fp8_capable(device):
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
            raise ValueError(f"fp8 needs a GPU with float8 tensor cores (compute capability 8.9+: Ada, "
                             f"Hopper or newer), not {name}")
        quantize_linears(module, targets=targets)
        return True

    def compiled(self, fn: Callable, on: bool | None = None) -> Callable:
        """``fn`` under ``torch.compile`` when asked for (``on``; default: ``compile``), with static
        shapes: one graph per signature."""
        if not (self.compile if on is None else on):
            return fn
        if self.compile_cache is not None:
            Path(self.compile_cache).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.compile_cache))
        return torch.compile(fn, dynamic=False, backend=self.compile_backend)


_PROCESS_POOLS: dict[int, tuple[object, threading.Lock]] = {}


def process_pool(device) -> tuple[object, threading.Lock]:
    """The CUDA-graph memory pool of this process on ``device`` and the lock its replays take.

    The engines of one process (the UNet and, in ``local`` ControlNet mode, the ControlNets) capture
    into this one pool, so their graphs' scratch memory is shared instead of added up: a graph's
    intermediate tensors are dead once its replay is done, and the next graph may reuse them. That
    needs replays that never overlap: a Triton instance (one process) runs one request at a time,
    its graphs replay in order on the device's current stream, and the lock keeps two threads from
    interleaving one replay's input copies with another's. (Each graph's outputs stay allocated for
    good, so no graph writes over another's outputs.)
    """
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _PROCESS_POOLS:
        _PROCESS_POOLS[index] = (torch.cuda.graph_pool_handle(), threading.Lock())
    return _PROCESS_POOLS[index]


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _signature(leaves, spec) -> tuple:
    return (
        str(spec),
        tuple(
            (tuple(x.shape), x.dtype, x.device) if _is_tensor(x) else ("const", repr(x))
            for x in leaves
        ),
    )


class CudaGraphs:
    """One function replayed as CUDA graphs, one per input signature.

    ``fn(*args, **kwargs)`` (``eager`` for signatures not captured; by default ``fn``) takes tensors (any nesting of tuples, lists and dicts) and
    returns tensors; it must not synchronise with the host or branch on tensor values.
    All graphs of one object share one memory pool (``pool``; several objects may share
    one too), which is safe because replays of one engine never overlap (``lock``).
    """

    def __init__(self, fn: Callable, name: str, pool=None, lock: threading.Lock | None = None,
                 eager: Callable | None = None):
        self.fn, self.name = fn, name
        self.eager = eager or fn  # runs uncaptured signatures (never compiles on a request)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.lock = lock or threading.Lock()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, object]] = {}
        self.replays = 0
        self.eager_calls = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def captured(self, *args, **kwargs) -> bool:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        return _signature(leaves, spec) in self._graphs

    @torch.no_grad()
    def capture(self, *args, warmup: int = 2, compiled: bool = True, **kwargs) -> float:
        """Record ``fn`` (``compiled`` False: ``eager``) for the signature of these (example)
        arguments; returns the seconds taken.

        The function first runs ``warmup`` times on a side stream (cuBLAS/cuDNN choose their
        kernels, ``torch.compile`` compiles), then once under capture.
        """
        fn = self.fn if compiled else self.eager
        start = time.perf_counter()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        if key in self._graphs:
            return 0.0
        static = [x.clone() if _is_tensor(x) else x for x in leaves]
        s_args, s_kwargs = pytree.tree_unflatten(static, spec)
        device = next(x.device for x in static if _is_tensor(x))
        with self.lock:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*s_args, **s_kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn(*s_args, **s_kwargs)
            torch.cuda.synchronize(device)
            self._graphs[key] = (graph, [x for x in static if _is_tensor(x)], out)
        # The eager warm-up's memory was freed on the side stream, whose cached blocks no other stream
        # reuses: hand them back. (The graphs' own pool is not released. On an H200 the UNet process
        # held 14.8 GB reserved for 9.1 GB of tensors with and without this: the rest is that pool.)
        del side
        torch.cuda.empty_cache()
        return time.perf_counter() - start

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        entry = self._graphs.get(_signature(leaves, spec))
        if entry is None:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        graph, static, out = entry
        with self.lock:
            for dst, src in zip(static, (x for x in leaves if _is_tensor(x))):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            graph.replay()
            self.replays += 1
        return out
