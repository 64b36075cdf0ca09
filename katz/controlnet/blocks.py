"""ControlNet-as-a-Service for a transformer (FLUX.1): the ControlNets' residuals streamed block by block.

A FLUX ControlNet returns one residual per block of its own, and the transformer adds residual
``j`` to its image tokens after its block ``i`` where ``i // ceil(blocks / ControlNet blocks) == j``.
So instead of running the ControlNets first (the *inline* baseline), :class:`TransformerControlNetStep`
starts them on a thread of their own and runs the transformer at once: each ControlNet block's
residual is published as soon as that block is done (a forward hook, the same ops in the same order
as the ControlNet's own output head), and the transformer, handed :class:`StreamedResiduals`,
waits only when it reaches a residual not made yet. The ControlNet's blocks are the transformer's
size and fewer, so after the first residual it stays ahead; what is exposed is the ControlNet's
embedding and first block.

In one process the two threads overlap on CPU cores. On a GPU both issue to the same CUDA stream:
the result is the same and the host's launch work overlaps, but the kernels still run one after the
other (a second stream with an event per block is not built).

Mode ``service`` runs the ControlNets in the ``controlnet`` model's process instead (its own
instances, on a GPU of their own where the deployment puts them): that model is decoupled and sends
one response per block residual as the block finishes (:func:`run_blocks` with a sender), which
the transformer's step reads from a BLS stream into the same :class:`StreamedResiduals`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch


# what the controlnet model of a FLUX deployment (mode service) sends, one response per block residual
FLUX_RESIDUAL_OUTPUTS = ("residual", "block", "single")


class StreamedResiduals(Sequence):
    """One kind of residual (double or single blocks) of a step: ``blocks`` slots, each the sum over
    ``nets`` ControlNets in their order (as ``FluxMultiControlNetModel`` sums), readable as soon as
    every net published it. Reading a slot not ready waits; a producer's failure is raised there."""

    def __init__(self, blocks: int, nets: int):
        self._parts: list[list[torch.Tensor | None]] = [[None] * nets for _ in range(blocks)]
        self._values: list[torch.Tensor | None] = [None] * blocks
        self._ready = [threading.Event() for _ in range(blocks)]
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.waited_seconds = 0.0  # how long the reader waited for residuals not made yet

    def __len__(self) -> int:
        return len(self._values)

    def publish(self, block: int, net: int, residual: torch.Tensor) -> None:
        with self._lock:
            parts = self._parts[block]
            parts[net] = residual
            if any(p is None for p in parts):
                return
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            self._values[block] = total
        self._ready[block].set()

    def fail(self, error: BaseException) -> None:
        """The ControlNets failed: every reader gets ``error``."""
        self._error = error
        for event in self._ready:
            event.set()

    def __getitem__(self, block: int) -> torch.Tensor:
        if not self._ready[block].is_set():
            start = time.perf_counter()
            self._ready[block].wait()
            self.waited_seconds += time.perf_counter() - start
        if self._values[block] is None:
            raise RuntimeError("a ControlNet failed before this residual was made") from self._error
        return self._values[block]


def _publisher(net: torch.nn.Module, kind: str, stream: StreamedResiduals, index: int, scale: float):
    """Forward hooks on ``net``'s blocks of ``kind`` publishing each block's residual: its
    ``controlnet_blocks`` projection of the block's image tokens times ``scale``."""
    blocks = net.transformer_blocks if kind == "double" else net.single_transformer_blocks
    heads = net.controlnet_blocks if kind == "double" else net.controlnet_single_blocks

    def hook_for(j):
        def hook(_module, _args, output):
            stream.publish(j, index, heads[j](output[1]) * scale)
        return hook

    return [block.register_forward_hook(hook_for(j)) for j, block in enumerate(blocks)]


def run_blocks(controlnets, name: str, doubles, singles, index: int, scale: float, hidden_states, cond, timestep,
               guidance, pooled, encoder_hidden_states, txt_ids, img_ids) -> None:
    """Run the ControlNet ``name`` of the engine ``controlnets`` on one step, publishing each block's
    residual (times ``scale``) to ``doubles`` / ``singles`` (``publish(block, index, residual)``; None:
    that kind is not read) as the block finishes."""
    net = controlnets.net(name)
    hooks = (_publisher(net, "double", doubles, index, scale) if doubles is not None else []) + \
        (_publisher(net, "single", singles, index, scale) if singles is not None else [])
    try:
        controlnets(name, hidden_states, cond, scale, timestep, guidance, pooled, encoder_hidden_states, txt_ids,
                    img_ids)
    finally:
        for h in hooks:
            h.remove()


def block_counts(config: dict) -> tuple[int, int]:
    """A FLUX ControlNet's (double, single) block counts from its ``config.json``."""
    return int(config.get("num_layers", 0)), int(config.get("num_single_layers", 0))


class TransformerControlNetStep:
    """One transformer evaluation with the step's ControlNets beside it: ``controls`` =
    ``[(ControlInput, packed control latents, scale at this step), ...]``.

    ``engine``: the transformer engine; ``controlnets``: the ControlNet engine
    (:class:`katz.engines.torch.transformer.FluxControlNetEngine`; mode ``local``), or None with
    ``remote(name, scale, hidden_states, cond, timestep, guidance, pooled, encoder_hidden_states,
    txt_ids, img_ids)`` yielding ``(kind, block, residual)`` (``kind`` 'double' or 'single'; mode
    ``service``) and ``counts(name)`` giving a ControlNet's (double, single) block counts."""

    def __init__(self, engine, controlnets, remote=None, counts=None):
        self.engine, self.controlnets = engine, controlnets
        self.remote, self.counts = remote, counts
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katz-flux-controlnet")
        self.waited_seconds = 0.0  # the transformer's total wait for residuals (what the overlap did not hide)

    def __call__(self, hidden_states, timestep, guidance, pooled, encoder_hidden_states, txt_ids, img_ids,
                 block_residuals=None, single_block_residuals=None, controls=()) -> torch.Tensor:
        if not controls:
            return self.engine(hidden_states, timestep, guidance, pooled, encoder_hidden_states, txt_ids, img_ids,
                               block_residuals, single_block_residuals)
        if self.remote is None:
            nets = [self.controlnets.net(control.name) for control, _cond, _scale in controls]
            counts = {(len(n.transformer_blocks), len(n.single_transformer_blocks)) for n in nets}
        else:
            counts = {self.counts(control.name) for control, _cond, _scale in controls}
        if len(counts) > 1:
            raise ValueError("controlnets: a request's FLUX ControlNets must have the same numbers of blocks "
                             f"to be summed, not {sorted(counts)}")
        double, single = counts.pop()
        doubles = StreamedResiduals(double, len(controls)) if double else None
        singles = StreamedResiduals(single, len(controls)) if single else None
        step = (timestep, guidance, pooled, encoder_hidden_states, txt_ids, img_ids)

        def produce():
            try:
                for i, (control, cond, scale) in enumerate(controls):
                    if self.remote is None:
                        run_blocks(self.controlnets, control.name, doubles, singles, i, scale, hidden_states, cond,
                                   *step)
                        continue
                    got = set()
                    for kind, block, residual in self.remote(control.name, scale, hidden_states, cond, *step):
                        stream = doubles if kind == "double" else singles
                        if stream is None or not 0 <= block < len(stream):
                            raise RuntimeError(f"controlnet {control.name!r} sent {kind} residual {block}, "
                                               f"which its config does not have")
                        stream.publish(block, i, residual)
                        got.add((kind, block))
                    if len(got) != double + single:  # the transformer would wait for the rest forever
                        raise RuntimeError(f"controlnet {control.name!r} sent {len(got)} of its "
                                           f"{double + single} block residuals")
            except BaseException as exc:
                for stream in (doubles, singles):
                    if stream is not None:
                        stream.fail(exc)
                raise

        pending = self._pool.submit(produce)
        try:
            out = self.engine(hidden_states, timestep, guidance, pooled, encoder_hidden_states, txt_ids, img_ids,
                              doubles, singles)
        finally:
            pending.result()  # the ControlNets' own error first, if they failed
        self.waited_seconds += sum(s.waited_seconds for s in (doubles, singles) if s is not None)
        return out
