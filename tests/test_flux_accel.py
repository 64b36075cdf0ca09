"""The FLUX engines' GPU acceleration, exercised on the CPU (katz.engines.torch.transformer): regional
compilation (each block class compiled once, here with torch.compile's aot_eager backend, so no C
compiler runs) gives the eager step with ControlNet residuals read block by block and with LoRAs
merged after compiling, and float8 block linears follow LoRA merges. On a real CPU deployment the
acceleration is off (``Acceleration.active``); the tests switch it on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from katz.engines.torch import transformer as T
from katz.engines.torch.cuda_graphs import Acceleration

SIZE = 64


@pytest.fixture
def on_cpu(monkeypatch):
    """Acceleration active on the CPU, and a fresh process-wide regional-compile registry."""
    monkeypatch.setattr(Acceleration, "active", lambda self, device: True)
    monkeypatch.setattr(T, "_REGIONS", {})


@pytest.fixture(scope="module")
def folder(preset_dir):
    from katz.models.folder import ModelFolder, discover_controlnets

    path = preset_dir("tiny-flux")
    return ModelFolder(path, discover_controlnets(path / "controlnets"))


def _args(engine, folder, size=SIZE, seed=0):
    torch.manual_seed(seed)
    x = T.flux_example_inputs(engine.transformer.config, size, size, "cpu", torch.float32, T.flux_text_len(folder),
                              folder.vae_scale_factor)
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        x[name] = torch.randn_like(x[name])
    x["img_ids"] = torch.randn_like(x["img_ids"])  # positions that differ per token
    return (x["hidden_states"], x["timestep"], x["guidance"], x["pooled_projections"], x["encoder_hidden_states"],
            x["txt_ids"], x["img_ids"])


def _lora(folder):
    from katz.lora.store import LoraStore

    return LoraStore(folder.path / "loras", "flux").get("style", ("transformer",))


def test_compiled_blocks_give_the_eager_step_with_controlnets_and_loras(folder, on_cpu):
    from torch._dynamo.utils import counters

    from katz.controlnet.blocks import TransformerControlNetStep

    accel = Acceleration(compile=True, compile_backend="aot_eager")
    eager, fast = T.FluxTransformerEngine(folder), T.FluxTransformerEngine(folder, accel=accel)
    cn_eager, cn_fast = T.FluxControlNetEngine(folder), T.FluxControlNetEngine(folder, accel=accel)
    assert fast.regions is not None and cn_fast.regions is fast.regions  # one compiled code per process
    counters.clear()
    assert fast.warm_up([(SIZE, SIZE)], T.flux_text_len(folder), folder.vae_scale_factor) > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # one graph per block class, not one per block

    args = _args(fast, folder)
    plain = eager(*args)
    torch.testing.assert_close(fast(*args), plain, rtol=1e-5, atol=1e-5)

    # a ControlNet beside the step, its residuals read block by block (hooks on compiled blocks)
    cond = torch.randn_like(args[0])
    controls = [(SimpleNamespace(name="canny"), cond, 0.9)]
    ref = TransformerControlNetStep(eager, cn_eager)(*args, controls=controls)
    out = TransformerControlNetStep(fast, cn_fast)(*args, controls=controls)
    assert not torch.equal(ref, plain)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fast.regions.eager_calls == 0  # the ControlNet's blocks too ran the warmed-up code

    # a LoRA merged in place after compiling: the compiled blocks read the merged weights
    lora = _lora(folder)
    eager.set_loras([(lora, 1.0)])
    fast.set_loras([(lora, 1.0)])
    with_lora = eager(*args)
    assert not torch.allclose(with_lora, plain, atol=1e-4)
    torch.testing.assert_close(fast(*args), with_lora, rtol=1e-5, atol=1e-5)
    fast.set_loras([])
    eager.set_loras([])
    torch.testing.assert_close(fast(*args), plain, rtol=1e-5, atol=1e-5)

    # a size not warmed up runs eagerly: nothing compiles on a request
    small = _args(fast, folder, size=32, seed=1)
    torch.testing.assert_close(fast(*small), eager(*small), rtol=1e-5, atol=1e-5)
    assert fast.regions.eager_calls > 0
    # mode service: the controlnet model's process warms its ControlNets' blocks up itself
    service = T.FluxControlNetEngine(folder, accel=accel)
    assert service.warm_up(["canny"], [(SIZE, SIZE)], T.flux_text_len(folder), folder.vae_scale_factor) > 0
    assert "canny" in service.nets
    assert counters["stats"]["unique_graphs"] == graphs  # ControlNet blocks, LoRAs, other sizes: no new graph

    block = fast.transformer.transformer_blocks[0]
    assert "forward" in block.__dict__
    fast.release()
    assert "forward" not in block.__dict__


def test_fp8_block_linears_follow_lora_merges(folder, on_cpu, monkeypatch):
    from katz.engines.torch.experimental import fp8

    monkeypatch.setattr(fp8, "fp8_capable", lambda device: True)  # torch._scaled_mm runs on the CPU too
    eager = T.FluxTransformerEngine(folder)
    engine = T.FluxTransformerEngine(folder, accel=Acceleration(cuda_graphs=False, fp8=True))
    assert engine.fp8 and engine.regions is None
    modules = dict(engine.transformer.named_modules())
    quantized = sorted(n for n, m in modules.items() if isinstance(m, fp8.Fp8Linear))
    doubles, singles = len(engine.transformer.transformer_blocks), len(engine.transformer.single_transformer_blocks)
    # double blocks: 8 attention projections + 2 x 2 feed-forward; single: q, k, v, proj_mlp, proj_out
    assert len(quantized) == 12 * doubles + 5 * singles
    assert "transformer_blocks.0.ff_context.net.2" in quantized and "single_transformer_blocks.0.proj_out" in quantized
    assert type(modules["transformer_blocks.0.norm1.linear"]) is torch.nn.Linear  # AdaLN: one token, stays

    args = _args(engine, folder)
    ref = eager(*args)
    rel = float((engine(*args) - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel

    at_load = {n: modules[n].weight_fp8.view(torch.uint8).clone() for n in quantized}
    lora = _lora(folder)
    engine.set_loras([(lora, 1.0)])
    eager.set_loras([(lora, 1.0)])
    changed = [n for n in quantized if not torch.equal(modules[n].weight_fp8.view(torch.uint8), at_load[n])]
    patched = {p for p in lora.layers["transformer"]}
    assert changed and set(changed) <= patched  # the merged layers re-quantized, and only those
    for n in changed:
        m = modules[n]
        assert torch.equal(m.weight_fp8.view(torch.uint8),
                           fp8.quantize(m.weight, fp8.tensor_scale(m.weight)).view(torch.uint8))
    ref = eager(*args)
    assert float((engine(*args) - ref).norm() / ref.norm()) < 0.1
    engine.set_loras([])
    assert all(torch.equal(modules[n].weight_fp8.view(torch.uint8), at_load[n]) for n in quantized)


def test_from_module_shares_the_module(folder):
    """The benchmark's path: an engine around a transformer built elsewhere, eager on the CPU."""
    module = folder.load_transformer()
    engine = T.FluxTransformerEngine.from_module(module, accel=Acceleration(compile=True))
    assert engine.transformer is module and engine.regions is None and not engine.fp8  # CPU: eager
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    args = _args(engine, folder)
    ref = module(hidden_states=args[0], timestep=args[1], guidance=args[2], pooled_projections=args[3],
                 encoder_hidden_states=args[4], txt_ids=args[5], img_ids=args[6], return_dict=False)[0]
    assert torch.equal(engine(*args), ref)


def test_controlnets_share_the_transformers_compiled_shapes_on_an_unindexed_device(monkeypatch):
    """The transformer's engine names its device by index (read off its weights), a ControlNet engine by the
    deployment's string (``cuda``): both get the one registry, so the ControlNets' blocks run the shapes the
    transformer warmed up instead of running eagerly."""
    monkeypatch.setattr(T, "_REGIONS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    accel = Acceleration(compile=True)
    assert T.process_regions(torch.device("cuda", 0), accel) is T.process_regions(torch.device("cuda"), accel)
    assert T.process_regions("cuda", accel) is not T.process_regions(torch.device("cuda", 1), accel)
