"""Page-cache readahead of requested LoRA files (katz.lora.readahead) and its use in preprocessing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from katz.lora.readahead import LoraReadahead, evict, missing_chunks, resident_fraction

MB = 1 << 20


def _write(path: Path, nbytes: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
    return path


@pytest.fixture
def cold_file(tmp_path):
    """A 24 MB file evicted from the page cache (skips where this file system cannot evict, e.g. tmpfs)."""
    path = _write(tmp_path / "big.safetensors", 24 * MB)
    evict(path)
    frac = resident_fraction(path)
    if frac is None:
        pytest.skip("mincore is not available here")
    if frac > 0.5:
        pytest.skip(f"this file system keeps evicted pages ({frac:.0%} resident after POSIX_FADV_DONTNEED)")
    return path


def test_readahead_brings_a_cold_file_into_the_page_cache(cold_file):
    ra = LoraReadahead(chunk_bytes=4 * MB)
    try:
        ra.hint([cold_file])
        assert ra.wait_idle(timeout=60)
        assert resident_fraction(cold_file) == 1.0
        assert ra.stats.files_read == 1 and ra.stats.resident == 0 and ra.stats.errors == 0
        assert ra.stats.bytes_read >= 20 * MB  # the file's pages that were not resident, in whole chunks
        # again: everything is resident now, nothing is read
        ra.hint([cold_file])
        assert ra.wait_idle(timeout=60)
        assert ra.stats.resident == 1 and ra.stats.files_read == 1
    finally:
        ra.close()


def test_only_missing_chunks_are_read(cold_file):
    fd = os.open(cold_file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.pread(fd, 4 * MB, 8 * MB)  # chunk 2 (of 6 chunks of 4 MB) now in the page cache
        chunks = missing_chunks(fd, size, 4 * MB)
    finally:
        os.close(fd)
    assert (8 * MB, 4 * MB) not in chunks
    assert chunks == [(o, 4 * MB) for o in (0, 4 * MB, 12 * MB, 16 * MB, 20 * MB)]


def test_a_missing_file_is_counted_not_raised(tmp_path):
    ra = LoraReadahead()
    try:
        ra.hint([tmp_path / "gone.safetensors"])
        assert ra.wait_idle(timeout=10)
        assert ra.stats.errors == 1 and ra.stats.files_read == 0
        ok = _write(tmp_path / "ok.safetensors", MB)  # the thread lives on
        ra.hint([ok])
        assert ra.wait_idle(timeout=10)
        assert ra.stats.files_read + ra.stats.resident == 1
    finally:
        ra.close()


def test_a_path_waiting_is_queued_once(tmp_path):
    ra = LoraReadahead()
    try:
        paths = [_write(tmp_path / f"{i}.safetensors", 4096) for i in range(3)]
        with ra._cond:  # the thread cannot take a hint while this (re-entrant) lock is held
            ra.hint([paths[0], paths[1], paths[0], paths[2], paths[1]])
            assert list(ra._pending) == paths
        assert ra.wait_idle(timeout=10)
        assert ra.stats.hints == 5
        assert ra.stats.files_read + ra.stats.resident == 3
    finally:
        ra.close()


# ---------------------------------------------------------------- preprocessing
def _preprocessing(preset_path: Path, lora_dir: Path, readahead: bool = True):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.preprocessing import Preprocessing

    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, lora_dir, Limits(), lora_readahead=readahead, controlnet_mode="inline")
    return Preprocessing(dep)


def _request(*loras: str) -> dict:
    r = {"prompt": np.array([b"a photo of a cat"], object), "seed": np.array([1], np.int64)}
    if loras:
        r["loras"] = np.array([n.encode() for n in loras], object)
    return r


@pytest.fixture
def loras(preset_dir, tmp_path) -> Path:
    """A copy of tiny-sdxl's LoRA folder."""
    shutil.copytree(preset_dir("tiny-sdxl") / "loras", tmp_path / "loras")
    return tmp_path / "loras"


@pytest.fixture
def recording(preset_dir, loras):
    """tiny-sdxl's preprocessing whose readahead only records the paths it is handed."""
    pre = _preprocessing(preset_dir("tiny-sdxl"), loras)
    seen: list[Path] = []
    pre.readahead.hint = lambda paths: seen.extend(paths)
    return pre, seen


def test_preprocessing_reads_ahead_the_requested_loras(recording, loras):
    pre, seen = recording
    pre.execute(_request("style", "detail"))
    assert seen == [loras / "style.safetensors", loras / "detail.safetensors"]
    pre.execute(_request())  # no LoRA: nothing to read
    assert len(seen) == 2


def test_preprocessing_reads_nothing_for_a_bad_request(recording):
    from katz.errors import InvalidArgument

    pre, seen = recording
    for bad in ("nosuch", "../style", "a/b"):
        with pytest.raises(InvalidArgument, match="lora"):
            pre.execute(_request("style", bad))
    assert seen == []


def test_preprocessing_metrics_and_the_off_switch(preset_dir, loras):
    pre = _preprocessing(preset_dir("tiny-sdxl"), loras)
    pre.execute(_request("style"))
    assert pre.readahead.wait_idle(timeout=30)
    got = {(name, tuple(labels.items())): v for name, _, labels, v in pre.metrics()}
    handled = sum(v for (name, _), v in got.items() if name == "katz_lora_readahead_files_total")
    assert handled == 1
    assert _preprocessing(preset_dir("tiny-sdxl"), loras, readahead=False).readahead is None
    assert _preprocessing(preset_dir("tiny-sdxl"), loras, readahead=False).metrics() == []
