"""How much of a cold LoRA read the preprocessing readahead takes off the UNet's path.

    python bench/lora_readahead.py [--rank 64 --dtype float16] [--head-start-ms 30] [--repeats 3]

Writes issue 3's benchmark LoRA (rank 64 on every attention projection of the full-size SDXL UNet,
186 MB in float16; the UNet is built on the meta device, so this runs on any machine) and times,
each from a cold page cache (the file's pages evicted with POSIX_FADV_DONTNEED):

* stock: ``safetensors.torch.load_file`` (what diffusers' ``load_lora_weights`` reads with);
* Katz's loader read (``katz.lora.safetensors.read_lora_bytes``, the UNet's tensors, parallel preadv);
* the same read once the readahead has finished (a request that waited in the queue);
* the same read with the readahead started ``--head-start-ms`` before it (no queue: the head
  start is the text encoders' time, ~26 ms for SDXL on an H100).

Prints one table with ratios to the stock read. This measures storage, not the GPU: the page
cache and the disk of the machine it runs on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sdxl_random import write_lora  # noqa: E402
from katz.lora.safetensors import read_lora_bytes  # noqa: E402
from katz.lora.readahead import LoraReadahead, evict, resident_fraction  # noqa: E402


def make_cold(path: Path) -> float | None:
    """Drop ``path`` from the page cache; returns the share still resident (None: unknown)."""
    evict(path)
    return resident_fraction(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--head-start-ms", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write the LoRA (default: a temp folder)")
    args = p.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="katz-readahead-"))
    path = write_lora(folder / "style.safetensors", rank=args.rank, dtype=args.dtype)
    size_mb = path.stat().st_size / 1e6
    buf = torch.empty(path.stat().st_size, dtype=torch.uint8)
    alloc = lambda n: buf[:n]  # noqa: E731  (one reusable buffer, as the manager's staging buffer)

    def katz_read() -> None:
        read_lora_bytes(path, "style", ("unet",), alloc)

    def stock_read() -> None:
        from safetensors.torch import load_file

        load_file(str(path))

    ra = LoraReadahead()

    def after_readahead() -> None:  # untimed part: the request waited in the queue meanwhile
        ra.hint([path])
        ra.wait_idle()

    cases = {
        "stock safetensors load_file, cold": (None, stock_read),
        "Katz loader read, cold": (None, katz_read),
        "Katz loader read, readahead done (queued request)": (after_readahead, katz_read),
        f"Katz loader read, readahead {args.head_start_ms:.0f} ms ahead": (
            lambda: (ra.hint([path]), time.sleep(args.head_start_ms / 1e3)), katz_read),
        "Katz loader read, page cache warm": ("warm", katz_read),
    }
    results, residency = {}, []
    for name, (before, fn) in cases.items():
        times = []
        for _ in range(args.repeats):
            if before == "warm":
                katz_read()
            else:
                residency.append(make_cold(path))
                if before is not None:
                    before()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            ra.wait_idle()
        results[name] = statistics.median(times)
    ra.close()
    st = ra.stats

    known = [r for r in residency if r is not None]
    print(f"LoRA rank {args.rank} {args.dtype}: {size_mb:.0f} MB at {path}; "
          f"resident after eviction: {max(known):.1%} at most" if known else "residency unknown (no mincore)")
    base = results["stock safetensors load_file, cold"]
    print(f"{'case':55} {'s':>7} {'MB/s':>7} {'vs stock':>8}")
    for name, s in results.items():
        print(f"{name:55} {s:7.3f} {size_mb / s:7.0f} {s / base:8.2f}")
    if st.read_seconds:
        print(f"the readahead itself: {st.bytes_read / 1e6:.0f} MB read in {st.read_seconds:.2f} s "
              f"({st.bytes_read / 1e6 / st.read_seconds:.0f} MB/s, one thread)")


if __name__ == "__main__":
    main()
