"""TensorRT engines built from the tiny presets: parity with PyTorch, LoRA refit, faults.

Needs TensorRT (>= 10) and a CUDA GPU, as in NVIDIA's tritonserver image; skipped otherwise.
Everything that does not need them (export, onnxruntime parity, refit maps, config rendering)
is in tests/test_export.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it ships in NVIDIA's tritonserver image)")
if not torch.cuda.is_available():
    pytest.skip("TensorRT engines need a CUDA GPU", allow_module_level=True)

from katz.cli import main  # noqa: E402
from katz.engines.tensorrt import components as te  # noqa: E402
from katz.engines.torch.controlnet import ControlNetEngine  # noqa: E402
from katz.engines.torch.unet import UNetEngine  # noqa: E402
from katz.engines.torch.vae import VaeDecoderEngine  # noqa: E402
from katz.engines.tensorrt.manifest import EngineManifest, EngineMismatch  # noqa: E402
from katz.errors import LoraError  # noqa: E402
from katz.export.onnx_check import rel_l2  # noqa: E402
from katz.export.unet import UNetGraph  # noqa: E402
from katz.lora.safetensors import read_lora_file  # noqa: E402
from katz.lora.weights import LoraLayer, LoraWeights, parse_lora  # noqa: E402
from katz.models.folder import ModelFolder, discover_controlnets  # noqa: E402
from katz.request import Limits  # noqa: E402

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]
DEVICE = "cuda"
DTYPE = torch.float16
TOL = 5e-2  # float16 engines against float16 PyTorch (tiny random-weight nets, 2x2 latents included)
LIMITS = Limits(max_width=128, max_height=128, default_width=64, default_height=64)


def _folder(path: Path) -> ModelFolder:
    return ModelFolder(path, discover_controlnets(path / "controlnets"))


@pytest.fixture(scope="module")
def built(preset_dir, tmp_path_factory):
    """tiny-sdxl exported in float16 (with the UNet split) and built twice: full UNet, split UNet."""
    folder = _folder(preset_dir("tiny-sdxl"))
    root = tmp_path_factory.mktemp("trt")
    onnx_dir = root / "onnx"
    assert main(["export", "--model-dir", str(folder.path), "--out", str(onnx_dir), "--unet-split"]) == 0
    full, split = root / "engines-full", root / "engines-split"
    assert main(["build-engines", "--onnx", str(onnx_dir), "--out", str(full),
                 "--only", "unet,controlnet,vae_decoder"]) == 0
    assert main(["build-engines", "--onnx", str(onnx_dir), "--out", str(split), "--only", "unet_down,unet_up",
                 "--timing-cache", str(full / "timing.cache")]) == 0
    return {"folder": folder, "onnx": onnx_dir, "full": full, "split": split, "root": root}


def _inputs(folder, batch=2, size=64, seed=0):
    g = UNetGraph(folder)
    from katz.models.shapes import Shape

    x = g.sample_inputs(Shape(batch, size, size), torch.float32, seed=seed)
    half = {k for k, v in x.items() if v.is_floating_point() and k != "timestep"}
    return {k: (v.to(DEVICE, DTYPE) if k in half else v.to(DEVICE)) for k, v in x.items()}


def _lora(folder, name):
    return parse_lora(read_lora_file(folder.path / "loras" / f"{name}.safetensors", name), name, folder.family)


def _unet_call(engine, x, residuals=True):
    n = engine.num_residuals if hasattr(engine, "num_residuals") else None
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    down = [x[f"down_residual_{i}"] for i in range(n or 0)] if residuals else None
    return engine(x["sample"], x["timestep"], x["encoder_hidden_states"], added, down,
                  x["mid_residual"] if residuals else None)


@pytest.fixture(scope="module")
def torch_unet(built):
    engine = UNetEngine(built["folder"], DEVICE, DTYPE)
    engine.num_residuals = built["folder"].num_down_residuals
    return engine


def test_manifest_records_this_gpu_and_refit(built):
    m = EngineManifest.load(built["full"])
    assert m.tensorrt == trt.__version__
    assert set(m.engines) == {"unet", "controlnet_canny", "vae_decoder"}
    assert m.engines["unet"].refit and m.engines["controlnet_canny"].refit and not m.engines["vae_decoder"].refit
    assert (built["full"] / "vae_decoder" / "1" / "model.plan").exists()
    assert (built["full"] / "unet" / "1" / "unet.plan").exists()
    assert (built["full"] / "unet" / "1" / "unet.refit.json").exists()
    assert (built["full"] / "controlnet" / "1" / "canny.plan").exists()


@pytest.mark.parametrize("which", ["full", "split"])
def test_unet_engine_matches_pytorch(built, torch_unet, which):
    engine = te.TrtUNetEngine(built["folder"], DEVICE, DTYPE, engine_dir=built[which], limits=LIMITS)
    assert engine.split == (which == "split")
    for batch, size, residuals in ((2, 64, True), (1, 64, False), (2, 16, True), (1, 128, True)):
        x = _inputs(built["folder"], batch, size)
        got = _unet_call(engine, x, residuals)
        want = _unet_call(torch_unet, x, residuals)
        assert got.dtype == DTYPE and got.shape == want.shape
        assert rel_l2(got.float().cpu(), want.float().cpu()) <= TOL, (which, batch, size, residuals)
    # ControlNet parallelism: down() while the ControlNets run, then up() with their residuals
    x = _inputs(built["folder"])
    state = engine.down(x["sample"], x["timestep"], x["encoder_hidden_states"],
                        {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
    n = built["folder"].num_down_residuals
    got = engine.up(state, [x[f"down_residual_{i}"] for i in range(n)], x["mid_residual"])
    assert rel_l2(got.float().cpu(), _unet_call(torch_unet, x).float().cpu()) <= TOL


def test_controlnet_and_vae_engines_match_pytorch(built):
    folder = built["folder"]
    trt_cn = te.TrtControlNetEngine(folder, DEVICE, DTYPE, engine_dir=built["full"], limits=LIMITS)
    torch_cn = ControlNetEngine(folder, DEVICE, DTYPE)
    x = _inputs(folder)
    image = torch.rand(2, 3, 64, 64, device=DEVICE, dtype=DTYPE)
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    t = x["timestep"][:1]  # the Triton controlnet model gets timestep [1]
    got = trt_cn("canny", x["sample"], t, x["encoder_hidden_states"], added, image, 0.7)
    want = torch_cn("canny", x["sample"], t, x["encoder_hidden_states"], added, image, 0.7)
    assert len(got[0]) == len(want[0]) == folder.num_down_residuals
    for a, b in zip(got[0] + [got[1]], want[0] + [want[1]]):
        assert rel_l2(a.float().cpu(), b.float().cpu()) <= TOL

    trt_vae = te.TrtVaeDecoderEngine(folder, DEVICE, DTYPE, engine_dir=built["full"], limits=LIMITS)
    torch_vae = VaeDecoderEngine(folder, DEVICE, DTYPE)
    latents = torch.randn(1, 4, 8, 8, device=DEVICE, dtype=DTYPE)
    assert rel_l2(trt_vae(latents).float().cpu(), torch_vae(latents).float().cpu()) <= TOL


@pytest.mark.parametrize("which", ["full", "split"])
def test_lora_refit_matches_pytorch_and_restores_exactly(built, which):
    folder = built["folder"]
    engine = te.TrtUNetEngine(folder, DEVICE, DTYPE, engine_dir=built[which], limits=LIMITS)
    ref = UNetEngine(folder, DEVICE, DTYPE)
    ref.num_residuals = folder.num_down_residuals
    x = _inputs(folder, seed=4)
    base1, base2 = _unet_call(engine, x), _unet_call(engine, x)
    loras = [(_lora(folder, "style"), 0.8), (_lora(folder, "detail"), -0.5)]
    engine.set_loras(loras)
    ref.set_loras(loras)
    got, want = _unet_call(engine, x), _unet_call(ref, x)
    err = rel_l2(got.float().cpu(), want.float().cpu())
    assert err <= TOL
    assert rel_l2(got.float().cpu(), base1.float().cpu()) > 5 * err  # the LoRAs do change the output
    assert engine.lora.applied == (("style", 0.8), ("detail", -0.5))
    engine.set_loras([(loras[0][0], 0.8)])  # one goes: its weights are refitted back to the base
    ref.set_loras([(loras[0][0], 0.8)])
    assert rel_l2(_unet_call(engine, x).float().cpu(), _unet_call(ref, x).float().cpu()) <= TOL
    engine.set_loras([])
    restored = _unet_call(engine, x)
    if torch.equal(base1, base2):  # deterministic engine: the base weights are back bit for bit
        assert torch.equal(restored, base1)
    else:
        noise = rel_l2(base2.float().cpu(), base1.float().cpu())
        assert rel_l2(restored.float().cpu(), base1.float().cpu()) <= 2 * noise


def test_lora_the_engine_cannot_refit_fails_naming_the_targets(built):
    from katz.errors import is_user_error

    folder = built["folder"]
    engine = te.TrtUNetEngine(folder, DEVICE, DTYPE, engine_dir=built["full"], limits=LIMITS)
    x = _inputs(folder, seed=5)
    base = _unet_call(engine, x)
    ok = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = LoraLayer(torch.randn(2, 64) * 0.1, torch.randn(64, 2) * 0.1, None, "k1")
    bad = LoraWeights("bad", {"unet": {ok: layer, "down_blocks.1.resnets.0.norm1": layer, "nope.linear": layer}})
    with pytest.raises(LoraError) as info:
        engine.lora.validate(bad)
    assert "down_blocks.1.resnets.0.norm1" in str(info.value) and "nope.linear" in str(info.value)
    assert is_user_error(info.value)
    with pytest.raises(LoraError):
        engine.set_loras([(bad, 1.0)])
    assert engine.lora.applied == ()
    assert rel_l2(_unet_call(engine, x).float().cpu(), base.float().cpu()) <= 1e-6


def test_weight_stripped_plans_load_by_refitting_from_onnx(built):
    folder = built["folder"]
    stripped = built["root"] / "engines-stripped"
    assert main(["build-engines", "--onnx", str(built["onnx"]), "--out", str(stripped), "--only", "unet",
                 "--strip-weights", "--timing-cache", str(built["full"] / "timing.cache")]) == 0
    m = EngineManifest.load(stripped)
    assert m.engines["unet"].weight_stripped
    full_plan = built["full"] / "unet" / "1" / "unet.plan"
    assert (stripped / "unet" / "1" / "unet.plan").stat().st_size < full_plan.stat().st_size
    a = te.TrtUNetEngine(folder, DEVICE, DTYPE, engine_dir=stripped, limits=LIMITS)
    b = te.TrtUNetEngine(folder, DEVICE, DTYPE, engine_dir=built["full"], limits=LIMITS)
    x = _inputs(folder, seed=6)
    assert rel_l2(_unet_call(a, x).float().cpu(), _unet_call(b, x).float().cpu()) <= 1e-3
    a.set_loras([(_lora(folder, "style"), 1.0)])  # stripped plans are refittable like the others
    b.set_loras([(_lora(folder, "style"), 1.0)])
    assert rel_l2(_unet_call(a, x).float().cpu(), _unet_call(b, x).float().cpu()) <= 1e-3
    b.set_loras([])
    assert rel_l2(_unet_call(a, x).float().cpu(), _unet_call(b, x).float().cpu()) > 1e-2


def test_engines_for_another_gpu_version_or_range_are_refused(built, tmp_path):
    folder = built["folder"]
    cases = {
        "tensorrt": ("0.0.1", "TensorRT 0.0.1"),
        "compute_capability": ("1.0", "compute capability 1.0"),
    }
    for key, (value, message) in cases.items():
        d = tmp_path / key
        shutil.copytree(built["full"], d, symlinks=True)
        data = json.loads((d / "engines.json").read_text())
        data[key] = value
        (d / "engines.json").write_text(json.dumps(data))
        with pytest.raises(EngineMismatch) as info:
            te.TrtUNetEngine(folder, DEVICE, DTYPE, engine_dir=d, limits=LIMITS)
        assert message in str(info.value) and "katz build-engines --onnx" in str(info.value)
    big = Limits(max_width=4096, max_height=4096, default_width=64, default_height=64)
    with pytest.raises(EngineMismatch, match="--max-size 4096"):
        te.TrtVaeDecoderEngine(folder, DEVICE, DTYPE, engine_dir=built["full"], limits=big)
    d = tmp_path / "corrupt"
    shutil.copytree(built["full"], d, symlinks=True)
    (d / "vae_decoder" / "1" / "model.plan").write_bytes(b"\0" * 1024)
    with pytest.raises(EngineMismatch, match="could not load"):
        te.TrtVaeDecoderEngine(folder, DEVICE, DTYPE, engine_dir=d, limits=LIMITS)
    # a request outside the built range is refused per request, naming the field
    from katz.errors import InvalidArgument

    engine = te.TrtVaeDecoderEngine(folder, DEVICE, DTYPE, engine_dir=built["full"], limits=LIMITS)
    with pytest.raises(InvalidArgument) as info:
        engine(torch.randn(1, 4, 8, 64, device=DEVICE, dtype=DTYPE))  # 512 px wide > 128
    assert info.value.field == "width" and "katz build-engines" in str(info.value)


def test_unet_model_serves_with_tensorrt_and_loras(built):
    import numpy as np

    from katz.deployment import Deployment
    from katz.serving.unet import UNet

    folder = built["folder"]
    dep = Deployment(folder.path, folder.controlnets, folder.path / "loras", LIMITS, device=DEVICE,
                     dtype="float16", engine="tensorrt", engine_dir=built["full"], controlnet_mode="inline")
    model = UNet(dep)
    assert isinstance(model.engine, te.TrtUNetEngine)
    x = _inputs(folder, seed=7)
    inputs = {k: v for k, v in x.items() if not k.startswith(("down_residual", "mid_residual"))}
    inputs["timestep"] = x["timestep"].reshape(-1, 1).float()
    base = model.execute(inputs)["noise_pred"]
    with_lora = dict(inputs, loras=np.array([[b"style"]] * 2, dtype=object),
                     lora_scales=torch.tensor([[1.0]] * 2), lora_wait=torch.ones(2, 1, dtype=torch.bool))
    out = model.execute(with_lora)
    assert bool(out["lora_applied"].all())
    assert rel_l2(out["noise_pred"].float().cpu(), base.float().cpu()) > 1e-2


def test_render_links_the_real_vae_plan(built, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from katz.deploy.repository import MODELS, Placement, render_repository
    from katz.deployment import Deployment

    folder = built["folder"]
    dep = Deployment(folder.path, folder.controlnets, None, LIMITS, device=DEVICE, dtype="float16",
                     engine="tensorrt", engine_dir=built["full"], controlnet_mode="inline")
    repo = render_repository(dep, tmp_path / "repo", Placement(device="cuda", gpus={m: [0] for m in MODELS}))
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse((repo / "vae_decoder" / "config.pbtxt").read_text(), cfg)
    assert cfg.platform == "tensorrt_plan" and cfg.input[0].data_type == model_config_pb2.TYPE_FP16
    plan = (repo / "vae_decoder" / "1" / "model.plan").read_bytes()
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan)
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {i.name for i in cfg.input} | {o.name for o in cfg.output}
