"""katz.lora.safetensors (the strict safetensors reader) and the LoRA manager's load path on a CPU device.

The manager runs the same code on CUDA; only the staging buffer's pinning, the side stream and
record_stream are CUDA-only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import _raises  # (LoraError raised, every needle in its message) -> message

import katz.lora.safetensors as lf
from katz.errors import LoraError
from katz.lora.manager import LoraManager, finite_flag, first_non_finite
from katz.lora.patch import LoraPatcher
from katz.lora.safetensors import read_lora_file
from katz.lora.store import LoraStore
from katz.lora.weights import parse_lora


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
    # into a slice of a larger (staging) buffer: the views are made from the slice's own offset
    staging = torch.full((1 << 16,), 0xFF, dtype=torch.uint8)
    _same(lf.read_lora_bytes(path, "v", None, lambda n: staging[64 : 64 + n]).tensors(), load_file(str(path)))
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
    # the manager's form: the same alphas as Python floats, which parse_lora takes as well
    floats = lf.read_lora_bytes(path, "meta", None, lambda n: torch.empty(n, dtype=torch.uint8)).tensors(floats=True)
    assert type(floats["unet.b.alpha"]) is float and floats["unet.b.alpha"] == 1.0
    wf = parse_lora(floats, "meta", "sdxl")
    assert wf.layers["unet"]["b"].factor == 0.5 and wf.layers["text_encoder"]["t"].alpha == 2.0
    save_file(sd, str(path), metadata={"lora_adapter_metadata": "[1"})
    _raises(lambda: read_lora_file(path, "meta"), "lora 'meta'", "lora_adapter_metadata")


# --------------------------------------------------------------------------- #
# Finiteness on the device in one pass
# --------------------------------------------------------------------------- #
def test_finite_flag_and_culprit():
    buf = torch.zeros(64, dtype=torch.uint8)
    spans = [(0, 16, torch.float32), (16, 24, torch.float32), (24, 32, torch.float16), (40, 44, torch.bfloat16),
             (44, 44, torch.float32)]  # runs: 0..24 (F32), 24..32 (F16), 40..44 (BF16); an empty one
    alone = torch.zeros(3, dtype=torch.float64)
    tensors = {f"s{i}": buf[a:b].view(dt) for i, (a, b, dt) in enumerate(spans)}
    tensors["alone"] = alone
    assert bool(finite_flag(buf, spans, [alone])) and first_non_finite(tensors) is None
    for key, value in [("s1", float("nan")), ("s2", float("inf")), ("s3", -float("inf")), ("alone", float("nan"))]:
        tensors[key].view(-1)[-1] = value
        assert not bool(finite_flag(buf, spans, [alone]))
        assert first_non_finite(tensors) == key
        tensors[key].view(-1)[-1] = 0
    # bytes in no span are not checked (the padding between read ranges may hold anything)
    buf[32:40] = 0xFF  # NaN as F32 / F16 / BF16
    assert bool(finite_flag(buf, spans, [alone]))
    assert not bool(finite_flag(buf, spans + [(32, 40, torch.float16)]))


def test_parse_lora_check_finite_flag():
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    up[1, 1] = float("nan")
    sd = {"unet.a.lora_A.weight": down, "unet.a.lora_B.weight": up}
    _raises(lambda: parse_lora(sd, "n", "sdxl"), "'unet.a.lora_B.weight' contains NaN")
    assert "a" in parse_lora(sd, "n", "sdxl", check_finite=False).layers["unet"]
    sd["unet.a.alpha"] = torch.tensor(float("inf"))  # alphas are checked either way
    _raises(lambda: parse_lora(sd, "n", "sdxl", check_finite=False), "'unet.a.alpha'")


# --------------------------------------------------------------------------- #
# The manager's load path (CPU device)
# --------------------------------------------------------------------------- #
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 6)
        self.b = torch.nn.Linear(6, 5)


def _peft_lora(path: Path, seed: int, dtype=torch.float32, nan_key: str | None = None, te: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "unet.a.lora_A.weight": torch.randn(4, 8, generator=g).to(dtype),
        "unet.a.lora_B.weight": torch.randn(6, 4, generator=g).to(dtype),
        "unet.b.lora_A.weight": torch.randn(3, 6, generator=g).to(dtype),
        "unet.b.lora_B.weight": torch.randn(5, 3, generator=g).to(dtype),
        "unet.b.alpha": torch.tensor(1.5),
    }
    if te:
        sd["text_encoder.t.lora_A.weight"] = torch.randn(2, 4, generator=g)
        sd["text_encoder.t.lora_B.weight"] = torch.full((4, 2), float("nan"))  # not the UNet's concern
    if nan_key:
        sd[nan_key].view(-1)[-1] = float("nan")
    save_file(sd, str(path))
    return sd


def _manager(tmp_path, **kw) -> LoraManager:
    return LoraManager(LoraStore(tmp_path, "sdxl"), [LoraPatcher(_Net(), "unet")], "cpu", **kw)


def _check_layers(weights, sd) -> None:
    layers = weights.layers["unet"]
    assert set(layers) == {"a", "b"}
    for p in ("a", "b"):
        assert torch.equal(layers[p].down, sd[f"unet.{p}.lora_A.weight"])
        assert torch.equal(layers[p].up, sd[f"unet.{p}.lora_B.weight"])
    assert layers["a"].alpha is None and layers["b"].alpha == 1.5


def test_manager_loads_views_of_one_buffer_and_reuses_staging(tmp_path):
    a = _peft_lora(tmp_path / "a.safetensors", 1, te=True)
    b = _peft_lora(tmp_path / "b.safetensors", 2, dtype=torch.bfloat16)
    m = _manager(tmp_path)
    try:
        (wa,) = m.get(["a"])
        (wb,) = m.get(["b"])  # read through the same staging buffer
        _check_layers(wa, a)  # not overwritten by b's read
        _check_layers(wb, b)
        assert set(wa.layers) == {"unet"}  # the text-encoder part was neither read nor checked
        entry = m.device_cache.get("a", m.cache_key("a"))
        assert entry.buffer is not None and not entry.extra
        size = sum(t.numel() * t.element_size() for k, t in a.items() if k.startswith("unet."))
        assert size <= entry.nbytes < size + 2 * lf.ALIGN
        ptr = entry.buffer.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == ptr for layer in wa.layers["unet"].values()
                   for t in (layer.down, layer.up))
        assert m.device_cache.used == entry.nbytes + m.device_cache.get("b", m.cache_key("b")).nbytes
        s = m.stats
        assert s.loads == 2 and s.host_misses == 2 and s.read_bytes > 0
        assert s.read_seconds > 0 and s.parse_seconds > 0 and s.upload_seconds > 0
    finally:
        m.close()


def test_manager_host_hit_skips_disk_and_parsing(tmp_path, monkeypatch):
    a = _peft_lora(tmp_path / "a.safetensors", 1)
    m = _manager(tmp_path)
    try:
        m.get(["a"])
        m.wait_idle()  # the host tier is filled after the load's waiters were let go
        assert len(m.host.items) == 1 and m.stats.host_fill_seconds > 0
        import katz.lora.manager as lm

        def no(*args, **kw):
            raise AssertionError("read or parsed again")

        monkeypatch.setattr(lm, "read_lora_bytes", no)
        monkeypatch.setattr(lm, "parse_lora", no)
        m.device_cache.items.clear()
        (again,) = m.get(["a"])
        assert m.stats.host_hits == 1 and m.stats.loads == 2
        _check_layers(again, a)
        host = m.host.get("a", m.cache_key("a"))
        assert again.layers["unet"]["a"].down.untyped_storage().data_ptr() != host.buffer.untyped_storage().data_ptr()
    finally:
        m.close()


def test_loads_nobody_collects_do_not_keep_their_buffers(tmp_path):
    """A hinted load that ends before its request asks is answered from the device tier; once the
    tier evicts it, nothing may keep its buffer alive (on a GPU: one LoRA's memory per LoRA ever
    hinted, unbounded with a long tail of LoRAs)."""
    import gc
    import weakref

    from katz.lora.bal import UNetLoras

    n = 8
    for i in range(n):
        _peft_lora(tmp_path / f"l{i}.safetensors", i)
    size = (tmp_path / "l0.safetensors").stat().st_size
    m = _manager(tmp_path, device_budget_bytes=2 * size, host_budget_bytes=0)
    bal = UNetLoras(m, None, m.patchers["unet"])
    buffers = []
    read_entry = m._read_entry

    def recorded(name, progress):
        entry, fill = read_entry(name, progress)
        buffers.append(weakref.ref(entry.buffer))
        return entry, fill

    m._read_entry = recorded
    gc.disable()  # a reference cycle would not count as freed either
    try:
        for i in range(n):
            assert m.hint([f"l{i}"])
            m.wait_idle()  # the load is over before the request asks for the LoRA
            loop = bal.begin(((f"l{i}", 1.0),), k=0)
            loop.before_step()
            loop.finish()
            bal.switch_to(())
        alive = sum(r() is not None for r in buffers)
        cached = len(m.device_cache.items)
        assert len(buffers) == n and alive <= cached, f"{alive} of {n} LoRA buffers alive, {cached} in the device tier"
    finally:
        gc.enable()
        m.close()


def test_manager_host_tier_respects_its_budget(tmp_path):
    _peft_lora(tmp_path / "a.safetensors", 1)
    _peft_lora(tmp_path / "b.safetensors", 2)
    m = _manager(tmp_path, host_budget_bytes=100)  # less than one LoRA: nothing is kept
    try:
        m.get(["a"])
        m.wait_idle()
        assert not m.host.items and m.host.used == 0
    finally:
        m.close()
    m = _manager(tmp_path)
    try:
        m.get(["a"])
        size = m.device_cache.get("a", m.cache_key("a")).nbytes * 3 // 2
    finally:
        m.close()
    m = _manager(tmp_path, host_budget_bytes=size)  # one LoRA's data fits, not two
    try:
        m.get(["a"])
        m.get(["b"])
        m.wait_idle()
        assert list(m.host.items) == ["b"] and 0 < m.host.used <= size
    finally:
        m.close()


def _cpu_path_error(path, name) -> str:
    """The error the CPU path (read_lora_file + parse_lora) gives."""
    with pytest.raises(LoraError) as info:
        parse_lora(read_lora_file(path, name), name, "sdxl")
    return str(info.value)


@pytest.mark.parametrize("key", ["unet.a.lora_A.weight", "unet.b.lora_B.weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_manager_names_the_non_finite_tensor(tmp_path, key, dtype):
    _peft_lora(tmp_path / "n.safetensors", 3, dtype=dtype, nan_key=key)
    m = _manager(tmp_path)
    try:
        msg = _raises(lambda: m.get(["n"]), "lora 'n'", f"tensor {key!r} contains NaN or infinite values")
        assert m.stats.load_failures == 1 and not m.device_cache.items and not m.host.items
    finally:
        m.close()
    assert msg == _cpu_path_error(tmp_path / "n.safetensors", "n")


def test_manager_misaligned_file_and_other_errors(tmp_path):
    # an F16 alpha first puts the F32 weights at odd offsets: copied, counted, still right
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    blobs = [torch.tensor([3.0], dtype=torch.float16), down, up]
    header, pos = {}, 0
    for key, t, dt in zip(["lora_unet_a.alpha", "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"],
                          blobs, ["F16", "F32", "F32"]):
        n = t.numel() * t.element_size()
        header[key] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    _raw_file(tmp_path / "odd.safetensors", header, b"".join(t.view(torch.uint8).numpy().tobytes() for t in blobs))
    m = _manager(tmp_path)
    try:
        (w,) = m.get(["odd"])
        layer = w.layers["unet"]["a"]
        assert torch.equal(layer.down, down) and torch.equal(layer.up, up) and layer.alpha == 3.0
        entry = m.device_cache.get("odd", m.cache_key("odd"))
        assert len(entry.extra) == 2 and entry.nbytes == entry.buffer.numel() + (down.numel() + up.numel()) * 4
        m.wait_idle()
        m.device_cache.items.clear()
        (w,) = m.get(["odd"])  # from the host tier
        assert torch.equal(w.layers["unet"]["a"].down, down) and m.stats.host_hits == 1

        _peft_lora(tmp_path / "teonly.safetensors", 5)
        sd = load_file(str(tmp_path / "teonly.safetensors"))
        save_file({k.replace("unet.", "text_encoder."): v for k, v in sd.items()}, str(tmp_path / "teonly.safetensors"))
        (w,) = m.get(["teonly"])
        assert w.layers == {}

        save_file({"unet.a.lora_A.weight": torch.randn(4, 7), "unet.a.lora_B.weight": torch.randn(6, 4)},
                  str(tmp_path / "shape.safetensors"))
        _raises(lambda: m.get(["shape"]), "lora 'shape'", "shape mismatch")
        (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "odd.safetensors").read_bytes()[:-3])
        _raises(lambda: m.get(["trunc"]), "lora 'trunc'", "not a valid safetensors")
    finally:
        m.close()
    sd15 = LoraManager(LoraStore(tmp_path, "sd15"), [LoraPatcher(_Net(), "unet")], "cpu")
    try:
        save_file({**load_file(str(tmp_path / "odd.safetensors")), "lora_te2_x.lora_down.weight": torch.ones(1, 1),
                   "lora_te2_x.lora_up.weight": torch.ones(1, 1)}, str(tmp_path / "xl.safetensors"))
        _raises(lambda: sd15.get(["xl"]), "lora 'xl'", "targets text_encoder_2, which a sd15 model does not have")
    finally:
        sd15.close()


class _Unchecked:
    """A patcher stand-in that accepts every layer (this test is about reading, not targets)."""

    def __init__(self, component: str):
        self.component = component

    def validate(self, lora, check_values: bool = True) -> None:
        pass


def test_manager_matches_the_cpu_path_on_a_real_lora(preset_dir):
    """The preset's LoRAs through the manager equal read_lora_file + parse_lora, layer by layer."""
    folder = preset_dir("tiny-sdxl") / "loras"
    store = LoraStore(folder, "sdxl")
    m = LoraManager(store, [_Unchecked(c) for c in ("unet", "text_encoder", "text_encoder_2")], "cpu")
    try:
        assert store.names()
        for name in store.names():
            ref = parse_lora(read_lora_file(folder / f"{name}.safetensors", name), name, "sdxl")
            (w,) = m.get([name])
            assert set(w.layers) == set(ref.layers)
            for comp, layers in ref.layers.items():
                assert set(w.layers[comp]) == set(layers)
                for path, layer in layers.items():
                    got = w.layers[comp][path]
                    assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
                    assert got.alpha == layer.alpha and got.key == layer.key
    finally:
        m.close()


def test_manager_parses_and_validates_while_the_bytes_are_read(preset_dir, monkeypatch):
    """A load's parse and validation need only the header and the alphas (read first): they run on the
    loader thread while the read threads fill the buffer, so a slow disk hides them."""
    import threading
    import time

    events, lock = [], threading.Lock()
    real = lf._read_exact

    def slow(fd, view, offset):
        if offset > 8 and len(view) > 4096:  # the bulk reads (not the header at 8, nor the scalar alphas)
            time.sleep(0.3)
            with lock:
                events.append("bytes read")
        return real(fd, view, offset)

    class Recording(_Unchecked):
        def validate(self, lora, check_values: bool = True) -> None:
            assert not check_values  # the manager checks the values itself, on the device, in one pass
            with lock:
                events.append("validated")

    monkeypatch.setattr(lf, "_read_exact", slow)
    folder = preset_dir("tiny-sdxl") / "loras"
    name = LoraStore(folder, "sdxl").names()[0]
    m = LoraManager(LoraStore(folder, "sdxl"), [Recording("unet")], "cpu")
    try:
        (w,) = m.get([name])
        assert events[0] == "validated" and "bytes read" in events, events
        ref = parse_lora(read_lora_file(folder / f"{name}.safetensors", name, ("unet",)), name, "sdxl")
        for path, layer in ref.layers["unet"].items():  # the views were made before the bytes arrived
            assert torch.equal(w.layers["unet"][path].down, layer.down)
            assert torch.equal(w.layers["unet"][path].up, layer.up)
        assert m.stats.read_seconds > 0 and m.stats.parse_seconds > 0
    finally:
        m.close()


def _unet_hash(unet) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in unet.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def small_chunks(monkeypatch):
    """Reads in 4-16 KB chunks (a tiny LoRA then takes ~20), from a disk where the file's later
    bytes come later (up to ~0.3 s for the last chunk of a 300 KB file)."""
    import time

    monkeypatch.setattr(lf, "MIN_CHUNK_BYTES", 4096)
    monkeypatch.setattr(lf, "MAX_CHUNK_BYTES", 16384)
    real = lf._read_exact

    def slow(fd, view, offset):
        if len(view) >= 4096:
            time.sleep(offset / 1e6)
        return real(fd, view, offset)

    monkeypatch.setattr(lf, "_read_exact", slow)


def _tiny_unet(preset_dir):
    from katz.models.folder import ModelFolder

    return ModelFolder(preset_dir("tiny-sdxl")).load_unet("cpu", torch.float32)


def test_streamed_load_merges_what_the_one_shot_load_merges(preset_dir, small_chunks):
    """A LoRA merged while its chunks are read and uploaded (LoraManager.stream) gives the UNet the
    weights that waiting for the whole load and merging at once gives, bit for bit, and both restore
    the base exactly; the merge ran in several rounds, as chunks arrived."""
    folder = preset_dir("tiny-sdxl") / "loras"
    streamed, one_shot = _tiny_unet(preset_dir), _tiny_unet(preset_dir)
    base = _unet_hash(streamed)
    ps, po = LoraPatcher(streamed, "unet"), LoraPatcher(one_shot, "unet")
    ms = LoraManager(LoraStore(folder, "sdxl"), [ps], "cpu")
    mo = LoraManager(LoraStore(folder, "sdxl"), [po], "cpu")
    try:
        weights, arrival = ms.stream(["style"])
        assert arrival is not None
        progress = ms._inflight["style"].progress
        rounds = []  # bytes up at each round of merging
        real = arrival.fence
        arrival.fence = lambda: (rounds.append(progress.upto), real())[1]
        ps.apply([(weights[0], 0.9)], arrival=arrival)
        assert len(rounds) > 2 and rounds[0] < progress.buffer.numel(), rounds  # began before the last chunk
        assert ms.stats.loads == 1 and ms.stats.device_misses == 1 and arrival.waited > 0
        po.apply([(w, 0.9) for w in mo.get(["style"])])
        assert _unet_hash(streamed) == _unet_hash(one_shot) != base
        # the LoRA is in the device tier now: a second stream has nothing arriving
        again, none = ms.stream(["style"])
        assert none is None and again[0] is weights[0]
        ps.restore()
        po.restore()
        assert _unet_hash(streamed) == base == _unet_hash(one_shot)
    finally:
        ms.close()
        mo.close()


def test_streamed_load_with_a_bad_last_chunk_is_never_left_merged(preset_dir, small_chunks, tmp_path):
    """A NaN in the file's last tensor is found once every chunk is up (after earlier units were
    merged): the merge raises the load's error, naming the tensor as the one-shot load does, and the
    base weights are back."""
    sd = load_file(str(preset_dir("tiny-sdxl") / "loras" / "style.safetensors"))
    last = sorted(sd)[-1]
    sd[last] = sd[last].clone()
    sd[last].view(-1)[-1] = float("nan")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    unet = _tiny_unet(preset_dir)
    base = _unet_hash(unet)
    p = LoraPatcher(unet, "unet")
    m = LoraManager(LoraStore(tmp_path, "sdxl"), [p], "cpu")
    try:
        weights, arrival = m.stream(["bad"])
        assert arrival is not None
        with pytest.raises(LoraError) as info:
            p.apply([(weights[0], 1.0)], arrival=arrival)
        assert f"tensor {last!r} contains NaN" in str(info.value)
        assert p.applied == () and _unet_hash(unet) == base
        assert not m.device_cache.items and m.stats.load_failures == 1
    finally:
        m.close()
    assert str(info.value) == _cpu_path_error(tmp_path / "bad.safetensors", "bad")


def test_clear_caches_leaves_nothing_ready_from_an_uncollected_load(tmp_path):
    """A load nobody collected with get() (a prefetch, or a streamed merge) must not keep answering
    ready() after the caches are emptied: the next request would count a cold LoRA as on the device."""
    _peft_lora(tmp_path / "a.safetensors", 1)
    m = _manager(tmp_path)
    try:
        m.prefetch(["a"])
        m.wait_idle()
        assert m.ready(["a"])
        m.clear_caches()
        assert not m.ready(["a"]) and m.tiers(["a"])[0] not in ("device", "host")
        (w,) = m.get(["a"])  # loads again, from the file
        assert "unet" in w.layers and m.stats.loads == 2
    finally:
        m.close()
