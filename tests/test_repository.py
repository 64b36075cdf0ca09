"""Rendering the Triton model repository: valid config.pbtxt for both families, CPU and GPU."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from katz.deploy.repository import MODELS, Placement, render_repository
from katz.deployment import Deployment
from katz.request import Limits


def _deployment(path, dtype="float32", **settings):
    from katz.models.folder import ModelFolder, discover_controlnets

    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    settings.setdefault("controlnet_mode", "inline")
    return Deployment(folder.path, folder.controlnets, path / "loras", Limits(), dtype=dtype, **settings)


def _configs(repo, models=MODELS):
    out = {}
    for model in models:
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((repo / model / "config.pbtxt").read_text(), cfg)
        assert (repo / model / "1").is_dir()
        out[model] = cfg
    return out


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
def test_renders_valid_configs(preset, preset_dir, tmp_path):
    dep = _deployment(preset_dir(preset))
    cfgs = _configs(render_repository(dep, tmp_path / "repo"))
    assert cfgs["katz"].platform == "ensemble"
    assert [s.model_name for s in cfgs["katz"].ensemble_scheduling.step] == [
        "preprocessing", "text_encoder", "katz_pipeline", "vae_decoder", "postprocessing", "png_encoder"]
    unet_inputs = {i.name for i in cfgs["unet"].input}
    n = dep.folder.num_down_residuals
    assert {f"down_residual_{i}" for i in range(n)} | {"mid_residual"} <= unet_inputs
    assert {o.name for o in cfgs["controlnet"].output} == {f"down_residual_{i}" for i in range(n)} | {"mid_residual"}
    assert ("text_embeds" in unet_inputs) == (preset == "tiny-sdxl")
    for model in MODELS[1:]:
        assert cfgs[model].backend == "python_katz"
        assert cfgs[model].parameters["model_dir"].string_value == str(dep.model_dir)
        assert cfgs[model].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    # every tensor an ensemble step reads is written by an earlier step or is an ensemble input
    available = {i.name for i in cfgs["katz"].input}
    for step in cfgs["katz"].ensemble_scheduling.step:
        model_inputs = {i.name: i for i in cfgs[step.model_name].input}
        for key, value in step.input_map.items():
            assert key in model_inputs and value in available, (step.model_name, key)
        required = {k for k, i in model_inputs.items() if not i.optional}
        assert required <= set(step.input_map), step.model_name
        available |= set(step.output_map.values())
    assert {o.name for o in cfgs["katz"].output} <= available
    # no step reads an ensemble output: Triton 2.51 prunes a step reading one when the request does
    # not want the step's outputs, and with it the step making the output (png_encoder reads _pixels)
    read = {v for step in cfgs["katz"].ensemble_scheduling.step for v in step.input_map.values()}
    assert not read & ({o.name for o in cfgs["katz"].output} - {i.name for i in cfgs["katz"].input})


def test_gpu_placement_renders_kind_gpu(preset_dir, tmp_path):
    dep = _deployment(preset_dir("tiny-sdxl"), dtype="float16")
    placement = Placement(device="cuda", counts={"unet": 2}, gpus={"unet": [0, 1], "controlnet": [1]})
    cfgs = _configs(render_repository(dep, tmp_path / "repo", placement))
    group = cfgs["unet"].instance_group[0]
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(group.gpus) == [0, 1] and group.count == 2
    assert list(cfgs["controlnet"].instance_group[0].gpus) == [1]
    assert cfgs["preprocessing"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfgs["unet"].input[0].data_type == model_config_pb2.TYPE_FP16
    # GPU models take GPU tensors as they come (the Python backend would copy every input to the host)
    for name in ("unet", "controlnet", "vae_decoder", "text_encoder"):
        assert cfgs[name].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no", name
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cfgs["preprocessing"].parameters
    # the loop runs inside the unet model (one shard): katz_pipeline and katz_stream only forward, on the host
    for name in ("katz_pipeline", "katz_stream"):
        assert cfgs[name].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cfgs[name].parameters
    looping = _configs(render_repository(_deployment(preset_dir("tiny-sdxl"), dtype="float16", loop="pipeline"),
                                         tmp_path / "looping", placement))
    for name in ("katz_pipeline", "katz_stream"):
        assert looping[name].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert looping[name].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no", name
    cpu_cfgs = _configs(render_repository(dep, tmp_path / "cpu", Placement(device="cpu")))
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu_cfgs["unet"].parameters
    assert "loop_progress" in {i.name for i in cpu_cfgs["unet"].input}
    # FLUX: katz_stream relays the transformer's loop and its step reports, on the host
    flux_repo = render_repository(_deployment(preset_dir("tiny-flux"), dtype="bfloat16"), tmp_path / "flux", placement)
    # inline too: a FLUX transformer runs its ControlNets itself, so there is no controlnet model
    assert not (flux_repo / "controlnet").exists()
    flux = _configs(flux_repo, tuple(m for m in MODELS if m != "controlnet"))
    assert flux["katz_stream"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert flux["unet"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    progress = next(i for i in flux["unet"].input if i.name == "loop_progress")
    assert progress.data_type == model_config_pb2.TYPE_STRING and progress.optional
    # FLUX mode service: a decoupled controlnet model, one response per block residual, on its GPUs
    service = _configs(render_repository(_deployment(preset_dir("tiny-flux"), dtype="bfloat16",
                                                     controlnet_mode="service"), tmp_path / "flux_service", placement))
    cn = service["controlnet"]
    assert cn.model_transaction_policy.decoupled and cn.parameters["role"].string_value == "controlnet"
    assert {o.name for o in cn.output} == {"residual", "block", "single"}
    assert {"hidden_states", "controlnet_cond", "img_ids"} <= {i.name for i in cn.input}
    assert list(cn.instance_group[0].gpus) == [1]
