"""Reading ``.safetensors`` LoRA files fast: a strict header parser and parallel reads into one buffer.

A safetensors file is ``[N: u64 little-endian][N bytes of JSON header][data region]``. The header
maps each tensor name to ``{"dtype": "F16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}``
(byte offsets into the data region) and may hold ``"__metadata__": {str: str}``. Nothing is ever
unpickled. :func:`read_lora_bytes` parses and checks the header as strictly as the safetensors
library does (the tensors' byte ranges cover the data region exactly, without gaps or overlaps),
then reads the byte ranges of the wanted tensors with ``os.preadv`` from several threads (the GIL
is released while they wait for the disk) straight into a caller-given buffer, which may be pinned
host memory that is then uploaded to a GPU in one copy. The tensors it returns are views into that
buffer, laid out as in the file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from katz.errors import LoraError, lora_error

# The LoRA tensor dtypes accepted (safetensors' names).
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
READ_THREADS = 8
MAX_CHUNK_BYTES = 16 << 20  # one preadv call reads at most this many bytes
MIN_CHUNK_BYTES = 1 << 20
# Read the whole data region in one go when the wanted tensors make up at least this share of it.
WHOLE_REGION_FRACTION = 0.75
# Wanted byte spans closer than this are read as one span (the gap is read and ignored).
MERGE_GAP_BYTES = 1 << 20
ALIGN = 64  # a span starts in the buffer at the same offset modulo ALIGN as in the data region


@dataclass(frozen=True)
class TensorSpec:
    """One header entry: ``dtype``, ``shape``, and its bytes ``[begin, end)`` in the data region."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: ``tensors`` (sorted by name, as safetensors lists them),
    ``metadata`` (``__metadata__``, str -> str), ``data_start`` (file offset of the data region,
    ``8 + N``) and ``data_size`` (bytes of the data region)."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_start: int
    data_size: int


@dataclass(frozen=True)
class ReadPlan:
    """Where the wanted tensors go in the read buffer.

    ``ranges``: ``(begin in the data region, byte count, offset in the buffer)`` per read; a range
    starts in the buffer at the same offset modulo :data:`ALIGN` as in the data region, so a tensor
    aligned in the file is aligned in the buffer. ``offsets``: wanted name -> byte offset of its data
    in the buffer. ``nbytes``: the buffer size needed (bytes).
    """

    ranges: tuple[tuple[int, int, int], ...]
    offsets: dict[str, int]
    nbytes: int


@dataclass
class LoraRead:
    """The bytes :func:`read_lora_bytes` read for the LoRA ``name``: ``buffer`` (uint8
    ``[plan.nbytes]``) holds the tensors ``keys`` (sorted) of ``header`` where ``plan`` says;
    ``components`` is what was asked for (None: all)."""

    name: str
    components: tuple[str, ...] | None
    header: Header
    plan: ReadPlan
    keys: list[str]
    buffer: torch.Tensor
    # what ``read_lora_bytes(..., overlap=f)``'s ``f`` returned or raised while the bytes were read
    overlapped: object = None
    overlap_error: BaseException | None = None
    # while ``overlap`` runs: the reads in flight, ``(buffer offset, bytes, future)`` in buffer order
    # (a future's result raises that read's error); empty otherwise
    chunks: list = field(default_factory=list)

    def tensors(self, buffer: torch.Tensor | None = None, floats: bool = False) -> dict[str, torch.Tensor]:
        """name -> tensor as views into ``buffer`` (default: the read buffer; else a byte copy of it,
        on any device), with diffusers' ``lora_adapter_metadata`` alphas folded in as float64 CPU
        scalars (``floats``: as Python floats, which :func:`parse_lora` also takes, and cheaper on a
        load's critical path). A tensor at an offset that is not a multiple of its dtype size is
        copied (on the buffer's device) instead of viewed."""
        tensors = tensor_views(self.buffer if buffer is None else buffer, self.header, self.plan, self.keys)
        raw = self.header.metadata.get(DIFFUSERS_METADATA_KEY)
        if raw and tensors:
            fold_diffusers_metadata(tensors, raw, self.name, floats)
            tensors = {k: v for k, v in tensors.items() if in_components(k, self.components)}
        return tensors


def _invalid(name: str, filename: str, reason: str) -> LoraError:
    return lora_error(name, f"file {filename} is not a valid safetensors file ({reason})")


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from file ``offset``; returns the byte count read (0 at end of file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from file ``offset`` (short reads are continued); EOFError at the end of the file."""
    while len(view):
        got = _pread_into(fd, view, offset)
        if got <= 0:
            raise EOFError(f"the file ended at byte {offset}")
        view, offset = view[got:], offset + got


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(fd: int, file_size: int, filename: str, name: str) -> Header:
    """Read and check the header of the open safetensors file ``fd`` (``file_size`` bytes).

    Raises :class:`LoraError` naming the LoRA ``name`` and the file ``filename`` when the file is
    shorter than its header says, the header is not a JSON object of well-formed entries, a
    tensor's byte count is not ``numel * itemsize``, the tensors' byte ranges leave gaps, overlap
    or run past the end of the file, or a dtype is not one of :data:`DTYPES`.
    """
    if file_size < 8:
        raise _invalid(name, filename, f"{file_size} bytes, shorter than the 8-byte header length")
    length = bytearray(8)
    _read_exact(fd, memoryview(length), 0)
    n = int.from_bytes(length, "little")
    if n > MAX_HEADER_BYTES:
        raise _invalid(name, filename, f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise _invalid(name, filename, f"the {n}-byte header runs past the end of the {file_size}-byte file")
    raw = bytearray(n)
    try:
        _read_exact(fd, memoryview(raw), 8)
    except EOFError as e:
        raise _invalid(name, filename, str(e)) from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _invalid(name, filename, f"the header is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _invalid(name, filename, "the header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(name, filename, "__metadata__ is not a map of strings to strings")
    data_size = file_size - 8 - n
    tensors: dict[str, TensorSpec] = {}
    for key in sorted(obj):
        entry = obj[key]
        if not isinstance(entry, dict):
            raise _invalid(name, filename, f"the header entry of tensor {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise _invalid(name, filename, f"tensor {key!r} has no dtype")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _invalid(name, filename, f"tensor {key!r} has shape {shape!r}, not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise _invalid(name, filename, f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end]")
        if dtype not in DTYPES:
            raise lora_error(
                name,
                f"tensor {key!r} in file {filename} has dtype {dtype}; "
                f"LoRA tensors must be {', '.join(DTYPES)}",
            )
        begin, end = offsets
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if end < begin or end - begin != want:
            raise _invalid(
                name, filename, f"tensor {key!r} has data_offsets {offsets} but {dtype} {shape} takes {want} bytes"
            )
        tensors[key] = TensorSpec(DTYPES[dtype], tuple(shape), begin, end)
    covered = 0
    for key, spec in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if spec.begin < covered:
            raise _invalid(name, filename, f"the data of tensor {key!r} overlaps another tensor's")
        if spec.begin > covered:
            raise _invalid(name, filename, f"data bytes {covered}..{spec.begin} belong to no tensor")
        covered = spec.end
    if covered > data_size:
        raise _invalid(
            name, filename, f"the tensors need {covered} data bytes but the file has {data_size} (truncated?)"
        )
    if covered < data_size:
        raise _invalid(name, filename, f"the last {data_size - covered} bytes of the file belong to no tensor")
    return Header(tensors=tensors, metadata=dict(metadata), data_start=8 + n, data_size=data_size)


def plan_read(header: Header, keys: Sequence[str]) -> ReadPlan:
    """Which bytes to read for the tensors ``keys`` of ``header``, and where they go in the buffer.

    The whole data region when ``keys`` take at least :data:`WHOLE_REGION_FRACTION` of it; else the
    tensors' byte spans, merged where less than :data:`MERGE_GAP_BYTES` apart.
    """
    specs = sorted((header.tensors[k].begin, header.tensors[k].end, k) for k in keys)
    wanted = sum(end - begin for begin, end, _ in specs)
    spans: list[list[int]] = []
    if specs and wanted >= WHOLE_REGION_FRACTION * header.data_size:
        spans = [[0, header.data_size]]
    else:
        for begin, end, _ in specs:
            if spans and begin - spans[-1][1] < MERGE_GAP_BYTES:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([begin, end])
    ranges, pos = [], 0
    for begin, end in spans:
        pos += (begin - pos) % ALIGN
        ranges.append((begin, end - begin, pos))
        pos += end - begin
    offsets, i = {}, 0
    for begin, _end, key in specs:  # specs and ranges are both in file order
        while i + 1 < len(ranges) and ranges[i + 1][0] <= begin:
            i += 1
        offsets[key] = ranges[i][2] + begin - ranges[i][0]
    return ReadPlan(ranges=tuple(ranges), offsets=offsets, nbytes=pos)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="katz-lora-read")
        return _pool


def read_ranges(fd: int, buffer: torch.Tensor, data_start: int, ranges: Sequence[tuple[int, int, int]]) -> None:
    """Read the data-region ``ranges`` of :class:`ReadPlan` from ``fd`` into ``buffer`` (CPU uint8, contiguous).

    Large reads are cut into chunks of 1-16 MB (about two per thread) that :data:`READ_THREADS`
    threads read in parallel; raises EOFError if the file ends early, OSError on a read error.
    """
    job, jobs = _read_jobs(fd, buffer, data_start, ranges)
    if len(jobs) == 1:
        job(jobs[0])  # no thread hop for one chunk
    else:
        wait_reads([_read_pool().submit(job, j) for j in jobs])


def start_reads(fd: int, buffer: torch.Tensor, data_start: int, ranges: Sequence[tuple[int, int, int]]) -> list:
    """:func:`read_ranges` without waiting: the reads run on the read threads, in buffer order; returns
    ``(buffer offset, bytes, future)`` per chunk (for :func:`wait_reads`; ``fd`` and ``buffer`` must
    stay valid until then)."""
    job, jobs = _read_jobs(fd, buffer, data_start, ranges)
    pool = _read_pool()
    return [(at, n, pool.submit(job, (offset, at, n))) for offset, at, n in jobs]


def _read_jobs(fd: int, buffer: torch.Tensor, data_start: int, ranges: Sequence[tuple[int, int, int]]):
    """The chunks of a read, ``(file offset, buffer offset, bytes)``, and the function reading one."""
    total = sum(n for _, n, _ in ranges)
    if not total:
        return None, []
    chunk = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, -(-total // (2 * READ_THREADS))))
    view = memoryview(buffer.numpy()).cast("B")
    jobs = [
        (data_start + begin + i, at + i, min(chunk, n - i)) for begin, n, at in ranges for i in range(0, n, chunk)
    ]

    def job(j: tuple[int, int, int]) -> None:
        file_offset, at, n = j
        _read_exact(fd, view[at : at + n], file_offset)

    return job, jobs


def wait_reads(futures: list) -> None:
    """Wait for every read of :func:`start_reads` (or plain futures); then raise the first one's error, if any."""
    errors = [(f[2] if isinstance(f, tuple) else f).exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def tensor_views(buffer: torch.Tensor, header: Header, plan: ReadPlan, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``keys`` -> views of their bytes in ``buffer`` as ``dtype[shape]``; a tensor whose buffer offset
    is not a multiple of its dtype size cannot be viewed and is copied instead.

    A LoRA has hundreds to thousands of tensors and this runs on a cold load's critical path, so each
    view is one ``as_strided`` of a typed view of the whole buffer (made once per dtype) rather than
    a slice and two views per tensor."""
    out: dict[str, torch.Tensor] = {}
    typed: dict[torch.dtype, torch.Tensor] = {}
    for key in keys:
        spec, at = header.tensors[key], plan.offsets[key]
        dtype = spec.dtype
        size = dtype.itemsize
        if at % size:
            out[key] = buffer[at : at + spec.nbytes].clone().view(dtype).view(spec.shape)
            continue
        base = typed.get(dtype)
        if base is None:
            base = typed[dtype] = buffer[: buffer.numel() - buffer.numel() % size].view(dtype)
        shape = spec.shape
        strides, stride = [0] * len(shape), 1
        for i in range(len(shape) - 1, -1, -1):
            strides[i] = stride
            stride *= shape[i]
        out[key] = base.as_strided(shape, strides, base.storage_offset() + at // size)
    return out


def read_lora_bytes(
    path: str | Path,
    name: str,
    components: Sequence[str] | None,
    alloc: Callable[[int], torch.Tensor],
    overlap: Callable[[LoraRead], object] | None = None,
    first: Callable[[str], bool] | None = None,
) -> LoraRead:
    """Read the bytes of the tensors of ``components`` (None: all) of the safetensors LoRA ``path``.

    ``alloc(nbytes)`` returns the CPU uint8 buffer ``[nbytes]`` to read into (a fresh tensor, or a
    slice of a reusable, possibly pinned, staging buffer). ``components`` keeps the semantics of
    :func:`katz.lora.safetensors.read_lora_file`: keys of no known component are always read. Raises
    :class:`LoraError` naming ``name``; :meth:`LoraRead.tensors` makes the tensors.

    ``overlap(read)`` runs on the calling thread while the read threads fill the buffer (work that
    needs the header, not the bytes: parsing names, planning views; or uploading each chunk as
    ``read.chunks`` says it is in); the tensors whose keys ``first`` accepts (small ones, e.g. alphas)
    are in the buffer already when it starts. What it returns or raises is kept in
    ``read.overlapped`` / ``read.overlap_error``; an error of the read itself is raised first.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise lora_error(name, f"file {path.name} is not a .safetensors file (only safetensors LoRAs are accepted)")
    if not path.is_file():
        raise lora_error(name, f"file {path.name} does not exist")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:  # deleted since the check above
        raise lora_error(name, f"file {path.name} does not exist") from None
    except OSError as e:
        raise lora_error(name, f"file {path.name} could not be opened ({type(e).__name__}: {e})") from None
    try:
        header = read_header(fd, os.fstat(fd).st_size, path.name, name)
        if not header.tensors and components is None:
            raise lora_error(name, f"file {path.name} contains no tensors")
        comps = None if components is None else tuple(components)
        keys = [k for k in header.tensors if in_components(k, comps)]
        plan = plan_read(header, keys)
        buffer = alloc(plan.nbytes)
        read = LoraRead(name=name, components=comps, header=header, plan=plan, keys=keys, buffer=buffer)
        if overlap is None:
            read_ranges(fd, buffer, header.data_start, plan.ranges)
            return read
        view = memoryview(buffer.numpy()).cast("B")
        for key in keys if first is not None else ():
            if first(key):
                spec, at = header.tensors[key], plan.offsets[key]
                _read_exact(fd, view[at : at + spec.nbytes], header.data_start + spec.begin)
        read.chunks = start_reads(fd, buffer, header.data_start, plan.ranges)
        try:
            read.overlapped = overlap(read)
        except Exception as e:  # reported by the caller, after the read's own errors
            read.overlap_error = e
        finally:
            chunks, read.chunks = read.chunks, []
            wait_reads(chunks)  # before the file is closed, also when overlap failed
        return read
    except EOFError as e:  # the file shrank after its header was read
        raise _invalid(name, path.name, str(e)) from None
    except OSError as e:
        raise lora_error(name, f"file {path.name} could not be read ({type(e).__name__}: {e})") from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- #
# LoRA files: components, diffusers' metadata, the reader the rest of Katz calls
# --------------------------------------------------------------------------- #
# diffusers' safetensors header entry holding the peft LoraConfig of each component.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# file-key prefixes of each component, in the formats parse_lora reads
COMPONENT_PREFIXES = {
    "unet": ("unet.", "lora_unet_"),
    # kohya names FLUX's transformer 'unet' too: which component lora_unet_ is depends on the family
    "transformer": ("transformer.", "lora_unet_"),
    "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_"),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_"),
}


def read_lora_file(
    path: str | Path, name: str, components: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` LoRA into CPU tensors (never unpickles anything).

    The header is checked strictly and the wanted bytes are read in parallel into one buffer
    (see :mod:`katz.lora.safetensors`); the tensors are views into that buffer.

    ``components`` (e.g. ``["text_encoder", "text_encoder_2"]``) reads only
    those components' tensors: a text-encoder model then skips the (large) UNet
    part of the file. Keys of no known component are always read, so that
    :func:`parse_lora` still reports them.

    diffusers writes the alpha of peft-format LoRAs into the safetensors header
    (``lora_adapter_metadata``: a peft ``LoraConfig`` per component); it is folded into the
    returned dict as ``<component>.<module path>.alpha`` scalars, so :func:`parse_lora` needs
    only the tensors. Any failure raises :class:`LoraError` naming ``name``.
    """
    return read_lora_bytes(path, name, components, lambda n: torch.empty(n, dtype=torch.uint8)).tensors()


_KNOWN_PREFIXES = tuple(p for ps in COMPONENT_PREFIXES.values() for p in ps)


@functools.lru_cache(maxsize=64)
def component_prefixes(components: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for c in components for p in COMPONENT_PREFIXES[c])


def in_components(key: str, components: Sequence[str] | None) -> bool:
    """Whether a file key belongs to ``components`` (None: all); keys of no known component always do."""
    if components is None:
        return True
    return key.startswith(component_prefixes(tuple(components))) or not key.startswith(_KNOWN_PREFIXES)


def _peft_pattern_match(patterns: Mapping[str, object], module_path: str):
    """Value of the first peft ``rank_pattern`` / ``alpha_pattern`` entry matching ``module_path``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return None


def fold_diffusers_metadata(tensors: dict[str, torch.Tensor], raw: str, name: str, floats: bool = False) -> None:
    """Add the alpha of each peft-format layer of ``tensors`` from diffusers' header entry ``raw``, as
    ``<component>.<module path>.alpha``: a float64 0-dim tensor, or (``floats``) a Python float."""
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise lora_error(name, f"unreadable {DIFFUSERS_METADATA_KEY} in the file header ({e})") from None
    for component in COMPONENT_PREFIXES:
        cfg = {k[len(component) + 1 :]: v for k, v in meta.items() if k.startswith(component + ".")}
        if not cfg:
            continue
        if cfg.get("use_dora"):
            raise lora_error(name, f"DoRA LoRAs are not supported ({component} has use_dora=true)")
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        prefix, suffix = component + ".", ".lora_A.weight"
        for key, down in list(tensors.items()):
            if not (key.startswith(prefix) and key.endswith(suffix)):
                continue
            module_path = key[len(prefix) : -len(suffix)]
            alpha_key = f"{prefix}{module_path}.alpha"
            if alpha_key in tensors:
                continue
            try:
                r_cfg = _peft_pattern_match(rank_pattern, module_path)
                r_cfg = float(cfg.get("r", 8) if r_cfg is None else r_cfg)
                alpha = _peft_pattern_match(alpha_pattern, module_path)
                alpha = float(cfg.get("lora_alpha", 8) if alpha is None else alpha)
            except (TypeError, ValueError, re.error) as e:
                raise lora_error(name, f"bad {DIFFUSERS_METADATA_KEY} for {component} ({e})") from None
            # peft scales by alpha / r_cfg (alpha / sqrt(r_cfg) with rslora); express that as an
            # alpha for the tensor's own rank.
            rank = down.shape[0] if down.ndim else 1
            scaling = alpha / math.sqrt(r_cfg) if cfg.get("use_rslora") else alpha / r_cfg
            tensors[alpha_key] = scaling * rank if floats else torch.tensor(scaling * rank, dtype=torch.float64)
