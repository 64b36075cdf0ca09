"""The LoRA manager's tiers: what a cached LoRA is (:class:`Entry`: its bytes and where each tensor
lies in them), how the tiers choose what to keep (:class:`ByteTier`: a byte budget, evicting the
least used LoRAs first and, for the host tier, admitting only LoRAs used more than what they
would evict, counted by :class:`Popularity` over the recent requests), and the host tier's default
budget (:func:`default_host_budget`)."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable

import torch

from katz.lora.weights import LoraLayer, LoraWeights


@dataclass
class Spec:
    """Where one LoRA tensor lies in its entry's buffer (``offset``, ``shape``, ``dtype``), or the
    tensor itself when it is not a view of the buffer (``tensor``)."""

    offset: int = -1
    shape: tuple = ()
    dtype: torch.dtype | None = None
    tensor: torch.Tensor | None = None


# one layer of a LoRA: component, module path, alpha, file key, down, up
LayoutRow = tuple[str, str, "float | None", str, Spec, Spec]


@dataclass
class Entry:
    """A cached LoRA: its bytes (``buffer``, uint8; None for a LoRA with no tensors here), where each
    layer's tensors lie in them (``layout``), and, in the device tier, ``weights`` whose tensors are
    views into ``buffer`` or are among ``extra`` (tensors that could not be views: a file offset not
    a multiple of the dtype size). ``nbytes`` counts both (what the tier's byte budget counts)."""

    name: str
    weights: LoraWeights | None
    buffer: torch.Tensor | None
    extra: tuple[torch.Tensor, ...]
    nbytes: int
    layout: list = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.buffer, *self.extra) if t is not None]


def byte_offset(t: torch.Tensor, base: torch.Tensor) -> int | None:
    """Byte offset of contiguous ``t``'s data in ``base`` (contiguous uint8), or None if not in it."""
    if (
        base is None
        or t.numel() == 0
        or not t.is_contiguous()
        or t.device != base.device
        or t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    ):
        return None
    start = t.storage_offset() * t.element_size() - base.storage_offset()
    if start < 0 or start + t.numel() * t.element_size() > base.numel():
        return None
    return start




def spec_of(t: torch.Tensor, base: torch.Tensor | None, host: bool) -> Spec:
    start = byte_offset(t, base)
    if start is None:
        return Spec(tensor=t.to("cpu") if host else t)
    return Spec(offset=start, shape=tuple(t.shape), dtype=t.dtype)


def layout_of(weights: LoraWeights, base: torch.Tensor | None, host: bool = False,
              known: dict[int, Spec] | None = None) -> list:
    """Where ``weights``' tensors lie in ``base`` (uint8), row by row (:data:`LayoutRow`); tensors
    outside it are kept as they are (``host``: as CPU copies). ``known``: the specs of tensors the
    caller made as views of ``base`` itself, by ``id`` (asking the tensors costs microseconds each,
    on a cold load's critical path)."""
    known = known or {}

    def spec(t: torch.Tensor) -> Spec:
        hit = known.get(id(t))
        return spec_of(t, base, host) if hit is None else hit

    return [(comp, path, l.alpha, l.key, spec(l.down), spec(l.up))
            for comp, group in weights.layers.items() for path, l in group.items()]


def weights_from(name: str, layout: list, buffer: torch.Tensor | None) -> tuple[LoraWeights, list[torch.Tensor]]:
    """The LoRA ``layout`` describes, as views into ``buffer`` (any device); tensors that are not in
    it are copied to its device (asynchronously towards a GPU). Returns ``(weights, those copies)``."""
    extra: list[torch.Tensor] = []

    def tensor(spec: Spec) -> torch.Tensor:
        if spec.tensor is not None:
            moved = spec.tensor.to(buffer.device, non_blocking=buffer.device.type == "cuda")
            extra.append(moved)
            return moved
        n = spec.dtype.itemsize
        for d in spec.shape:
            n *= d
        return buffer[spec.offset : spec.offset + n].view(spec.dtype).view(spec.shape)

    layers: dict[str, dict[str, LoraLayer]] = {}
    for comp, path, alpha, key, down, up in layout:
        layers.setdefault(comp, {})[path] = LoraLayer(down=tensor(down), up=tensor(up), alpha=alpha, key=key)
    return LoraWeights(name=name, layers=layers), extra


def streamable(layout: list) -> bool:
    """Whether every tensor of a LoRA lies in its buffer (a merge can then follow its bytes)."""
    return all(spec.tensor is None for row in layout for spec in row[4:])


def numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Popularity:
    """How many of the last ``window`` LoRA uses named each LoRA (a request counts once per LoRA)."""

    def __init__(self, window: int = 512):
        self.window = window
        self._recent: deque[str] = deque()
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def note(self, names: Iterable[str]) -> None:
        if self.window <= 0:
            return
        with self._lock:
            for name in dict.fromkeys(names):
                self._recent.append(name)
                self._counts[name] += 1
            while len(self._recent) > self.window:
                old = self._recent.popleft()
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)


class ByteTier:
    """A map of :class:`Entry` with a byte budget. Over budget, the least popular entries go first
    (:class:`Popularity`; the least recently used among equally popular ones, so with no popularity
    it is an LRU). ``admit``: a new entry is kept only if it was used more than each entry it would
    evict (a one-off LoRA does not push out a popular one; ties keep what is there; entries never
    used go LRU); otherwise the newest entry always stays."""

    def __init__(self, budget: int, popularity: Popularity | None = None, admit: bool = False):
        self.budget = budget
        self.popularity = popularity
        self.admit = admit
        self.items: OrderedDict[str, tuple[tuple, Entry]] = OrderedDict()
        self.used = 0

    def clear(self) -> None:
        self.items.clear()
        self.used = 0

    def get(self, name: str, key: tuple) -> Entry | None:
        hit = self.items.get(name)
        if hit is None or hit[0] != key:
            return None
        self.items.move_to_end(name)
        return hit[1]

    def peek(self, name: str, key: tuple) -> Entry | None:
        """:meth:`get` without counting as a use."""
        hit = self.items.get(name)
        return hit[1] if hit is not None and hit[0] == key else None

    def _count(self, name: str) -> int:
        return self.popularity.count(name) if self.popularity is not None else 0

    def _victims(self, name: str, nbytes: int) -> list[str] | None:
        """What keeping ``nbytes`` more for ``name`` would evict; None where admission refuses it."""
        over = self.used - (self.items[name][1].nbytes if name in self.items else 0) + nbytes - self.budget
        victims: list[str] = []
        if over > 0:
            for victim in sorted((n for n in self.items if n != name), key=self._count):  # stable: LRU first
                if over <= 0:
                    break
                victims.append(victim)
                over -= self.items[victim][1].nbytes
            # a victim stays unless the newcomer was used more (ties keep what is there: two equally
            # popular LoRAs taking turns would each be read again every time); unused ones go LRU
            if self.admit and (over > 0 or any(0 < self._count(name) <= self._count(v) or
                                               self._count(name) < self._count(v) for v in victims)):
                return None
        return victims

    def admits(self, name: str, nbytes: int) -> bool:
        """Whether :meth:`put` would keep an entry of ``nbytes`` for ``name`` now."""
        return self._victims(name, nbytes) is not None

    def put(self, name: str, key: tuple, entry: Entry) -> bool:
        """Keep ``entry``; returns False where admission turned it away (nothing was evicted then)."""
        victims = self._victims(name, entry.nbytes)
        if victims is None:
            return False
        self.drop(name)
        for victim in victims:
            self.drop(victim)
        self.items[name] = (key, entry)
        self.used += entry.nbytes
        return True

    def drop(self, name: str) -> None:
        old = self.items.pop(name, None)
        if old is not None:
            self.used -= old[1].nbytes


HOST_BUDGET_FRACTION = 0.25  # of the memory free at start (MemAvailable), for the host tier by default
HOST_BUDGET_CAP = 16 << 30


def default_host_budget(meminfo: str = "/proc/meminfo") -> int:
    """The host tier's default budget: :data:`HOST_BUDGET_FRACTION` of the machine's free memory
    (``MemAvailable``) now, at most :data:`HOST_BUDGET_CAP`; 2 GiB where that cannot be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    return min(HOST_BUDGET_CAP, int(available * HOST_BUDGET_FRACTION))
    except (OSError, ValueError, IndexError):
        pass
    return 2 << 30
