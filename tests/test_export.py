"""ONNX export, onnxruntime parity, LoRA refit maps, engine selection and tensorrt_plan rendering.

Everything here runs without TensorRT or a GPU (CI); tests/test_tensorrt.py builds and runs the
engines where TensorRT is installed.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from katz.cli import main
from katz.deploy.repository import MODELS, Placement, render_repository
from katz.deployment import Deployment
from katz.engines.tensorrt.manifest import (
    EngineManifest,
    EngineMismatch,
    EngineRecord,
    RuntimeInfo,
    compatibility_problems,
    required_ranges,
)
from katz.errors import LoraError
from katz.export.graph import export_graph
from katz.export.manifest import ExportManifest, graphs_for
from katz.export.onnx_check import check_export, check_graph, rel_l2
from katz.lora.patch import LoraPatcher
from katz.lora.refit_map import RefitMap, build_refit_map, lora_targets, plan_lora, verify_values
from katz.lora.safetensors import read_lora_file
from katz.lora.weights import LoraLayer, LoraWeights, parse_lora
from katz.models.folder import ModelFolder, discover_controlnets
from katz.models.shapes import Shape, ShapeRanges
from katz.request import Limits

PRESETS = ["tiny-sdxl", "tiny-sd15"]


def _folder(path: Path) -> ModelFolder:
    return ModelFolder(path, discover_controlnets(path / "controlnets"))


@pytest.fixture(scope="module")
def exported(preset_dir, tmp_path_factory):
    """float32 exports of both presets, made by `katz export` (tiny-sdxl with the UNet split)."""
    done = {}

    def get(preset: str) -> tuple[Path, ModelFolder]:
        if preset not in done:
            out = tmp_path_factory.mktemp(f"onnx-{preset}")
            split = ["--unet-split"] if preset == "tiny-sdxl" else []
            rc = main(["export", "--model-dir", str(preset_dir(preset)), "--out", str(out),
                       "--dtype", "float32", *split])
            assert rc == 0
            done[preset] = (out, _folder(preset_dir(preset)))
        return done[preset]

    return get


# --------------------------------------------------------------------------- #
# Export and parity
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("preset", PRESETS)
def test_every_graph_matches_pytorch_in_onnxruntime(preset, exported, capsys):
    out, folder = exported(preset)
    manifest = ExportManifest.load(out)
    expected = {"unet", "controlnet_canny", "vae_decoder", "text_encoder"}
    if preset == "tiny-sdxl":
        expected |= {"text_encoder_2", "unet_down", "unet_up"}
    assert set(manifest.graphs) == expected
    assert manifest.opset >= 17 and manifest.dtype == "float32"
    results = check_export(out, folder)  # raises ParityError above 1e-3
    with capsys.disabled():
        worst: dict[str, float] = {}
        for r in results:
            worst[r.graph] = max(worst.get(r.graph, 0.0), r.rel_l2)
        print(f"\n{preset}: worst relative L2 per graph (ORT CPU vs PyTorch, float32, 3 shapes each):")
        for g, v in sorted(worst.items()):
            print(f"  {g:<20} {v:.2e}")
    assert len({r.shape for r in results}) >= 3  # the traced shape and two others: dynamic axes work
    assert max(r.rel_l2 for r in results) <= 1e-3


def test_exported_tensor_names_are_the_triton_models(exported, tmp_path):
    out, folder = exported("tiny-sdxl")
    dep = Deployment(folder.path, folder.controlnets, None, Limits(), controlnet_mode="inline")
    repo = render_repository(dep, tmp_path / "repo")
    cfgs = {}
    for model in ("unet", "controlnet", "vae_decoder"):
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((repo / model / "config.pbtxt").read_text(), cfg)
        cfgs[model] = cfg
    for graph, model in (("unet", "unet"), ("controlnet_canny", "controlnet"), ("vae_decoder", "vae_decoder")):
        m = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        ins, outs = {i.name for i in m.graph.input}, {o.name for o in m.graph.output}
        cfg_in, cfg_out = {i.name for i in cfgs[model].input}, {o.name for o in cfgs[model].output}
        assert ins <= cfg_in, (graph, ins - cfg_in)
        assert outs <= cfg_out, (graph, outs - cfg_out)
    n = folder.num_down_residuals
    unet = onnx.load(str(out / "unet.onnx"), load_external_data=False)
    assert [i.name for i in unet.graph.input] == (
        ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        + [f"down_residual_{i}" for i in range(n)] + ["mid_residual"]
    )
    assert [o.name for o in unet.graph.output] == ["noise_pred"]


def test_initializers_keep_pytorch_parameter_names(exported):
    out, folder = exported("tiny-sd15")
    unet = folder.load_unet()
    m = onnx.load(str(out / "unet.onnx"))
    names = {i.name for i in m.graph.initializer}
    params = {n for n, _ in unet.named_parameters()}
    # every parameter is its own initializer: none renamed, none merged with an equal-valued one
    # (the tiny UNet's GroupNorm weights are all ones, which the exporter would otherwise merge)
    assert params <= names, sorted(params - names)[:5]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in names
    folded = [i for i in m.graph.initializer if i.doc_string.startswith("katz: transposed")]
    assert folded and all(len(i.dims) == 2 for i in folded)
    assert not any(n.op_type == "Transpose" and n.input[0] in names for n in m.graph.node)


def test_shape_profile_follows_the_unet_layout(exported):
    from katz.export.controlnet import ControlNetGraph
    from katz.export.unet import UNetGraph

    _, folder = exported("tiny-sdxl")
    ranges = ShapeRanges(min_batch=1, opt_batch=2, max_batch=2, min_size=16, opt_size=64, max_size=128)
    prof = UNetGraph(folder).profile(ranges)
    assert prof["sample"] == ((1, 4, 2, 2), (2, 4, 8, 8), (2, 4, 16, 16))
    assert prof["timestep"] == ((1,), (2,), (2,))
    assert prof["encoder_hidden_states"][2] == (2, 77, 64)
    # the residual shapes the profile expects are what the ControlNet really returns
    cn = ControlNetGraph(folder, "canny")
    net = cn.load(torch.float32)
    shape = Shape(2, 72, 40)  # latent 9x5: odd sizes round up at each downsampler
    outs = cn.reference(net, cn.sample_inputs(shape, torch.float32))
    expected = UNetGraph(folder).shapes(shape)
    for name, t in outs.items():
        assert tuple(t.shape) == expected[name], name


def test_float16_export_is_valid_and_close(preset_dir, tmp_path):
    folder = _folder(preset_dir("tiny-sd15"))
    ranges = ShapeRanges.for_folder(folder)
    for graph in graphs_for(folder, ["unet", "vae_decoder", "text_encoder"]):
        comp = graph.load(torch.float16)
        rec = export_graph(graph, tmp_path, "float16", ranges, component=comp)
        m = onnx.load(str(tmp_path / rec.file))
        onnx.checker.check_model(m, full_check=True)  # strongly typed: every op's types agree
        # the VAE asks for float32 (force_upcast, diffusers' default): its weights stay float32 inside
        # a graph whose tensors are float16, as diffusers decodes
        weights = onnx.TensorProto.FLOAT if graph.name == "vae_decoder" else onnx.TensorProto.FLOAT16
        assert {i.data_type for i in m.graph.initializer if len(i.dims) >= 2} == {weights}, graph.name
        types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
        assert {o.type.tensor_type.elem_type for o in m.graph.output} == {onnx.TensorProto.FLOAT16}, graph.name
        if graph.name == "unet":
            assert types["timestep"] == onnx.TensorProto.FLOAT and types["sample"] == onnx.TensorProto.FLOAT16
        res = check_graph(graph, tmp_path / rec.file, "float16", ranges, component=comp,
                          shapes=[Shape(1, 64, 64)])
        assert max(r.rel_l2 for r in res) <= 2e-2, res


# --------------------------------------------------------------------------- #
# Refit maps
# --------------------------------------------------------------------------- #
def _lora(folder: Path, name: str, family: str) -> LoraWeights:
    return parse_lora(read_lora_file(folder / "loras" / f"{name}.safetensors", name), name, family)


@pytest.mark.parametrize("preset", PRESETS)
def test_refit_map_covers_every_lora_target(preset, exported, preset_dir, capsys):
    out, folder = exported(preset)
    comps = {"unet": folder.load_unet(), "controlnet_canny": folder.load_controlnet("canny")}
    comps.update(folder.load_text_encoders())
    report = []
    for graph, module in comps.items():
        refit = RefitMap.load(out / f"{graph}.refit.json")
        model = onnx.load(str(out / f"{graph}.onnx"))
        targets = lora_targets(module)  # every Linear and Conv2d
        inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
        # checked against the ONNX initializers: name, shape (or its transpose, flagged), value
        for path, entry in refit.entries.items():
            assert inits[entry.onnx_name] == entry.shape
            w = tuple(targets[path].weight.shape)
            assert entry.torch_shape == w and entry.shape == (tuple(reversed(w)) if entry.transposed else w)
        assert verify_values(refit, model, module) == []
        mapped, unused, missing = refit.coverage(targets)
        assert missing == [] and refit.unmapped == [] and refit.problems == []
        if graph in ("unet", "controlnet_canny"):
            assert len(mapped) == len(targets)  # 100%: the whole network is in the graph
        assert any(e.transposed for e in refit.entries.values())  # Linear weights as MatMul operands
        report.append(f"  {graph:<16} {len(mapped)}/{len(targets)} Linear/Conv2d mapped"
                      f"{f', {len(unused)} unused by the graph' if unused else ''}, "
                      f"{sum(e.transposed for e in refit.entries.values())} transposed")
    # the preset's own LoRAs (peft 'style' on the UNet, kohya 'detail' on the UNet and text encoders)
    family = folder.family
    for name in ("style", "detail"):
        lora = _lora(folder.path, name, family)
        for component, layers in lora.layers.items():
            graph = component
            refit = RefitMap.load(out / f"{graph}.refit.json")
            mapped, unused, missing = refit.coverage(layers)
            assert missing == [], (name, component, missing)
            if component == "unet":
                assert len(mapped) == len(layers)
            report.append(f"  lora {name!r} {component:<15} {len(mapped)}/{len(layers)} targets mapped"
                          f"{f', {len(unused)} unused by the graph (no-op)' if unused else ''}")
    with capsys.disabled():
        print(f"\n{preset} refit coverage:\n" + "\n".join(report))


def test_unet_split_maps_cover_the_unet_between_them(exported):
    out, folder = exported("tiny-sdxl")
    maps = [RefitMap.load(out / f"{g}.refit.json") for g in ("unet_down", "unet_up")]
    targets = set(lora_targets(folder.load_unet()))
    assert set(maps[0].entries) | set(maps[1].entries) == targets
    assert not set(maps[0].entries) & set(maps[1].entries)
    lora = _lora(folder.path, "detail", "sdxl")
    plans = plan_lora([(m, None) for m in maps], lora)
    assert sum(len(p) for p in plans) == len(lora.layers["unet"])


def test_refit_map_traces_constant_folded_weights(preset_dir, tmp_path):
    """With the exporter's constant folding, Linear weights become anonymous transposed
    ``onnx::MatMul_N`` initializers; the map finds their modules through the graph."""
    from katz.export.unet import UNetGraph

    folder = _folder(preset_dir("tiny-sd15"))
    graph = UNetGraph(folder)
    unet = graph.load(torch.float32)
    export_graph(graph, tmp_path, "float32", component=unet, constant_folding=True, fold_transposes=False)
    model = onnx.load(str(tmp_path / "unet.onnx"))
    refit = build_refit_map(model, unet, "unet")
    targets = lora_targets(unet)
    anonymous = [e for e in refit.entries.values() if e.onnx_name.startswith("onnx::")]
    assert anonymous and all(e.transposed for e in anonymous)
    assert set(refit.entries) == set(targets) and refit.problems == []
    assert verify_values(refit, model, unet) == []


def test_lora_refit_through_the_map_equals_the_pytorch_merge(exported):
    """Refit emulated on the ONNX initializers (what IRefitter.set_named_weights does to the
    engine): the merged weights equal LoraPatcher's bit for bit, and onnxruntime then matches
    the LoRA-patched PyTorch UNet."""
    from katz.export.unet import UNetGraph

    out, folder = exported("tiny-sdxl")
    refit = RefitMap.load(out / "unet.refit.json")
    model = onnx.load(str(out / "unet.onnx"))
    loras = [(_lora(folder.path, "style", "sdxl"), 0.8), (_lora(folder.path, "detail", "sdxl"), -0.5)]

    per_weight: dict[str, tuple] = {}
    for lora, scale in loras:
        for entry, layer in refit.plan(lora):
            per_weight.setdefault(entry.onnx_name, (entry, []))[1].append((scale, layer))
    inits = {i.name: i for i in model.graph.initializer}
    merged = {}
    for name, (entry, items) in per_weight.items():
        base = torch.from_numpy(onnx.numpy_helper.to_array(inits[name]).copy())
        merged[name] = RefitMap.merged_weight(entry, base, items)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(merged[name].numpy(), name))

    graph = UNetGraph(folder)
    unet = graph.load(torch.float32)
    patcher = LoraPatcher(unet, "unet")
    patcher.apply(loras)
    modules = dict(unet.named_modules())
    for name, (entry, _items) in per_weight.items():
        assert torch.equal(entry.to_torch_layout(merged[name]), modules[entry.module].weight.detach()), entry.module

    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = graph.sample_inputs(Shape(2, 64, 64), torch.float32, seed=3)
    got = sess.run(["noise_pred"], {k: v.numpy() for k, v in inputs.items()})[0]
    expected = graph.reference(unet, inputs)["noise_pred"].numpy()
    assert rel_l2(got, expected) <= 1e-3
    # and the base weights come back exactly
    patcher.restore()
    base = onnx.load(str(out / "unet.onnx"))
    for i in base.graph.initializer:
        if i.name in per_weight:
            entry = per_weight[i.name][0]
            value = torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
            assert torch.equal(entry.to_torch_layout(value), modules[entry.module].weight.detach())


def test_lora_with_targets_the_engine_cannot_refit_fails_naming_them(exported):
    from katz.errors import is_user_error

    out, folder = exported("tiny-sdxl")
    refit = RefitMap.load(out / "unet.refit.json")
    layer = LoraLayer(down=torch.randn(2, 64), up=torch.randn(64, 2), alpha=None, key="k")
    ok = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    norm = LoraLayer(torch.randn(2, 64), torch.randn(64, 2), None)
    bad = {"not.a.module": layer, "down_blocks.1.resnets.0.norm1": norm}
    lora = LoraWeights("bad", {"unet": {ok: layer, **bad}})
    with pytest.raises(LoraError) as info:
        refit.plan(lora)
    msg = str(info.value)
    assert "not.a.module" in msg and "down_blocks.1.resnets.0.norm1" in msg and ok not in msg
    assert msg.startswith("lora 'bad'") and is_user_error(info.value)  # -> INVALID_ARG
    # weights the engine does not expose as refittable (e.g. built without REFIT) count as missing
    entry = refit.entries[ok]
    with pytest.raises(LoraError, match="to_q"):
        plan_lora([(refit, set())], LoraWeights("x", {"unet": {ok: layer}}))
    assert plan_lora([(refit, {entry.onnx_name})], LoraWeights("x", {"unet": {ok: layer}}))[0][0][0] == entry
    # a shape that does not fit is named too
    wrong = LoraLayer(down=torch.randn(2, 7), up=torch.randn(64, 2), alpha=None)
    with pytest.raises(LoraError, match="shape mismatch"):
        refit.plan(LoraWeights("w", {"unet": {ok: wrong}}))


def test_lora_on_modules_a_graph_does_not_use_is_a_no_op(exported):
    """SDXL reads the penultimate layer of text_encoder: its last layer is not in the graph,
    so a LoRA there changes nothing and must not be refused."""
    out, folder = exported("tiny-sdxl")
    refit = RefitMap.load(out / "text_encoder.refit.json")
    assert any(u.startswith("encoder.layers.2.") for u in refit.unused)
    lora = _lora(folder.path, "detail", "sdxl")
    plan = refit.plan(lora)
    assert plan and all(not e.module.startswith("encoder.layers.2.") for e, _ in plan)


# --------------------------------------------------------------------------- #
# Engines, deployment, rendering (no TensorRT needed)
# --------------------------------------------------------------------------- #
def _fake_engines(out: Path, export_dir: Path, dtype: str = "float32") -> Path:
    """An engine folder whose manifest is real but whose plan files are placeholders."""
    export = ExportManifest.load(export_dir)
    manifest = EngineManifest(
        tensorrt="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", hardware_compatible=False,
        ranges=export.ranges, export_dir=str(export_dir), model_dir=export.model_dir, family=export.family,
    )
    for g in export.graphs.values():
        from katz.engines.tensorrt.manifest import engine_path

        rec = EngineRecord(
            name=g.name, model=g.model, file=engine_path(g.name, g.model), onnx=str(export_dir / g.file),
            onnx_sha256=g.sha256, precision="fp16", io_dtype=dtype, refit=g.refit, weight_stripped=False,
            profile=g.profile, inputs=g.inputs, outputs=g.outputs,
        )
        (out / rec.file).parent.mkdir(parents=True, exist_ok=True)
        (out / rec.file).write_bytes(b"not a real plan")
        manifest.engines[g.name] = rec
    manifest.save(out)
    return out


def test_engine_compatibility_is_checked_with_a_rebuild_hint(exported, tmp_path):
    out, _ = exported("tiny-sdxl")
    manifest = EngineManifest.load(_fake_engines(tmp_path / "engines", out))
    same = RuntimeInfo("10.3.0", "NVIDIA H200", "9.0")
    assert compatibility_problems(manifest, same) == []  # same architecture, another SKU: fine
    problems = compatibility_problems(manifest, RuntimeInfo("10.5.0", "NVIDIA L40S", "8.9"))
    text = "; ".join(problems)
    assert "TensorRT 10.3.0" in text and "10.5.0" in text
    assert "H100" in text and "L40S" in text and "8.9" in text
    need = required_ranges(Limits(max_width=2048, max_height=2048, default_width=64, default_height=64),
                           manifest.ranges)
    text = "; ".join(compatibility_problems(manifest, same, need))
    assert "size" in text and "2048" in text and f"{manifest.ranges.max_size}" in text
    hint = manifest.rebuild_hint(tmp_path / "engines", need)
    assert "katz build-engines --onnx" in hint and "--max-size 2048" in hint
    manifest.hardware_compatible = True
    assert compatibility_problems(manifest, RuntimeInfo("10.3.0", "NVIDIA A10", "8.6")) == []
    assert compatibility_problems(manifest, RuntimeInfo("10.3.0", "Tesla T4", "7.5"))


def test_deployment_selects_the_engine(preset_dir, tmp_path):
    from katz.engines import engine_class
    from katz.engines.tensorrt import components as trt_engines  # imports without TensorRT
    from katz.engines.torch.unet import UNetEngine

    folder = _folder(preset_dir("tiny-sdxl"))
    dep = Deployment(folder.path, folder.controlnets, None, Limits(), engine="tensorrt", engine_dir=tmp_path, controlnet_mode="inline")
    params = dep.to_parameters()
    assert params["engine"] == "tensorrt" and params["engine_dir"] == str(tmp_path)
    back = Deployment.from_parameters(params, "cpu")
    assert back.engine == "tensorrt" and back.engine_dir == tmp_path
    assert Deployment.from_parameters({**params, "engine": "torch", "engine_dir": ""}, "cpu").engine == "torch"
    with pytest.raises(ValueError, match="engine"):
        Deployment.from_parameters({**params, "engine": "onnx"}, "cpu")
    with pytest.raises(ValueError, match="engine_dir"):
        Deployment.from_parameters({**params, "engine_dir": ""}, "cpu")
    torch_dep = Deployment(folder.path, folder.controlnets, None, Limits(), controlnet_mode="inline")
    torch_unet = engine_class(torch_dep, "unet")  # the torch class, given the deployment's CUDA-graph settings
    assert torch_unet.func is UNetEngine and torch_unet.keywords["accel"] is torch_dep.accel
    with pytest.raises(ValueError, match="text_encoder"):
        engine_class(torch_dep, "text_encoder")
    cls = engine_class(back, "vae_decoder")
    assert cls.func is trt_engines.TrtVaeDecoderEngine and cls.keywords["engine_dir"] == tmp_path
    with pytest.raises(EngineMismatch, match="katz build-engines"):  # no engines.json there
        cls(folder, "cpu", torch.float32)


def test_tensorrt_engines_need_a_cuda_device(exported, tmp_path):
    from katz.engines.tensorrt.components import TrtVaeDecoderEngine

    out, folder = exported("tiny-sdxl")
    engines = _fake_engines(tmp_path / "engines", out)
    with pytest.raises(EngineMismatch, match="CUDA"):
        TrtVaeDecoderEngine(folder, "cpu", torch.float32, engine_dir=engines)


def test_render_serves_the_vae_engine_as_a_tensorrt_plan(exported, tmp_path):
    out, folder = exported("tiny-sdxl")
    engines = _fake_engines(tmp_path / "engines", out, dtype="float32")
    dep = Deployment(folder.path, folder.controlnets, None, Limits(), device="cuda", dtype="float32",
                     engine="tensorrt", engine_dir=engines, controlnet_mode="inline")
    placement = Placement(device="cuda", gpus={m: [0] for m in MODELS})
    repo = render_repository(dep, tmp_path / "repo", placement)
    cfgs = {}
    for model in MODELS:
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((repo / model / "config.pbtxt").read_text(), cfg)
        cfgs[model] = cfg
    vae = cfgs["vae_decoder"]
    assert vae.platform == "tensorrt_plan" and not vae.backend
    assert vae.default_model_filename == "model.plan" and vae.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims)) for i in vae.input] == [
        ("latents", model_config_pb2.TYPE_FP32, [-1, 4, -1, -1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in vae.output] == [
        ("image", model_config_pb2.TYPE_FP32, [-1, 3, -1, -1])]
    assert vae.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    plan = repo / "vae_decoder" / "1" / "model.plan"
    assert plan.resolve() == (engines / "vae_decoder" / "1" / "model.plan").resolve()
    # the ensemble still feeds it the pipeline's latents, and the Python models get the engine folder
    step = [s for s in cfgs["katz"].ensemble_scheduling.step if s.model_name == "vae_decoder"][0]
    assert set(step.input_map) == {"latents"} and set(step.output_map) == {"image"}
    for model in ("unet", "controlnet"):
        assert cfgs[model].backend == "python_katz"
        assert cfgs[model].parameters["engine"].string_value == "tensorrt"
        assert cfgs[model].parameters["engine_dir"].string_value == str(engines)
    # engines made for another dtype are refused when rendering, with the fix
    dep16 = Deployment(folder.path, folder.controlnets, None, Limits(), device="cuda", dtype="float16",
                       engine="tensorrt", engine_dir=engines, controlnet_mode="inline")
    with pytest.raises(EngineMismatch, match="--dtype float32"):
        render_repository(dep16, tmp_path / "repo16", placement)


def test_build_engines_without_tensorrt_says_so(exported, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: tests/test_tensorrt.py builds real engines")
    except ImportError:
        pass
    out, _ = exported("tiny-sd15")
    rc = main(["build-engines", "--onnx", str(out), "--out", str(tmp_path / "engines")])
    assert rc == 2
    assert "TensorRT cannot be imported" in capsys.readouterr().err
    rc = main(["build-engines", "--onnx", str(tmp_path / "nothing"), "--out", str(tmp_path / "engines")])
    assert rc == 2 and "katz export" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# The TensorRT UNet's LoRA refitter, against a stand-in IRefitter (CPU)
# --------------------------------------------------------------------------- #
class _FakeRefitter:
    """Just enough of tensorrt.Refitter: named weights read from the pointers it is given,
    pending until refit; to_q/to_k/to_v act as one fused weight (get_missing_weights)."""

    def __init__(self, weights, reject=()):
        self.weights = {k: v.copy() for k, v in weights.items()}
        self.pending, self.reject, self.refits = {}, set(reject), 0

    def get_all_weights(self):
        return list(self.weights)

    def get_weights_prototype(self, name):
        import types

        a = self.weights[name]
        return types.SimpleNamespace(dtype="FLOAT" if a.dtype.itemsize == 4 else "HALF", size=a.size)

    def set_named_weights(self, name, w, location):
        import ctypes

        import numpy as np

        if name in self.reject or name not in self.weights:
            return False
        a = self.weights[name]
        raw = bytes((ctypes.c_byte * (w.size * a.itemsize)).from_address(w.ptr))
        self.pending[name] = np.frombuffer(raw, dtype=a.dtype).reshape(a.shape).copy()
        return True

    def get_missing_weights(self):
        fused = ("to_q.weight", "to_k.weight", "to_v.weight")
        out = set()
        for n in self.pending:
            for p in fused:
                if n.endswith(p):
                    stem = n[: -len(p)]
                    out |= {stem + q for q in fused if stem + q in self.weights}
        return sorted(out - set(self.pending))

    def refit_cuda_engine_async(self, stream):
        if self.get_missing_weights():
            return False
        self.weights.update(self.pending)
        self.pending, self.refits = {}, self.refits + 1
        return True


def test_tensorrt_lora_refitter_merges_restores_and_rolls_back(exported, monkeypatch):
    import threading
    import types

    from katz.engines.tensorrt import refit as te

    out, folder = exported("tiny-sdxl")
    base = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out / "unet.onnx")).graph.initializer}
    fake_trt = types.SimpleNamespace(
        DataType=types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", BOOL="BOOL", INT8="INT8", BF16="BF16"),
        TensorLocation=types.SimpleNamespace(DEVICE="DEVICE"),
        Weights=lambda dtype, ptr, count: types.SimpleNamespace(dtype=dtype, ptr=ptr, size=count),
    )
    stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)

    def refitter(reject=()):
        fake = _FakeRefitter(base, reject)
        engine = types.SimpleNamespace(
            trt=fake_trt, refitter=fake, device=torch.device("cpu"), lock=threading.RLock(), engine_dir=out,
            record=types.SimpleNamespace(onnx=str(out / "unet.onnx"), file="unet/1/unet.plan"),
            manifest=types.SimpleNamespace(rebuild_hint=lambda d: "rebuild"),
        )
        part = te.RefitPart(engine, RefitMap.load(out / "unet.refit.json"))
        return te.TrtLoraRefitter([part], "unet", "rebuild"), fake, part.map

    def is_base(fake):
        return all(np_equal(fake.weights[k], v) for k, v in base.items()) and not fake.pending

    def np_equal(a, b):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()

    loras = [(_lora(folder.path, "style", "sdxl"), 0.8), (_lora(folder.path, "detail", "sdxl"), -0.5)]
    unet = folder.load_unet()
    patcher, modules = LoraPatcher(unet, "unet"), dict(unet.named_modules())
    lora_refitter, fake, refit = refitter()

    def matches_patcher():
        # the same float32 sum, rounded once; the BLAS may order it differently (addmm / baddbmm
        # in the patcher, matmul then add here), so a bit or two apart: not a LoRA's worth
        for m, e in refit.entries.items():
            merged = e.to_torch_layout(torch.from_numpy(fake.weights[e.onnx_name]))
            weight = modules[m].weight.detach()
            torch.testing.assert_close(merged, weight, rtol=1e-5, atol=1e-6, msg=lambda s: f"{m}: {s}")
        return True

    for chosen in (loras, loras[:1]):  # two LoRAs, then one of them goes
        lora_refitter.apply(chosen)
        patcher.apply(chosen)
        assert matches_patcher() and not fake.pending
        assert lora_refitter.applied == tuple((w.name, s) for w, s in chosen)
    lora_refitter.apply([])
    assert is_base(fake) and lora_refitter.applied == ()  # bit-identical base weights

    # the engine refuses one weight: LoraError naming its module, everything back to base
    target = refit.entries["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    lora_refitter, fake, _ = refitter(reject={target.onnx_name})
    with pytest.raises(LoraError, match="attn2.to_out.0") as info:
        lora_refitter.apply(loras)
    assert "style" in str(info.value) and is_base(fake) and lora_refitter.applied == ()
    # a scale that overflows the weights' dtype fails and leaves the base weights
    lora_refitter, fake, _ = refitter()
    lora_refitter.apply(loras[:1])
    with pytest.raises(LoraError, match="not finite"):
        lora_refitter.apply([(loras[0][0], 1e39)])
    assert is_base(fake)
