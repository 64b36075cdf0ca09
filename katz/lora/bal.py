"""Bounded asynchronous LoRA loading (BAL): when a request's LoRA set goes into the UNet.

Denoising starts on the base weights while the request's LoRAs load; they are patched in at the
first step the device reaches after they are on it, and step ``k`` at the latest waits for them
(:func:`must_wait`, the upper bound). Once in, a request keeps them to its last step: it never
goes back to base weights.

When (:meth:`UNetLoras.choose`), at each step not yet with the LoRAs:

* *hot* LoRAs (on the device, or in the manager's host tier: a copy away) go in at step 0,
  waiting there for the copy;
* else the step runs with them if they are on the device now, or if the manager predicts they
  will be (:meth:`katz.lora.manager.LoraManager.eta`, from its running estimates per tier) before
  the device gets to this step: the host is ahead of the device by the steps it has queued
  (``ahead_s``), so it waits for the load here while the device still works through them, and
  the LoRAs go in at the first step after the load, not at ``k``;
* else the step runs on the base weights and the load goes on; at step ``k`` the loop waits.

A switch (:meth:`UNetLoras.switch_to`) merges a LoRA still loading as its bytes arrive
(:meth:`katz.lora.manager.LoraManager.stream`), so waiting for a cold LoRA ends about when its
last bytes are read, and never waits for the device: the merged weights' finiteness is read at
the end of the request (:meth:`UNetLoras.settle`), or earlier when it is ready.

Two sides take part:

* the loop (:class:`RequestLoras`, one per request, where the loop calls the UNet per step):
  which step it is at, whether the LoRAs are in yet, and what it asks of the UNet each step
  (``loras``, ``lora_scales``, ``lora_wait``, ``lora_step`` and, with several UNet shards,
  ``lora_skip``). Sharded UNets must agree on the weights of a step, so the loop decides for them:
  the LoRAs go in at the step after every shard reported them ready, and until then every shard
  keeps the base weights (no hot start, no prediction).
* the UNet instance (:class:`UNetLoras`): the weight set in place, the choice for one step
  (:meth:`UNetLoras.choose`), the switch (merge in / restore), and the order in which a batch
  of queued calls runs: grouped by weight set, the set in place first, so the instance switches
  weights as rarely as its queue allows. A loop run in the UNet's process (the default) has a
  :class:`LoopLoras` per request: its steps' choices, what was predicted at its first step and
  what happened (the ``katz_lora_*`` per-request counters).
"""

from __future__ import annotations

import gc
import math
import time
from typing import Iterable

import numpy as np
import torch

from katz.lora.patch import LoraPatcher, warm_up
from katz.request import RequestParams

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


def _gc_collections() -> int:
    return sum(g["collections"] for g in gc.get_stats())


def device_ahead(pending: int, step_s: float | None) -> float:
    """Seconds until the device starts the step the host is about to queue, when it still has
    ``pending`` steps of ``step_s`` queued (the oldest of them half done, on average)."""
    if not pending or not step_s:
        return 0.0
    return (pending - 0.5) * step_s


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
            "lora_step": torch.full((batch, 1), self.step, dtype=torch.int32),
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

    ``set_loras`` is the engine's ``set_loras(list[(LoraWeights, scale)])``, which merges a set in
    place of the one there (the base weights for an empty list). ``patcher``: the engine's
    :class:`katz.lora.patch.LoraPatcher` where it has one (PyTorch engines): switches then stream a
    loading LoRA in and read the merged weights' finiteness later (:meth:`settle`); other engines
    (TensorRT refits) wait for the whole load and check at once."""

    STEP_DECAY = 0.8  # weight of the previous step times in :attr:`step_seconds`

    def __init__(self, manager, set_loras, patcher=None):
        self.manager = manager
        self._set_loras = set_loras
        self._patcher = patcher if isinstance(patcher, LoraPatcher) else None
        self.applied: LoraSet = ()
        self.step_seconds: float | None = None  # running mean of a step on the device
        self.last_wait = 0.0  # seconds the last switch waited for a load

    def observe_step(self, seconds: float) -> None:
        """One UNet evaluation's time on the device (the step time the decisions use)."""
        prev = self.step_seconds
        self.step_seconds = seconds if prev is None else self.STEP_DECAY * prev + (1 - self.STEP_DECAY) * seconds

    def hot(self, want: LoraSet) -> bool:
        """Whether every LoRA of ``want`` is on the device or in the host tier (or is the set in place)."""
        return bool(want) and (want == self.applied or all(
            t in ("device", "host") for t in self.manager.tiers([n for n, _ in want])))

    def choose(self, want: LoraSet, must: bool, may: bool = True, first: bool = False, ahead_s: float = 0.0) -> LoraSet:
        """The weights of one step (see the module docstring): ``want`` if it is in place, if the step
        ``must`` have it (the bound is reached), if the LoRAs are on the device, if this is the
        request's ``first`` step and they are hot, or if they are predicted to be on the device within
        ``ahead_s`` (the device's queued work); else the base weights, with the load started.
        ``may`` False (sharded UNets not all ready yet): the base weights in any case."""
        if not want:
            return ()
        names = [n for n, _ in want]
        if may and (want == self.applied or must or self.manager.ready(names)):
            return want
        if may and first and self.hot(want):
            return want
        if may and ahead_s > 0 and self.manager.eta(names) <= ahead_s:
            return want
        self.manager.prefetch(names)
        self.manager.stats.steps_before_patch += 1
        return ()

    def choose_for_call(self, inputs: dict) -> LoraSet:
        """:meth:`choose` for a UNet step call (its ``loras``, ``lora_wait``, ``lora_skip``, ``lora_step`` inputs)."""
        want = requested_loras(inputs)
        if _flag(inputs, "lora_skip"):
            return self.choose(want, must=False, may=False)
        step = inputs.get("lora_step")
        first = step is not None and int(step.reshape(-1)[0]) == 0
        if first and want:
            self.manager.note_request([n for n, _ in want])
        return self.choose(want, must=_flag(inputs, "lora_wait"), first=first)

    def ready(self, want: LoraSet) -> bool:
        """Whether ``want``'s LoRAs are on this instance's device (or in place)."""
        return bool(want) and (want == self.applied or self.manager.ready([n for n, _ in want]))

    def switch_to(self, weights: LoraSet) -> None:
        """Put ``weights`` in place, waiting for the loads still running (a LoRA still loading is
        merged as its bytes arrive); on failure the base is in place. The finiteness of merged
        weights may be read later (:meth:`settle`)."""
        if weights == self.applied:
            return
        gc_before, start = _gc_collections(), time.perf_counter()
        names = [n for n, _ in weights]
        waited = 0.0
        try:
            if self._patcher is not None:
                loaded, arrival = self.manager.stream(names) if weights else ([], None)
                waited = time.perf_counter() - start  # parsing, or whole loads that cannot stream
                component = self._patcher.component
                try:
                    self._patcher.apply([(w, s) for w, (_, s) in zip(loaded, weights) if component in w.layers],
                                        arrival=arrival, defer_check=True)
                finally:
                    waited += arrival.waited if arrival is not None else 0.0
            else:
                loaded = self.manager.get(names) if weights else []
                waited = time.perf_counter() - start
                self._set_loras([(w, s) for w, (_, s) in zip(loaded, weights)])
        except BaseException:
            self.applied = ()
            raise
        finally:
            seconds = time.perf_counter() - start
            self.last_wait = waited
            self.manager.stats.record_switch(seconds - waited, waited, _gc_collections() - gc_before)
        self.applied = weights
        if weights:
            self.manager.stats.patches += 1
            self.manager.observe_merge(names, seconds - waited)

    def settle(self) -> None:
        """Read the finiteness of the weights merged last (waits for the device if it must): raise
        :class:`katz.errors.LoraError`, with the base weights in place, if one is not finite."""
        if self._patcher is None:
            return
        try:
            self._patcher.settle()
        except BaseException:
            self.applied = ()
            raise

    def poll(self) -> None:
        """:meth:`settle` if it would not wait (a request with bad merged weights fails early)."""
        if self._patcher is not None and self._patcher.check_done():
            self.settle()

    def order(self, sets: Iterable[LoraSet | None]) -> list[int]:
        """Indices of ``sets`` in the order to run them: the set in place first, stable otherwise
        (None, a call whose set is unknown, runs with the rest)."""
        sets = list(sets)
        return sorted(range(len(sets)), key=lambda i: sets[i] != self.applied)

    def begin(self, want: LoraSet, k: int) -> "LoopLoras":
        """BAL for one loop request wanting ``want`` with the bound ``k``."""
        return LoopLoras(self, want, k)


def instance_loras(deployment, engine):
    """A denoiser instance's LoRA side (UNet, FLUX transformer): ``(manager, bal, hints)``, its loader
    (:class:`katz.lora.manager.LoraManager`) over the engine's patcher, its :class:`UNetLoras`, and the
    listener for preprocessing's load hints (:mod:`katz.lora.hints`; None where they are off)."""
    from katz.lora.manager import LoraManager

    manager = LoraManager(
        deployment.loras,
        [engine.lora],
        deployment.device,
        host_budget_bytes=deployment.lora_host_cache_bytes,
        device_budget_bytes=deployment.lora_device_cache_bytes,
        load_delay_s=deployment.lora_load_delay_s,
    )
    hints = None
    if deployment.lora_hints and deployment.lora_dir:
        from katz.lora.hints import HintListener

        hints = HintListener(deployment.lora_hints, manager.hint)
    if deployment.lora_dir and isinstance(engine.lora, LoraPatcher):
        # the first LoRA request would otherwise pay for the first merge (kernels, scratch, pristine copies)
        warm_up(engine.lora)
    return manager, UNetLoras(manager, engine.set_loras, engine.lora), hints


def queued_loop_order(bal: "UNetLoras", batch: list[dict], loops: list[int]) -> list[int]:
    """The indices ``loops`` of ``batch``'s loop requests in the order to run them: those wanting the
    weight set in place first (:meth:`UNetLoras.order`); a request whose params do not parse keeps
    its place and fails when run."""

    def wanted(inputs: dict) -> LoraSet | None:
        try:
            return RequestParams.from_tensor(inputs["loop_params"], "loop_params").lora_set
        except Exception:
            return None

    return [loops[j] for j in bal.order(wanted(batch[i]) for i in loops)]


class LoopLoras:
    """The UNet's side of BAL for one loop request (the loop in the UNet's process): the weights of
    each step (:meth:`before_step`), the prediction made at its first step and, at its end
    (:meth:`finish`), the deferred finiteness check and the request's BAL counters."""

    def __init__(self, bal: UNetLoras, want: LoraSet, k: int):
        self.bal, self.want, self.k = bal, want, k
        self.step = 0
        self.applied_at: int | None = None
        self.waited = False
        self._start = time.perf_counter()
        self.ready_seconds: float | None = None
        self.hot = False
        self.predicted_seconds = 0.0
        self.predicted_step = -1
        if want:
            names = [n for n, _ in want]
            bal.manager.note_request(names)
            self.hot = bal.hot(want)
            self.predicted_seconds = 0.0 if self.hot else bal.manager.eta(names)
            self.predicted_step = self.predict_step(self.predicted_seconds)

    def predict_step(self, seconds: float) -> int:
        """The first step the device starts ``seconds`` from now or later (the device idle now),
        bounded by ``k``: where the LoRAs are predicted to go in."""
        if self.hot or seconds <= 0:
            return 0
        step_s = self.bal.step_seconds
        if not step_s or not math.isfinite(seconds):  # no step time yet, or no prediction: the bound
            return self.k
        return min(self.k, math.ceil(seconds / step_s))

    def before_step(self, ahead_s: float = 0.0) -> LoraSet:
        """The weights of the next step, put in place (may wait for the LoRAs)."""
        must = must_wait(self.step, self.k, self.applied_at)
        weights = self.bal.choose(self.want, must=must, first=self.step == 0, ahead_s=ahead_s)
        self.bal.switch_to(weights)
        if weights and self.applied_at is None:
            self.applied_at = self.step
            self.ready_seconds = time.perf_counter() - self._start
            self.waited = self.bal.last_wait > 0.001
        if self.applied_at is not None:
            self.bal.poll()
        self.step += 1
        return weights

    @property
    def applied_step(self) -> int:
        return -1 if self.applied_at is None else self.applied_at

    def finish(self) -> None:
        """The end of the request's loop: the deferred finiteness check (raises, base restored),
        then the request's BAL counters."""
        if self.applied_at is not None:
            self.bal.settle()
        if not self.want:
            return
        s = self.bal.manager.stats
        s.requests += 1
        s.hot_requests += self.hot
        s.predicted_ready_seconds += self.predicted_seconds
        s.predicted_step_sum += self.predicted_step
        s.waited_requests += self.waited
        if self.applied_at is not None:
            s.ready_seconds += self.ready_seconds
            s.applied_step_sum += self.applied_at
            s.step_error_sum += abs(self.applied_at - self.predicted_step)
            s.late_requests += self.applied_at > self.predicted_step
