"""The LoRA store: a directory of ``.safetensors`` LoRAs, named by file stem.

New files are picked up without a restart (every lookup asks the directory).
Parsed LoRAs are cached by ``(path, size, mtime)``, so a file replaced between
requests is read again and a deleted one is reported, not crashed on.
"""

from __future__ import annotations

import threading
from pathlib import Path

from katz.errors import LoraError
from katz.lora.safetensors import read_lora_file
from katz.lora.weights import LoraWeights, parse_lora
from katz.request import check_lora_name

SUFFIX = ".safetensors"


class LoraStore:
    def __init__(self, directory: str | Path | None, family: str, cache_entries: int = 16):
        self.directory = Path(directory) if directory else None
        self.family = family
        self.cache_entries = cache_entries
        self._cache: dict[tuple, tuple[tuple, LoraWeights]] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        check_lora_name(name)
        if self.directory is None:
            raise LoraError(f"lora {name!r}: this deployment has no LoRA directory")
        return self.directory / f"{name}{SUFFIX}"

    def clear_cache(self) -> None:
        """Forget the parsed LoRAs :meth:`get` keeps (the next ``get`` reads the file again)."""
        with self._lock:
            self._cache.clear()

    def exists(self, name: str) -> bool:
        return self.directory is not None and self.path(name).is_file()

    def names(self) -> list[str]:
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob(f"*{SUFFIX}"))

    def read(self, name: str, components: tuple[str, ...] | None = None) -> LoraWeights:
        """Read and parse the LoRA ``name`` now, without caching it (the LoRA manager keeps its own
        byte-bounded host cache)."""
        path = self.path(name)
        if not path.is_file():
            raise LoraError(f"lora {name!r}: file {path.name} is not in the LoRA store")
        tensors = read_lora_file(path, name, components)
        # a file with nothing for these components (a UNet-only LoRA, asked for its text-encoder part)
        return parse_lora(tensors, name, self.family) if tensors else LoraWeights(name=name, layers={})

    def get(self, name: str, components: tuple[str, ...] | None = None) -> LoraWeights:
        """Read, parse and validate-by-format the LoRA ``name`` (cached while the file is unchanged).

        ``components`` reads only those components' tensors (see :func:`katz.lora.safetensors.read_lora_file`).
        """
        path = self.path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LoraError(f"lora {name!r}: file {path.name} is not in the LoRA store") from None
        key = (st.st_size, st.st_mtime_ns)
        entry = (name, components)
        with self._lock:
            hit = self._cache.get(entry)
            if hit is not None and hit[0] == key:
                return hit[1]
        weights = self.read(name, components)
        with self._lock:
            self._cache[entry] = (key, weights)
            while len(self._cache) > self.cache_entries:
                self._cache.pop(next(iter(self._cache)))
        return weights
