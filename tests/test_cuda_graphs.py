"""CUDA graphs of the PyTorch engines (GPU only: the CPU has no graphs to capture).

The graph path must give the eager path's numbers, see LoRAs merged after capture,
fall back to eager for shapes not captured at load, and whole requests through the
in-process ensemble must not change.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from katz.engines.torch.cuda_graphs import Acceleration
from katz.models.folder import ModelFolder, discover_controlnets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

SIZE = 256


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd15"])
def folder(request, preset_dir):
    path = preset_dir(request.param)
    return ModelFolder(path, discover_controlnets(path / "controlnets"))


def _engines(folder, accel):
    from katz.engines.torch.controlnet import ControlNetEngine
    from katz.engines.torch.unet import UNetEngine

    unet = UNetEngine(folder, "cuda", torch.float16, accel=accel)
    unet.warm_up([(SIZE, SIZE)], batches=(1, 2), residuals=True, split=True)
    cn = ControlNetEngine(folder, "cuda", torch.float16, accel=accel)
    cn.warm_up([(SIZE, SIZE)], batches=(2,))
    return unet, cn


def test_graphs_match_eager_and_see_loras(folder, tmp_path):
    from katz.lora.random import make_random_lora
    from katz.lora.safetensors import read_lora_file
    from katz.lora.weights import parse_lora
    from katz.models.unet import unet_example_inputs

    unet, cn = _engines(folder, Acceleration(cuda_graphs=True))
    # one signature per batch: the step with residuals (a plain step replays it with zeros), down, up
    assert len(unet.graphs["step"]) == 2 and len(unet.graphs["down"]) == 2 and len(unet.graphs["up"]) == 2
    torch.manual_seed(0)
    x = unet_example_inputs(folder, 2, SIZE, SIZE, "cuda", torch.float16)
    args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"])
    eager = unet.eager_step(*args, None, None)
    graphed = unet(*args)
    assert unet.graphs["step"].replays == 1 and unet.graphs["step"].eager_calls == 0
    torch.testing.assert_close(graphed, eager, rtol=0, atol=2e-3)

    # ControlNet residuals: graph == eager, and split down/up == whole step
    name = sorted(cn.names)[0]
    # one control image for both CFG rows, as the pipeline sends it (the feature cache computes row 0)
    image = torch.rand(1, 3, SIZE, SIZE, device="cuda", dtype=torch.float16).expand(2, -1, -1, -1)
    down, mid = cn(name, *args, image, 0.7, "img-1")
    replays = cn.graphs[name].replays
    net = cn.nets[name]
    with torch.no_grad():
        e_down, e_mid = net(args[0], args[1], encoder_hidden_states=args[2], controlnet_cond=image,
                            conditioning_scale=0.7, added_cond_kwargs=args[3], return_dict=False)
    assert replays == 1
    for a, b in zip(down + [mid], list(e_down) + [e_mid]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    whole = unet(*args, down, mid).clone()
    split = unet.up(unet.down(*args), down, mid)
    torch.testing.assert_close(split, whole, rtol=0, atol=2e-3)
    torch.testing.assert_close(whole, unet.eager_step(*args, down, mid), rtol=0, atol=2e-3)

    # a LoRA merged after capture changes the graph's output, and restore brings the base back
    lora_file = tmp_path / "l.safetensors"
    make_random_lora(lora_file, unet.unet, {}, rank=4, seed=3, fmt="peft")
    lora = parse_lora(read_lora_file(lora_file, "l"), "l", folder.family)
    unet.set_loras([(lora, 1.0)])
    with_lora = unet(*args)
    torch.testing.assert_close(with_lora, unet.eager_step(*args, None, None), rtol=0, atol=2e-3)
    assert (with_lora - graphed).abs().max() > 1e-2
    unet.set_loras([])
    assert torch.equal(unet(*args), graphed)

    # a shape not captured at load runs eagerly (never captured on a request)
    y = unet_example_inputs(folder, 2, SIZE + 64, SIZE, "cuda", torch.float16)
    unet(y["sample"], y["timestep"], y["encoder_hidden_states"], y["added_cond"])
    assert unet.graphs["step"].eager_calls == 1 and len(unet.graphs["step"]) == 2


@pytest.mark.parametrize("compile_", [False, True])
def test_split_graphs_serve_plain_steps_with_zero_residuals(folder, compile_):
    """ControlNet-as-a-Service captures down and up only: a step without ControlNets replays them
    with zero residuals (nothing eager, no step graph); compiled, only the batches asked for compile."""
    from katz.engines.torch.unet import UNetEngine
    from katz.models.unet import unet_example_inputs

    unet = UNetEngine(folder, "cuda", torch.float16, accel=Acceleration(cuda_graphs=True, compile=compile_))
    compiled_calls = []
    unet.graphs["up"].fn = _counting(unet.graphs["up"].fn, compiled_calls)
    unet.warm_up([(SIZE, SIZE)], batches=(1, 2), split=True, compile_batches=(2,))
    assert len(unet.graphs["step"]) == 0 and len(unet.graphs["down"]) == 2 and len(unet.graphs["up"]) == 2
    assert len(compiled_calls) == 3  # batch 2 only: two warm-up runs and the capture
    for batch in (1, 2):
        x = unet_example_inputs(folder, batch, SIZE, SIZE, "cuda", torch.float16)
        args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"])
        torch.testing.assert_close(unet(*args), unet.eager_step(*args, None, None), rtol=0, atol=2e-3 if not compile_ else 1e-2)
    assert unet.graphs["up"].replays == 2 and unet.graphs["down"].replays == 2
    assert unet.graphs["step"].eager_calls == 0 and unet.graphs["up"].eager_calls == 0


def _counting(fn, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return counted


@pytest.mark.parametrize("compile_vae", [False, True])
def test_vae_decode_warmed_up_matches_eager(folder, compile_vae):
    from katz.engines.torch.vae import VaeDecoderEngine

    vae = VaeDecoderEngine(folder, "cuda", torch.float16,
                           accel=Acceleration(cuda_graphs=True, compile_vae=compile_vae))
    assert vae.warm_up([(SIZE, SIZE)]) > 0
    s = folder.vae_scale_factor
    latents = torch.randn(1, 4, SIZE // s, SIZE // s, device="cuda", dtype=torch.float16)
    fast = vae(latents)
    assert vae.fast_decode.replays == 1 and fast.dtype == torch.float16
    eager = vae.eager_decode(latents.to(vae.compute_dtype))
    torch.testing.assert_close(fast.float(), eager.float(), rtol=0, atol=1e-2 if compile_vae else 0)
    again = vae(latents * 0.5)  # a new replay does not change what an earlier call returned
    assert not torch.equal(again, fast) and torch.equal(fast, vae(latents))
    other = torch.randn(1, 4, SIZE // s // 2, SIZE // s // 2, device="cuda", dtype=torch.float16)
    vae(other)  # a size not warmed up: eager, no compilation or capture on a request
    assert vae.fast_decode.eager_calls == 0 and len(vae.fast_decode) == 1


def test_request_through_local_ensemble_unchanged(folder):
    from PIL import Image

    from katz.deployment import Deployment
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    control = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (SIZE, SIZE, 3), np.uint8)).save(control, "PNG")
    request = {
        "prompt": np.array([b"a red house"], object), "seed": np.array([3], np.int64),
        "steps": np.array([4], np.int32), "width": np.array([SIZE], np.int32), "height": np.array([SIZE], np.int32),
        "controlnets": np.array([sorted(folder.controlnets)[0].encode()], object),
        "control_images": np.array([control.getvalue()], object),
    }
    images = {}
    for mode in ("inline", "service", "local"):
        for graphs in (False, True):
            dep = Deployment(folder.path, folder.controlnets, None, Limits(), device="cuda", dtype="float16",
                             controlnet_mode=mode, cuda_graphs=graphs, graph_sizes=[(SIZE, SIZE)])
            ens = LocalEnsemble(dep)
            images[mode, graphs] = np.asarray(ens.generate(dict(request))["image"], dtype=np.int16)
            if graphs:
                assert ens.models["unet"].engine.graphs["down" if mode == "service" else "step"].replays > 0
    ref = images["inline", False]
    for key, img in images.items():
        assert np.abs(img - ref).max() <= 2, key


@pytest.mark.parametrize("compile_", [False, True])
def test_fp8_engines_match_eager_follow_loras_and_restore_exactly(folder, tmp_path, compile_):
    """--fp8: the UNet's and ControlNets' transformer linears in float8, captured (and compiled) like the
    float16 ones; a LoRA merged after capture re-quantizes into the graph's buffers, restore is exact."""
    from katz.engines.torch.unet import UNetEngine
    from katz.engines.torch.experimental.fp8 import Fp8Linear, fp8_capable
    from katz.lora.random import make_random_lora
    from katz.lora.safetensors import read_lora_file
    from katz.lora.weights import parse_lora
    from katz.models.unet import unet_example_inputs

    if not fp8_capable("cuda"):
        pytest.skip("this GPU has no float8 tensor cores")
    unet, cn = _engines(folder, Acceleration(cuda_graphs=True, compile=compile_, fp8=True))
    assert unet.fp8 and any(isinstance(m, Fp8Linear) for m in unet.unet.modules())
    name = sorted(cn.names)[0]
    assert any(isinstance(m, Fp8Linear) for m in cn.nets[name].modules())
    torch.manual_seed(0)
    x = unet_example_inputs(folder, 2, SIZE, SIZE, "cuda", torch.float16)
    args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"])
    atol = 1e-2 if compile_ else 2e-3
    graphed = unet(*args).clone()
    torch.testing.assert_close(graphed, unet.eager_step(*args, None, None), rtol=0, atol=atol)
    fp16 = UNetEngine(folder, "cuda", torch.float16)  # the same weights, no float8
    ref = fp16.eager_step(*args, None, None)
    rel = float((graphed.float() - ref.float()).norm() / ref.float().norm())
    assert 0 < rel < 0.1, rel

    image = torch.rand(1, 3, SIZE, SIZE, device="cuda", dtype=torch.float16).expand(2, -1, -1, -1)
    down, mid = cn(name, *args, image, 1.0, "img-1")
    with torch.no_grad():
        e_down, e_mid = cn.nets[name](args[0], args[1], encoder_hidden_states=args[2], controlnet_cond=image,
                                      conditioning_scale=1.0, added_cond_kwargs=args[3], return_dict=False)
    for a, b in zip(down + [mid], list(e_down) + [e_mid]):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)

    lora_file = tmp_path / "l.safetensors"
    make_random_lora(lora_file, fp16.unet, {}, rank=4, seed=3, fmt="peft")
    lora = parse_lora(read_lora_file(lora_file, "l"), "l", folder.family)
    unet.set_loras([(lora, 1.0)])
    with_lora = unet(*args).clone()
    torch.testing.assert_close(with_lora, unet.eager_step(*args, None, None), rtol=0, atol=atol)
    assert (with_lora - graphed).abs().max() > 1e-2
    unet.set_loras([])
    assert torch.equal(unet(*args), graphed)
