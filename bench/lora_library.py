"""A LoRA library on disk for traffic benchmarks: many files with a model's real UNet target shapes.

    python bench/lora_library.py --model-dir /tmp/sdxl-random --out /tmp/katz-traffic/loras --count 200
    python bench/lora_library.py --model-dir ~/.cache/katz/presets/tiny-sdxl-v2 --out /tmp/l --count 8 --ranks 4,8

File ``i`` is ``<prefix><i:03d>.safetensors`` (the names ``katz trace synth --num-loras`` draws from,
most popular first). Each one adapts to_q/to_k/to_v/to_out.0 of every attention of the model's UNet
(the shapes come from the folder's ``unet/config.json``, built on the meta device): a rank drawn
from ``--ranks`` per file, fp16 weights. Even-numbered files use diffusers/peft names
(``unet.<path>.lora_A.weight``, alpha in diffusers' ``lora_adapter_metadata`` header entry),
odd-numbered ones kohya names as kohya's SDXL trainer writes them (``lora_unet_input_blocks_4_1_...``,
the original-SD block numbering, ``lora_down``/``lora_up`` and an ``.alpha`` tensor); so every band
of popularity holds both formats. Alpha is rank / 2 everywhere.

Fast on big libraries (a full-size SDXL library of 200 files is ~28 GB): the values are not drawn
per file. A few pools of seeded N(0, 1) fp16 values are made once, one per scale a tensor needs
(1/sqrt(in_features) for down, 1/sqrt(rank) for up, as :func:`katz.lora.make_random_lora` scales
them), and every tensor is a slice of its pool at an offset drawn from the file's own seeded
generator, written straight from the pool's memory (no copy, no arithmetic); files are written by
a few threads at once. So a file's bytes depend only on (seed, index): a rerun, on this machine or
another, writes the same library. Each file is written under a temporary name and renamed when
complete; a file already there with its expected size is kept (resumable). ``library.json`` beside
the files lists each one's rank, format and size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RANKS = (8, 16, 32, 64, 128)
FORMATS = ("peft", "kohya")
MANIFEST = "library.json"
# Pool length (elements) per scale: larger than any one tensor (rank 128 x 2048 in SDXL = 262,144)
# so slices at random offsets differ between tensors and files; 8M fp16 values = 16 MB per pool.
POOL_ELEMENTS = 8 << 20
_ATTN = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


@dataclass(frozen=True)
class Target:
    path: str  # diffusers module path in the UNet, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    in_features: int
    out_features: int


def unet_targets(model_dir: Path) -> tuple[list[Target], int]:
    """The UNet's attention projections (module path, in, out) and its ``layers_per_block``, from
    ``<model_dir>/unet/config.json`` (the UNet is built on the meta device: no weights are read)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    targets = [Target(n, m.in_features, m.out_features) for n, m in unet.named_modules()
               if _ATTN.search(n) and isinstance(m, torch.nn.Linear)]
    if not targets:
        raise SystemExit(f"{model_dir}/unet has no attention projections to put a LoRA on")
    layers = config.get("layers_per_block", 2)
    return targets, layers if isinstance(layers, int) else -1


def kohya_name(path: str, layers_per_block: int) -> str:
    """The kohya key stem of a diffusers UNet module path, in original-SD (sgm) block numbering as
    kohya's SDXL trainer writes it: ``down_blocks.B.attentions.L`` -> ``input_blocks.{1 + B*(n+1) + L}.1``,
    ``mid_block.attentions.0`` -> ``middle_block.1``, ``up_blocks.B.attentions.L`` ->
    ``output_blocks.{B*(n+1) + L}.1`` (n = layers_per_block); then '.' -> '_'. With no integer
    ``layers_per_block`` the diffusers path itself is flattened (kohya's naming for diffusers models)."""
    n = layers_per_block
    if n > 0:
        m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
        if m:
            path = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
        elif path.startswith("mid_block.attentions.0."):
            path = "middle_block.1." + path[len("mid_block.attentions.0."):]
        else:
            m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
            if m:
                path = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    return "lora_unet_" + path.replace(".", "_")


@dataclass(frozen=True)
class Entry:
    name: str
    index: int
    rank: int
    fmt: str


def plan(count: int, ranks=RANKS, seed: int = 0, prefix: str = "lora-") -> list[Entry]:
    """File ``i``: format by parity (even peft, odd kohya), rank from a generator seeded by (seed, i),
    so a file's rank does not change when ``count`` does."""
    out = []
    for i in range(count):
        rank = int(np.random.default_rng([seed, i, 1]).choice(ranks))
        out.append(Entry(f"{prefix}{i:03d}", i, rank, FORMATS[i % 2]))
    return out


def _layout(entry: Entry, targets: list[Target], layers_per_block: int):
    """The file's header bytes and its tensors in file order: ``(key, numel, pool scale)``; ``None``
    as scale marks kohya's alpha scalar (written as its fp16 value, not from a pool)."""
    r = entry.rank
    tensors = []  # (key, shape, scale)
    for t in targets:
        if entry.fmt == "peft":
            stem = f"unet.{t.path}"
            tensors += [(f"{stem}.lora_A.weight", (r, t.in_features), 1 / math.sqrt(t.in_features)),
                        (f"{stem}.lora_B.weight", (t.out_features, r), 1 / math.sqrt(r))]
        else:
            stem = kohya_name(t.path, layers_per_block)
            tensors += [(f"{stem}.alpha", (), None),
                        (f"{stem}.lora_down.weight", (r, t.in_features), 1 / math.sqrt(t.in_features)),
                        (f"{stem}.lora_up.weight", (t.out_features, r), 1 / math.sqrt(r))]
    tensors.sort(key=lambda x: x[0])  # safetensors' own order (one dtype): by name
    header: dict = {}
    offset, layout = 0, []
    for key, shape, scale in tensors:
        numel = math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + 2 * numel]}
        offset += 2 * numel
        layout.append((key, numel, scale))
    if entry.fmt == "peft":  # what diffusers writes and reads back: the peft LoraConfig per component
        meta = {"unet.r": r, "unet.lora_alpha": r / 2, "unet.target_modules": sorted(t.path for t in targets)}
        header["__metadata__"] = {"lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    else:
        header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(raw)) + raw, layout, offset


def file_size(entry: Entry, targets: list[Target], layers_per_block: int) -> int:
    head, _, data = _layout(entry, targets, layers_per_block)
    return len(head) + data


class Pools:
    """Seeded N(0, 1) fp16 values times each scale a tensor needs, made on first use."""

    def __init__(self, seed: int, elements: int = POOL_ELEMENTS):
        self.seed, self.elements = seed, elements
        self._base = None
        self._scaled: dict[float, memoryview] = {}

    def get(self, scale: float) -> memoryview:
        if scale not in self._scaled:
            if self._base is None:
                self._base = np.random.default_rng([self.seed, 0]).standard_normal(self.elements, dtype=np.float32)
            self._scaled[scale] = memoryview((self._base * scale).astype(np.float16).view(np.uint8))
        return self._scaled[scale]

    def prepare(self, scales) -> None:
        """Make every pool before threads share them (dict writes from several threads would race)."""
        for s in scales:
            self.get(s)


def write_file(path: Path, entry: Entry, targets: list[Target], layers_per_block: int, pools: Pools,
               seed: int) -> int:
    """Write one LoRA file (under a temporary name, then renamed); returns its size."""
    head, layout, _ = _layout(entry, targets, layers_per_block)
    rng = np.random.default_rng([seed, entry.index, 2])
    alpha = np.float16(entry.rank / 2).tobytes()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pending, size = [head], len(head)
        for key, numel, scale in layout:
            if scale is None:
                chunk = alpha
            else:
                start = int(rng.integers(0, pools.elements - numel + 1))
                chunk = pools.get(scale)[2 * start: 2 * (start + numel)]
            pending.append(chunk)
            size += len(chunk)
            if len(pending) >= 512:  # os.writev takes at most IOV_MAX (1024) buffers
                _writev_all(fd, pending)
                pending = []
        _writev_all(fd, pending)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return size


def _writev_all(fd: int, buffers: list) -> None:
    buffers = [memoryview(b).cast("B") for b in buffers]
    while buffers:
        n = os.writev(fd, buffers)
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers.pop(0)
        if buffers and n:
            buffers[0] = buffers[0][n:]


def ensure_library(out: Path, model_dir: Path, count: int, ranks=RANKS, seed: int = 0, prefix: str = "lora-",
                   threads: int = 4, log=print) -> dict:
    """Write the files of the library that are missing or of the wrong size; return the manifest
    (also written to ``<out>/library.json``) with the time taken and the bytes written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # a file a killed writer left half-written
        stale.unlink()
    start = time.perf_counter()
    targets, layers = unet_targets(model_dir)
    entries = plan(count, ranks, seed, prefix)
    sizes = {e.name: file_size(e, targets, layers) for e in entries}
    todo = [e for e in entries
            if not (out / f"{e.name}.safetensors").is_file()
            or (out / f"{e.name}.safetensors").stat().st_size != sizes[e.name]]
    pools = Pools(seed)
    pools.prepare({s for e in todo for _, _, s in _layout(e, targets, layers)[1] if s is not None})
    write_start = time.perf_counter()
    written = 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = [pool.submit(write_file, out / f"{e.name}.safetensors", e, targets, layers, pools, seed) for e in todo]
        for job in jobs:
            written += job.result()
    took = time.perf_counter() - start
    write_s = time.perf_counter() - write_start
    total = sum(sizes.values())
    manifest = {
        "count": count, "seed": seed, "prefix": prefix, "ranks": list(ranks), "dtype": "float16",
        "targets": len(targets), "layers_per_block": layers, "model_dir": str(model_dir),
        "total_bytes": total, "written_bytes": written, "written_files": len(todo), "seconds": took,
        "write_seconds": write_s,
        "files": [{"name": e.name, "rank": e.rank, "format": e.fmt, "bytes": sizes[e.name]} for e in entries],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    rate = written / write_s / 1e9 if write_s > 0 else float("nan")
    log(f"LoRA library {out}: {count} files, {total / 1e9:.2f} GB ({len(targets)} targets, ranks "
        f"{','.join(map(str, ranks))}); wrote {len(todo)} files, {written / 1e9:.2f} GB in {took:.1f}s "
        f"(writing {write_s:.1f}s, {rate:.2f} GB/s into the page cache; the first eviction writes them out)")
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True,
                   help="diffusers folder whose unet/config.json gives the shapes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--prefix", default="lora-")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()
    ensure_library(args.out, args.model_dir, args.count, tuple(int(r) for r in args.ranks.split(",")),
                   args.seed, args.prefix, args.threads)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
