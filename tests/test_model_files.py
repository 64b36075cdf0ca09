"""Model files as users have them: fp16 variants, safetensors only, single-file checkpoints, checks before start.

Inputs are built from the tiny presets (tests/checkpoint_support.py): a copy holding only fp16-named
files, a copy with pickles instead of safetensors, and the preset written as one original-layout
checkpoint (and its ControlNet as one file).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_support import (pickle_only_copy, variant_only_copy, write_checkpoint,
                                write_controlnet_checkpoint)
from conftest import ROOT, control_png
from katz.models.checkpoint import CheckpointError, check_checkpoint, configs_for, inspect_checkpoint
from katz.models.folder import ModelFolder, ModelFolderError, WeightFiles, discover_controlnets, resolve_variant


@pytest.fixture(scope="module")
def files(preset_dir, cache_root, tmp_path_factory):
    # a tiny checkpoint's configs are its preset's folder, found through $KATZ_CACHE as in a server
    patch = pytest.MonkeyPatch()
    patch.setenv("KATZ_CACHE", str(cache_root.parent))
    tmp = tmp_path_factory.mktemp("model-files")
    sdxl = preset_dir("tiny-sdxl")
    yield SimpleNamespace(
        preset=sdxl,
        variant=variant_only_copy(sdxl, tmp / "fp16-only"),
        pickles=pickle_only_copy(sdxl, tmp / "bin-only"),
        checkpoint=write_checkpoint(sdxl, tmp / "tiny-sdxl.safetensors"),
        controlnet=write_controlnet_checkpoint(sdxl / "controlnets" / "canny", tmp / "canny.safetensors"),
        tmp=tmp,
    )
    patch.undo()


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ variants
@pytest.mark.parametrize("have, requested, preferred, expected", [
    ({None: "m.safetensors", "fp16": "m.fp16.safetensors"}, None, None, None),
    ({None: "m.safetensors", "fp16": "m.fp16.safetensors"}, None, "fp16", "fp16"),  # float16 reads the fp16 files
    ({None: "m.safetensors", "fp16": "m.fp16.safetensors"}, "fp16", None, "fp16"),
    ({"fp16": "m.fp16.safetensors"}, None, None, "fp16"),  # the only files there are
    ({"fp16": "m.fp16.safetensors"}, None, "bf16", "fp16"),
    ({None: "m.safetensors"}, "ema", None, None),  # a component without the variant reads its plain file
    ({"fp16": "a", "ema": "b"}, None, None, "several weight variants (ema, fp16)"),
    ({"fp16": "a", "ema": "b"}, "bf16", None, "no bf16 weights (it has ema, fp16)"),
    ({}, None, None, "no weights"),
])
def test_variant_rules(have, requested, preferred, expected):
    files = WeightFiles(have, ())
    if expected is None or expected in have:
        assert resolve_variant(files, requested, preferred) == expected
    else:
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            resolve_variant(files, requested, preferred)


def test_variant_only_folder_loads_its_fp16_files(files):
    folder = ModelFolder(files.variant, discover_controlnets(files.variant / "controlnets"))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet:canny"):
        assert folder.weight_variant(part) == "fp16", part
    reference = ModelFolder(files.preset, discover_controlnets(files.preset / "controlnets"))
    assert _states_equal(folder.load_unet(), reference.load_unet())
    assert _states_equal(folder.load_controlnet("canny"), reference.load_controlnet("canny"))


def test_dtype_reads_its_variant_and_variant_flag_chooses(files, tmp_path):
    model = tmp_path / "both"
    shutil.copytree(files.preset, model, ignore=shutil.ignore_patterns("loras", "controlnets"))
    plain = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in plain.items()}, model / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    halved = {k: v.half().float() for k, v in plain.items()}

    def unet(**kw):
        folder = ModelFolder(model, **kw)
        return folder.weight_variant("unet"), folder.load_unet().state_dict()

    variant, state = unet(dtype="float32")
    assert variant is None and all(torch.equal(state[k], plain[k]) for k in plain)
    variant, state = unet(dtype="float16")  # loaded in float32 here, so the values tell which file was read
    assert variant == "fp16" and all(torch.equal(state[k], halved[k]) for k in plain)
    assert unet(variant="fp16")[0] == "fp16"
    assert ModelFolder(model, variant="fp16").weight_variant("vae") is None  # no fp16 VAE: its plain file

    (model / "unet" / "diffusion_pytorch_model.safetensors").rename(model / "unet" / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(ModelFolderError, match=r"unet/ has several weight variants \(ema, fp16\).*--variant"):
        ModelFolder(model)


# --------------------------------------------------------- safetensors only
def test_pickle_only_folder_fails_naming_every_file_and_the_fix(files):
    with pytest.raises(ModelFolderError) as err:
        ModelFolder(files.pickles, discover_controlnets(files.pickles / "controlnets"))
    message = str(err.value)
    assert "unet/ has only pickle weights (diffusion_pytorch_model.bin)" in message
    assert "text_encoder/ has only pickle weights (pytorch_model.bin)" in message
    assert "UNet2DConditionModel.from_pretrained(" in message and "CLIPTextModel.from_pretrained(" in message
    assert "vae/" not in message and "text_encoder_2/" not in message


def test_loads_refuse_pickles_even_past_the_check(files, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(files.preset, model, ignore=shutil.ignore_patterns("loras", "controlnets"))
    folder = ModelFolder(model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()  # replaced after the check: the load itself must not fall back to the pickle
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(OSError):
        folder.load_unet()
    assert unpickled == []


# ------------------------------------------------------------- single files
def test_checkpoints_are_recognised_from_their_keys(files):
    model, controlnet = inspect_checkpoint(files.checkpoint), inspect_checkpoint(files.controlnet)
    assert (model.kind, model.architecture, model.family) == ("model", "tiny-sdxl", "sdxl")
    assert model.parts == ("unet", "vae", "text_encoder", "text_encoder_2")
    assert (controlnet.kind, controlnet.architecture, controlnet.layout) == ("controlnet", "tiny-sdxl", "original")
    assert check_checkpoint(model, configs_for(model)) == []
    assert check_checkpoint(controlnet, configs_for(controlnet)) == []


def test_single_file_controlnet_with_diffusers_names(files, tmp_path):
    """Most SDXL ControlNets are published as one file under diffusers' own names."""
    path = tmp_path / "canny-diffusers.safetensors"
    shutil.copy(files.preset / "controlnets" / "canny" / "diffusion_pytorch_model.safetensors", path)
    assert inspect_checkpoint(path).layout == "diffusers"
    model = ModelFolder.from_checkpoint(files.checkpoint, {"canny": path})
    model.check_weights()
    reference = ModelFolder(files.preset, {"canny": files.preset / "controlnets" / "canny"})
    assert _states_equal(model.load_controlnet("canny"), reference.load_controlnet("canny"))


def test_checkpoint_check_names_missing_and_misshapen_weights(files, tmp_path):
    state = load_file(files.checkpoint)
    del state["first_stage_model.decoder.conv_out.weight"]
    state["model.diffusion_model.out.2.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "damaged.safetensors")
    with pytest.raises(ModelFolderError) as err:
        ModelFolder.from_checkpoint(tmp_path / "damaged.safetensors").check_weights()
    assert "vae: 1 weights missing, e.g. decoder.conv_out.weight" in str(err.value)
    assert "unet: 1 weights of the wrong shape, e.g. conv_out.bias (3,) (expected (4,))" in str(err.value)


@pytest.mark.parametrize("keys, suffix, words", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}, ".ckpt", "only .safetensors files are read"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "cond_stage_model.model.token_embedding.weight": (1, 1)}, ".safetensors", "Stable Diffusion 2.x"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
      "cond_stage_model.transformer.x": (1,)}, ".safetensors", "not inpainting"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (64, 4, 3, 3),
      "cond_stage_model.transformer.x": (1,)}, ".safetensors", "sd15 model of width 64"),
    ({"lora_unet_down.alpha": (1,)}, ".safetensors", "neither an SD 1.5 / SDXL model"),
    # FLUX.1 single files: BFL's layout as ComfyUI saves it, diffusers' names, an InstantX ControlNet
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (48, 16)}, ".safetensors", "a FLUX.1 model"),
    ({"single_transformer_blocks.0.proj_mlp.weight": (64, 16)}, ".safetensors", "a FLUX.1 model"),
    ({"controlnet_x_embedder.weight": (16, 64), "controlnet_blocks.0.weight": (16, 16)}, ".safetensors",
     "a FLUX.1 ControlNet.*--model-dir"),
])
def test_checkpoint_that_cannot_be_served_is_named(tmp_path, keys, suffix, words):
    path = tmp_path / f"model{suffix}"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(CheckpointError, match=words):
        inspect_checkpoint(path)


def test_controlnet_of_the_other_family_is_refused(files, preset_dir, tmp_path):
    sd15_net = write_controlnet_checkpoint(preset_dir("tiny-sd15") / "controlnets" / "canny", tmp_path / "cn15.safetensors")
    with pytest.raises(ModelFolderError) as err:
        ModelFolder.from_checkpoint(files.checkpoint, {"edges": sd15_net,
                                                      "lines": preset_dir("tiny-sd15") / "controlnets" / "canny"})
    assert "ControlNet 'edges'" in str(err.value) and "ControlNet 'lines'" in str(err.value)
    assert str(err.value).count("is an sd15 ControlNet; this model is sdxl") == 2


def test_flux_folder_loads_its_variants_through_the_same_machinery(preset_dir, tmp_path):
    """A FLUX.1 folder's transformer, T5 encoder and FLUX ControlNet read their variant files as the SD
    components do (safetensors only, the variant the check resolved)."""
    flux = preset_dir("tiny-flux")
    copy = variant_only_copy(flux, tmp_path / "flux-fp16")
    folder = ModelFolder(copy, discover_controlnets(copy / "controlnets"), dtype="float16")
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "controlnet:canny"):
        assert folder.weight_variant(part) == "fp16", part
    reference = ModelFolder(flux, discover_controlnets(flux / "controlnets"))
    assert _states_equal(folder.load_transformer(), reference.load_transformer())
    assert _states_equal(folder.load_text_encoders()["text_encoder_2"], reference.load_text_encoders()["text_encoder_2"])
    assert _states_equal(folder.load_controlnet("canny"), reference.load_controlnet("canny"))


def test_flux_folder_check_lists_every_problem(files, preset_dir, tmp_path):
    flux = tmp_path / "flux"
    shutil.copytree(preset_dir("tiny-flux"), flux, ignore=shutil.ignore_patterns("loras"))
    weights = flux / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), flux / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    (flux / "tokenizer_2" / "tokenizer.json").unlink()
    shutil.rmtree(flux / "vae")
    flux_net = tmp_path / "flux-canny.safetensors"
    shutil.copy(flux / "controlnets" / "canny" / "diffusion_pytorch_model.safetensors", flux_net)
    with pytest.raises(ModelFolderError) as err:
        ModelFolder(flux, {"sdxl": files.preset / "controlnets" / "canny", "file": flux_net})
    message = str(err.value)
    assert "transformer/ has only pickle weights (diffusion_pytorch_model.bin)" in message
    assert "FluxTransformer2DModel.from_pretrained(" in message
    assert "tokenizer_2/ is missing tokenizer.json or spiece.model" in message and "vae/ is missing" in message
    assert "is an sdxl ControlNet; this model is flux" in message
    assert "ControlNet 'file'" in message and "is a FLUX.1 ControlNet" in message
    with pytest.raises(ModelFolderError, match="is a flux ControlNet; this model is sdxl"):
        ModelFolder(files.preset, {"flux": preset_dir("tiny-flux") / "controlnets" / "canny"})


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
def test_convert_writes_the_diffusers_folder(files, preset_dir, tmp_path, preset):
    from katz.cli import main

    source = preset_dir(preset)
    checkpoint = write_checkpoint(source, tmp_path / "model.safetensors")
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if preset == "tiny-sdxl" else [])
    for part in parts:
        (written,), (original,) = (list((d / part).glob("*.safetensors")) for d in (tmp_path / "out", source))
        a, b = load_file(written), load_file(original)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    ModelFolder(tmp_path / "out")  # complete: configs, scheduler, tokenizers, weights
    net = write_controlnet_checkpoint(source / "controlnets" / "canny", tmp_path / "canny.safetensors")
    assert main(["convert", str(net), "--out", str(tmp_path / "canny"), "--dtype", "float16"]) == 0
    a, b = load_file(tmp_path / "canny" / "diffusion_pytorch_model.safetensors"), load_file(
        source / "controlnets" / "canny" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].half()) for k in a)


# ----------------------------------------------------- the shipped configs
def test_shipped_configs_build_the_published_architectures():
    """No real checkpoint can be downloaded here; the shipped configs must at least build networks of the
    published sizes (parameter counts of SDXL base 1.0, SD 1.5 and their canny ControlNets)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from katz.models.checkpoint import CONFIGS

    published = {("sdxl", "unet"): 2_567_463_684, ("sdxl", "controlnet"): 1_251_014_160,
                 ("sdxl", "vae"): 83_653_863, ("sdxl", "text_encoder"): 123_060_480,
                 ("sdxl", "text_encoder_2"): 694_659_840, ("sd15", "unet"): 859_520_964,
                 ("sd15", "controlnet"): 361_279_120, ("sd15", "vae"): 83_653_863, ("sd15", "text_encoder"): 123_060_480}
    classes = {"unet": UNet2DConditionModel, "controlnet": ControlNetModel, "vae": AutoencoderKL,
               "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    with init_empty_weights():
        for (arch, part), count in published.items():
            cls, path = classes[part], CONFIGS / arch / part
            model = cls(CLIPTextConfig.from_pretrained(path)) if part.startswith("text") else cls.from_config(cls.load_config(path))
            assert sum(p.numel() for p in model.parameters()) == count, (arch, part)


def test_shipped_tokenizer_is_clips(tmp_path):
    from transformers import CLIPTokenizer

    from katz.models.checkpoint import write_clip_tokenizer_files

    write_clip_tokenizer_files(tmp_path)
    shutil.copy(ROOT / "katz" / "models" / "configs" / "sdxl" / "tokenizer" / "tokenizer_config.json", tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# ------------------------------------------------------ through katz serve
@pytest.mark.integration
def test_render_refuses_a_pickle_only_folder_before_triton(files):
    proc = subprocess.run([sys.executable, "-m", "katz.cli", "render", "--model-dir", str(files.pickles),
                           "--out", str(files.tmp / "repo")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unet/ has only pickle weights" in proc.stderr and "text_encoder/ has only pickle weights" in proc.stderr
    assert "Traceback" not in proc.stderr and not (files.tmp / "repo").exists()


def _local_image(model: ModelFolder, request, mode: str):
    from katz.deployment import Deployment
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    dep = Deployment(model.path, model.controlnets, None, Limits(default_width=32, default_height=32),
                     checkpoint=model.checkpoint, controlnet_mode=mode)
    return LocalEnsemble(dep).generate(request.tensors())["image"]


def test_single_file_model_gives_the_folder_image_exactly(files):
    from katz.client import Generation

    request = Generation(prompt="a photo of a cat", seed=5, steps=2, width=32, height=32, controlnets=["canny"],
                         control_images=[control_png(1, 32)])
    folder = _local_image(ModelFolder(files.preset, {"canny": files.preset / "controlnets" / "canny"}), request, "inline")
    single = _local_image(ModelFolder.from_checkpoint(files.checkpoint, {"canny": files.controlnet}), request, "inline")
    assert folder.std() > 0
    assert np.array_equal(folder, single)


@pytest.mark.integration
def test_serve_a_checkpoint(files, start_server):
    """``katz serve --checkpoint`` with a single-file ControlNet beside the preset's ControlNet folder: the
    two ControlNets give the same image exactly on that server, and the image is the folder model's (to the
    1/255 a server and the in-process ensemble may differ by). test_server.py's SD 1.5 server serves a
    variant-only folder."""
    from katz.client import Generation, infer, make_client

    server = start_server(None, ["--checkpoint", str(files.checkpoint), "--controlnet", f"canny={files.controlnet}",
                                 "--controlnet", f"folder={files.preset / 'controlnets' / 'canny'}",
                                 "--controlnet-mode", "local", "--pipeline-instances", "1"])
    request = dict(prompt="a photo of a cat", seed=3, steps=2, width=32, height=32, control_images=[control_png(2, 32)])
    client = make_client(server.http_url)
    try:
        single, folder = (infer(client, Generation(controlnets=[name], **request), "http").image
                          for name in ("canny", "folder"))
    finally:
        client.close()
    assert np.array_equal(single, folder)
    local = _local_image(ModelFolder(files.preset, {"canny": files.preset / "controlnets" / "canny"}),
                         Generation(controlnets=["canny"], **request), "local")
    assert local.std() > 0
    assert np.abs(single.astype(int) - local.astype(int)).max() <= 1


def test_export_reads_checkpoints(files, tmp_path, capsys):
    """`katz export` loads through the same model code; its onnxruntime check reopens the single-file
    model from the export's manifest."""
    from katz.cli import main

    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(files.checkpoint), "--out", str(out), "--dtype", "float32",
                 "--components", "text_encoder", "--check"]) == 0, capsys.readouterr().err
    assert json.loads((out / "export.json").read_text())["checkpoint"] == str(files.checkpoint)
    assert "onnxruntime parity: " in capsys.readouterr().out  # a failing --check returns 2 above


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_full_size_original_layout_is_recognised_and_fits_the_shipped_configs(arch, tmp_path):
    """The original layout of a full-size SDXL base / SD 1.5 checkpoint and its ControlNet (names and shapes
    written on the meta device from the shipped configs, as no real file can be downloaded here) is
    recognised and every weight converts onto the networks the configs build."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from checkpoint_support import clip_to_original, open_clip_to_original, unet_to_original, vae_to_original
    from katz.models.checkpoint import CONFIGS, PREFIXES, recognise

    def build(cls, part):
        if part.startswith("text"):
            return cls(CLIPTextConfig.from_pretrained(CONFIGS / arch / part))
        return cls.from_config(cls.load_config(CONFIGS / arch / part))

    def config(part):
        return json.loads((CONFIGS / arch / part / "config.json").read_text())

    with init_empty_weights():
        unet, vae = build(UNet2DConditionModel, "unet").state_dict(), build(AutoencoderKL, "vae").state_dict()
        te = build(CLIPTextModel, "text_encoder").state_dict()
        net = build(ControlNetModel, "controlnet").state_dict()
        te2 = build(CLIPTextModelWithProjection, "text_encoder_2").state_dict() if arch == "sdxl" else None
    prefixes = PREFIXES[arch]
    state = {prefixes["unet"] + k: v for k, v in unet_to_original(unet, config("unet")).items()}
    state.update({prefixes["vae"] + k: v for k, v in vae_to_original(vae, config("vae")).items()})
    state.update({prefixes["text_encoder"] + k: v for k, v in clip_to_original(te).items()})
    if te2 is not None:
        state.update({prefixes["text_encoder_2"] + k: v for k, v in open_clip_to_original(te2).items()})
    controlnet = {"control_model." + k: v for k, v in unet_to_original(net, config("controlnet"), controlnet=True).items()}
    for kind, tensors in (("model", state), ("controlnet", controlnet)):
        info = recognise(tmp_path / f"{kind}.safetensors", {k: tuple(v.shape) for k, v in tensors.items()},
                         {k: "F16" for k in tensors})
        assert (info.kind, info.architecture, info.dtype) == (kind, arch, torch.float16)
        assert check_checkpoint(info, configs_for(info, tmp_path)) == []
