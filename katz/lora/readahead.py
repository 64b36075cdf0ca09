"""Page-cache readahead of the LoRA files that arriving requests name.

The ``preprocessing`` model sees a request the moment it arrives, well before
the request's first UNet step: text encoding comes first, and under load the
request waits in ``katz_pipeline``'s queue behind other requests' denoising
loops. Preprocessing hands the request's LoRA files to :class:`LoraReadahead`,
whose thread reads the parts of each file that are not in the OS page cache
yet, so that the UNet's LoRA loader (:mod:`katz.lora.manager`, another
process: the page cache is what the two share) later reads them from memory
instead of from the disk. Reading a cold 186 MB LoRA from the GPU host's disk
took about 0.75 s; from the page cache it is a memory copy.

Which pages are resident is asked with ``mincore(2)``; only 8 MB chunks with a
missing page are read, in file order by one thread into one reusable buffer
(nothing is kept: the page cache is the result). A file that is fully resident
costs one ``mincore`` call. One sequential reader, because the UNet's loader
may start on the same file while the readahead is still at it: with four
readahead threads the two together read a cold 186 MB file slower than the
loader alone, with one faster (``bench/lora_readahead.py``).
``posix_fadvise(WILLNEED)`` is not used: on this project's machines it started
reading only the first few MB of a file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 8 << 20  # one read; a chunk with any page missing from the page cache is read whole
MAX_PENDING = 64  # files waiting for the readahead thread; the oldest hints are dropped beyond this


@dataclass
class ReadaheadStats:
    """Totals since start (exported by ``preprocessing`` as Triton custom metrics)."""

    hints: int = 0  # files named by requests
    files_read: int = 0  # files with at least one chunk read from disk
    resident: int = 0  # files found fully in the page cache (nothing read)
    dropped: int = 0  # hints dropped: MAX_PENDING files already waiting
    errors: int = 0  # files that vanished or could not be read (the loader reports it to the request)
    bytes_read: int = 0
    read_seconds: float = 0.0


# ------------------------------------------------------------------ residency
_libc = None


def _mincore_fn():
    """libc's mmap/munmap/mincore through ctypes, or None where there is no mincore (not Linux)."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.mmap.restype = ctypes.c_void_p
                libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_long]
                libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
                _libc = libc
            except (OSError, AttributeError):
                _libc = False
    return _libc or None


_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore's residency bit of each page's byte


def resident_pages(fd: int, size: int) -> bytes | None:
    """One byte per page of the open file ``fd`` (``size`` bytes): 1 where the page is in the page
    cache, else 0; None where that cannot be asked (no ``mincore``, or the mapping failed)."""
    libc = _mincore_fn()
    if libc is None or size == 0:
        return None
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return None
        # in C, not a Python loop over every page: the loader asks this on a request's path
        return bytes(vec).translate(_LOW_BIT)
    finally:
        libc.munmap(addr, size)


def resident_fraction(path: str | Path) -> float | None:
    """The share of ``path``'s pages that are in the page cache (1.0 for an empty file); None if unknown."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        pages = resident_pages(fd, size)
        return None if pages is None else pages.count(1) / len(pages)
    finally:
        os.close(fd)


def evict(path: str | Path) -> None:
    """Make a file cold: write it out, then drop its pages from the page cache
    (``POSIX_FADV_DONTNEED``; needs no root and leaves the rest of the page cache alone).
    For benchmarks and tests of cold LoRA loads."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def missing_chunks(fd: int, size: int, chunk: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """``(offset, length)`` of the ``chunk``-sized pieces of the file with a page not in the page
    cache; every piece when residency cannot be asked."""
    pages = resident_pages(fd, size)
    per_chunk = chunk // mmap.PAGESIZE
    out = []
    for offset in range(0, size, chunk):
        if pages is not None:
            first = offset // mmap.PAGESIZE
            if 0 not in pages[first : first + per_chunk]:
                continue
        out.append((offset, min(chunk, size - offset)))
    return out


# ------------------------------------------------------------------ readahead
class LoraReadahead:
    """A thread that brings named files into the page cache, newest hints last, each file once at a time."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self.stats = ReadaheadStats()
        self._pending: OrderedDict[Path, None] = OrderedDict()
        self._busy = False
        self._cond = threading.Condition()
        self._closed = False
        self._buffer = bytearray(chunk_bytes)
        self._thread = threading.Thread(target=self._run, name="katz-lora-readahead", daemon=True)
        self._thread.start()

    def hint(self, paths) -> None:
        """Queue ``paths`` for reading (returns at once); a path already waiting is not queued twice."""
        with self._cond:
            for path in paths:
                path = Path(path)
                self.stats.hints += 1
                if path in self._pending:
                    continue
                if len(self._pending) >= MAX_PENDING:
                    self._pending.popitem(last=False)
                    self.stats.dropped += 1
                self._pending[path] = None
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued file has been handled; False if ``timeout`` (s) passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                path, _ = self._pending.popitem(last=False)
                self._busy = True
            try:
                self._read(path)
            except OSError:
                with self._cond:
                    self.stats.errors += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _read(self, path: Path) -> None:
        start = time.perf_counter()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            chunks = missing_chunks(fd, os.fstat(fd).st_size, self.chunk_bytes)
            if not chunks:
                with self._cond:
                    self.stats.resident += 1
                return
            read = sum(self._read_chunk(fd, offset, length) for offset, length in chunks)
        finally:
            os.close(fd)
        with self._cond:
            self.stats.files_read += 1
            self.stats.bytes_read += read
            self.stats.read_seconds += time.perf_counter() - start

    def _read_chunk(self, fd: int, offset: int, length: int) -> int:
        view = memoryview(self._buffer)[:length]
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:  # the file shrank: the loader will say what is wrong with it
                break
            done += n
        return done
