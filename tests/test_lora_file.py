"""katz.lora_file: the strict safetensors reader behind read_lora_file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import katz.lora_file as lf
from katz.lora import parse_lora, read_lora_file
from test_lora import _raises  # (LoraError raised, every needle in its message) -> message


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written by hand: header length, JSON header, data."""
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def _same(ours: dict, ref: dict) -> None:
    assert list(ours) == sorted(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k


# --------------------------------------------------------------------------- #
# Header validation
# --------------------------------------------------------------------------- #
def test_bad_headers(tmp_path):
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    f = tmp_path / "x.safetensors"

    def bad(header, data, *needles, raw=None):
        if raw is not None:
            f.write_bytes(raw)
        else:
            _raw_file(f, header, data)
        return _raises(lambda: read_lora_file(f, "bad"), "lora 'bad'", *needles)

    _raw_file(f, ok, bytes(8))
    assert torch.equal(read_lora_file(f, "good")["a"], torch.zeros(2))

    # not safetensors at all / truncated
    bad(None, None, "not a valid safetensors", "shorter than the 8-byte", raw=b"abc")
    bad(None, None, "not a valid safetensors", "exceeds", raw=b"\xff" * 64)
    bad(None, None, "not a valid safetensors", "runs past the end", raw=struct.pack("<Q", 500) + b"{}")
    torch.save({"a": torch.zeros(2)}, f)
    bad(None, None, "not a valid safetensors", raw=f.read_bytes())
    bad(ok, bytes(5), "not a valid safetensors", "truncated")
    # JSON
    hb = b'{"a": {"dtype": "F32", '
    bad(None, None, "not JSON", raw=struct.pack("<Q", len(hb)) + hb)
    bad(None, None, "not JSON", raw=struct.pack("<Q", 2) + b"\xff\xfe")
    entry = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    hb = b'{"a": ' + entry + b', "a": ' + entry + b"}"
    bad(None, None, "duplicate key", raw=struct.pack("<Q", len(hb)) + hb + bytes(4))
    bad([1, 2], b"", "not a JSON object")
    bad({"a": [0, 8]}, bytes(8), "'a'", "not an object")
    bad({"__metadata__": {"x": 1}}, b"", "__metadata__")
    # entries
    bad({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "'a' has no dtype")
    bad({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "'a' has shape")
    bad({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), "data_offsets")
    bad({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "'a'", "takes 12 bytes")
    bad({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "'a'")
    # offsets: out of the file, overlapping, gaps
    bad({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "belong to no tensor")
    bad({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "truncated")
    two = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    bad(two, bytes(12), "overlaps")
    bad(ok, bytes(12), "last 4 bytes", "belong to no tensor")
    # dtypes: only float LoRA tensors
    for dtype in ("I64", "F8_E4M3", "BOOL", "weird"):
        bad({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "'a'", f"dtype {dtype}",
            "F16, BF16, F32, F64")
    # a header of no tensors
    bad({"__metadata__": {"format": "pt"}}, b"", "contains no tensors")


def test_header_and_plan(tmp_path, monkeypatch):
    tensors = {"z": torch.ones(3, dtype=torch.float16), "a": torch.ones(5, 7), "m": torch.ones(())}
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"k": "v"})
    path = tmp_path / "p.safetensors"
    with path.open("rb") as fh:
        header = lf.read_header(fh.fileno(), path.stat().st_size, path.name, "p")
    assert list(header.tensors) == ["a", "m", "z"] and header.metadata == {"k": "v"}
    assert header.data_start + header.data_size == path.stat().st_size
    assert header.tensors["z"].shape == (3,) and header.tensors["z"].nbytes == 6
    whole = lf.plan_read(header, ["a", "m", "z"])
    assert whole.ranges == ((0, header.data_size, 0),) and whole.nbytes == header.data_size
    monkeypatch.setattr(lf, "MERGE_GAP_BYTES", 0)
    part = lf.plan_read(header, ["z", "a"])  # 146 of 150 bytes: over WHOLE_REGION_FRACTION, one read
    assert part.ranges == whole.ranges
    monkeypatch.setattr(lf, "WHOLE_REGION_FRACTION", 1.0)
    part = lf.plan_read(header, ["a", "z"])
    assert len(part.ranges) == 2  # 'm' between them is not read
    for k in ("a", "z"):
        begin = header.tensors[k].begin
        assert part.offsets[k] % lf.ALIGN == begin % lf.ALIGN
    assert lf.plan_read(header, []).nbytes == 0


# --------------------------------------------------------------------------- #
# Values: the same tensors as safetensors' own loader
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_values_match_safetensors(tmp_path, monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(shape, generator=g).to(dtype)
               for i, shape in enumerate([(3,), (5, 7), (1,), (), (2, 3, 1, 1), (0, 4), (13, 1)])}
    tensors["f32"] = torch.randn(9, generator=g)  # a second dtype in the file
    path = tmp_path / "v.safetensors"
    save_file(tensors, str(path))
    _same(read_lora_file(path, "v"), load_file(str(path)))
    # many small parallel chunks with odd boundaries, and one range per tensor
    monkeypatch.setattr(lf, "MIN_CHUNK_BYTES", 5)
    monkeypatch.setattr(lf, "MAX_CHUNK_BYTES", 7)
    monkeypatch.setattr(lf, "WHOLE_REGION_FRACTION", 2.0)
    monkeypatch.setattr(lf, "MERGE_GAP_BYTES", 0)
    _same(read_lora_file(path, "v"), load_file(str(path)))


def test_misaligned_tensors_are_copied(tmp_path):
    """A writer other than safetensors may put an F32 tensor at an odd offset: still read right."""
    a = torch.tensor([1.5], dtype=torch.float16)
    b = torch.tensor([2.25, -3.0], dtype=torch.float32)
    c = torch.tensor([7.0], dtype=torch.bfloat16)
    header = {"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]},
              "c": {"dtype": "BF16", "shape": [1], "data_offsets": [10, 12]}}
    path = _raw_file(tmp_path / "m.safetensors", header,
                     a.view(torch.uint8).numpy().tobytes() + b.view(torch.uint8).numpy().tobytes()
                     + c.view(torch.uint8).numpy().tobytes())
    ours = read_lora_file(path, "m")
    _same(ours, load_file(str(path)))
    assert torch.equal(ours["b"], b)


def test_large_file_parallel_read(tmp_path):
    """A few MB: the read is cut into chunks that several threads read at once."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"unet.l{i}.lora_A.weight": torch.randn(64, 1000 + i, generator=g).half() for i in range(40)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    assert path.stat().st_size > 4 * lf.MIN_CHUNK_BYTES
    _same(read_lora_file(path, "big"), load_file(str(path)))


def _mixed_lora(path: Path, g: torch.Generator, big_unet: bool = False) -> dict:
    n = 300_000 if big_unet else 16
    sd = {
        "unet.a.lora_A.weight": torch.randn(2, n, generator=g),
        "unet.a.lora_B.weight": torch.randn(6, 2, generator=g),
        "text_encoder.t.lora_A.weight": torch.randn(2, 4, generator=g).half(),
        "text_encoder.t.lora_B.weight": torch.randn(4, 2, generator=g).half(),
        "lora_te2_x.lora_down.weight": torch.randn(2, 4, generator=g),
        "lora_te2_x.lora_up.weight": torch.randn(4, 2, generator=g),
        "lora_te2_x.alpha": torch.tensor(3.0),
        "mystery.weight": torch.randn(3, generator=g),
    }
    save_file(sd, str(path))
    return sd


def test_component_filtering(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(2)
    for big in (False, True):  # small: the whole region is read; big UNet part: only the spans wanted
        path = tmp_path / f"c{big}.safetensors"
        sd = _mixed_lora(path, g, big_unet=big)
        for comps, want in [
            (None, set(sd)),
            (("unet",), {"unet.a.lora_A.weight", "unet.a.lora_B.weight", "mystery.weight"}),
            (("text_encoder", "text_encoder_2"), set(sd) - {"unet.a.lora_A.weight", "unet.a.lora_B.weight"}),
        ]:
            ours = read_lora_file(path, "c", comps)
            assert set(ours) == want
            _same(ours, {k: sd[k] for k in want})
        if big:
            header_plan = []
            real = lf.plan_read
            monkeypatch.setattr(lf, "plan_read", lambda h, keys: header_plan.append(real(h, keys)) or header_plan[-1])
            read_lora_file(path, "c", ("text_encoder",))
            assert header_plan[-1].nbytes < path.stat().st_size // 100  # the UNet bytes were not read


def test_metadata_folding_and_components(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {
        "unet.a.lora_A.weight": torch.randn(4, 8, generator=g),
        "unet.a.lora_B.weight": torch.randn(6, 4, generator=g),
        "unet.b.lora_A.weight": torch.randn(2, 6, generator=g),
        "unet.b.lora_B.weight": torch.randn(5, 2, generator=g),
        "text_encoder.t.lora_A.weight": torch.randn(4, 3, generator=g),
        "text_encoder.t.lora_B.weight": torch.randn(3, 4, generator=g),
    }
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"b": 2}, "unet.alpha_pattern": {"b": 1},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 2}
    path = tmp_path / "meta.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    full = read_lora_file(path, "meta")
    assert float(full["unet.a.alpha"]) == 8 and float(full["unet.b.alpha"]) == 1
    assert float(full["text_encoder.t.alpha"]) == 2
    unet_only = read_lora_file(path, "meta", ("unet",))
    assert set(unet_only) == {k for k in full if k.startswith("unet.")}
    w = parse_lora(unet_only, "meta", "sdxl")
    assert w.layers["unet"]["a"].factor == 2.0 and w.layers["unet"]["b"].factor == 0.5
    save_file(sd, str(path), metadata={"lora_adapter_metadata": "[1"})
    _raises(lambda: read_lora_file(path, "meta"), "lora 'meta'", "lora_adapter_metadata")
