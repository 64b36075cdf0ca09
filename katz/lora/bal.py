"""Bounded asynchronous LoRA loading (BAL): when a request's LoRA set goes into the UNet.

Denoising starts on the base weights while the request's LoRAs load; they are patched in at the
first step they are on the device, and step ``k`` at the latest waits for them (:func:`must_wait`).
Once in, a request keeps them to its last step: it never goes back to base weights.

Two sides take part:

* the loop (:class:`RequestLoras`, one per request): which step it is at, whether the LoRAs are
  in yet, and what it asks of the UNet each step (``loras``, ``lora_scales``, ``lora_wait`` and,
  with several UNet shards, ``lora_skip``). Sharded UNets must agree on the weights of a step, so
  the loop decides for them: the LoRAs go in at the step after every shard reported them ready,
  and until then every shard keeps the base weights.
* the UNet instance (:class:`UNetLoras`): the weight set in place, the choice for one step
  (:meth:`UNetLoras.choose`), the switch (merge in / restore), and the order in which a batch
  of queued calls runs: grouped by weight set, the set in place first, so the instance switches
  weights as rarely as its queue allows.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch

# a request's LoRAs: ((name, scale), ...) in request order; () is the base weights
LoraSet = tuple[tuple[str, float], ...]


def must_wait(step: int, k: int, applied_at: int | None) -> bool:
    """The bound: step ``step`` runs with the LoRAs, waiting for them if need be, once ``step >= k``
    or once they were applied at an earlier step."""
    return applied_at is not None or step >= k


def lora_set(names: Iterable[str], scales: Iterable[float]) -> LoraSet:
    return tuple((str(n), float(s)) for n, s in zip(names, scales))


def requested_loras(inputs: dict) -> LoraSet:
    """The LoRA set a UNet step call asks for (row 0 of ``loras`` / ``lora_scales``; rows repeat)."""
    names = inputs.get("loras")
    if names is None or names.size == 0:
        return ()
    names = names.reshape(names.shape[0], -1)[0] if names.ndim > 1 else names.reshape(-1)
    scales = inputs.get("lora_scales")
    if scales is None:
        values = [1.0] * len(names)
    else:
        values = (scales.reshape(scales.shape[0], -1)[0] if scales.ndim > 1 else scales.reshape(-1)).tolist()
    return tuple((bytes(n).decode(), float(s)) for n, s in zip(names, values))


def _flag(inputs: dict, name: str) -> bool:
    value = inputs.get(name)
    return value is not None and bool(value.reshape(-1)[0])


class RequestLoras:
    """The loop's side of BAL for one request (see the module docstring)."""

    def __init__(self, names: list[str], scales: list[float], k: int):
        self.names, self.scales, self.k = names, scales, k
        self.step = 0
        self.applied_at: int | None = None
        self.all_ready = False

    def inputs(self, batch: int, sharded: bool = False) -> dict:
        """This step's LoRA inputs of a UNet call (batch dimension first, rows repeat)."""
        if not self.names:
            return {}
        wait = must_wait(self.step, self.k, self.applied_at) or (sharded and self.all_ready)
        out = {
            "loras": np.array([[n.encode() for n in self.names]] * batch, dtype=object),
            "lora_scales": torch.tensor([self.scales] * batch, dtype=torch.float32),
            "lora_wait": torch.full((batch, 1), wait, dtype=torch.bool),
        }
        if sharded and not wait:
            out["lora_skip"] = torch.ones((batch, 1), dtype=torch.bool)
        return out

    def step_done(self, applied: list[torch.Tensor], ready: list[torch.Tensor]) -> None:
        """Record the UNet calls' ``lora_applied`` / ``lora_ready`` outputs of the step just run."""
        flags = [bool(a.reshape(-1)[0]) for a in applied]
        if self.names and self.applied_at is None and any(flags):
            if not all(flags):
                raise RuntimeError("UNet shards disagreed on the LoRA weights of one step")
            self.applied_at = self.step
        self.all_ready = all(bool(r.reshape(-1)[0]) for r in ready)
        self.step += 1

    @property
    def applied_step(self) -> int:
        """The step from which the LoRAs were in; -1 if they never were (or the request has none)."""
        return -1 if self.applied_at is None else self.applied_at


class UNetLoras:
    """The UNet instance's side of BAL: its weight set and the loader (:class:`katz.lora.manager.LoraManager`).

    ``patcher`` is the engine's ``set_loras(list[(LoraWeights, scale)])``, which merges a set in
    place of the one there (the base weights for an empty list)."""

    def __init__(self, manager, set_loras):
        self.manager = manager
        self._set_loras = set_loras
        self.applied: LoraSet = ()

    def choose(self, want: LoraSet, must: bool, may: bool = True) -> LoraSet:
        """The weights of one step: ``want`` if it is in place, if the step ``must`` have it (the
        bound is reached) or if the LoRAs are on the device; else the base weights, with the load
        started. ``may`` False (sharded UNets not all ready yet): the base weights in any case."""
        if not want:
            return ()
        names = [n for n, _ in want]
        if may and (want == self.applied or must or self.manager.ready(names)):
            return want
        self.manager.prefetch(names)
        self.manager.stats.steps_before_patch += 1
        return ()

    def choose_for_call(self, inputs: dict) -> LoraSet:
        """:meth:`choose` for a UNet step call (its ``loras``, ``lora_wait``, ``lora_skip`` inputs)."""
        want = requested_loras(inputs)
        if _flag(inputs, "lora_skip"):
            return self.choose(want, must=False, may=False)
        return self.choose(want, must=_flag(inputs, "lora_wait"))

    def ready(self, want: LoraSet) -> bool:
        """Whether ``want``'s LoRAs are on this instance's device (or in place)."""
        return bool(want) and (want == self.applied or self.manager.ready([n for n, _ in want]))

    def switch_to(self, weights: LoraSet) -> None:
        """Put ``weights`` in place (waits for the loads still running); on failure the base is in place."""
        if weights == self.applied:
            return
        loaded = self.manager.get([n for n, _ in weights]) if weights else []
        start = time.perf_counter()
        try:
            self._set_loras([(w, s) for w, (_, s) in zip(loaded, weights)])
        except BaseException:
            self.applied = ()
            raise
        finally:
            self.manager.stats.switch_seconds += time.perf_counter() - start
        self.applied = weights
        if weights:
            self.manager.stats.patches += 1

    def order(self, sets: Iterable[LoraSet | None]) -> list[int]:
        """Indices of ``sets`` in the order to run them: the set in place first, stable otherwise
        (None, a call whose set is unknown, runs with the rest)."""
        sets = list(sets)
        return sorted(range(len(sets)), key=lambda i: sets[i] != self.applied)
