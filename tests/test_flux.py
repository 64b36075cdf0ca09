"""FLUX.1 in-process: the tiny-flux presets, Katz's flow-match loop against diffusers' FluxPipeline /
FluxControlNetPipeline (same weights, prompt, steps, guidance, seed; float32 on the CPU; <= 2/255),
FLUX LoRAs in both file layouts through Katz's patcher, exact restore, and BAL's bound."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import control_png
from katz.errors import LoraError

PROMPT = "a photo of a red house"
STEPS = 4
SIZE = 64
TOLERANCE = 2


class Flux:
    """Katz's FLUX path wired in-process: tokenizers, text-encoder engine, transformer engine,
    ControlNet engine, the loop (katz.diffusion.flux) and the VAE decoder."""

    def __init__(self, path):
        from katz.engines.torch.text_encoder import TextEncoderEngine
        from katz.engines.torch.transformer import FluxControlNetEngine, FluxTransformerEngine
        from katz.engines.torch.vae import VaeDecoderEngine
        from katz.lora.store import LoraStore
        from katz.models.folder import ModelFolder, discover_controlnets

        self.folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
        self.tokenizers = self.folder.load_tokenizers()
        self.text = TextEncoderEngine(self.folder)
        self.transformer = FluxTransformerEngine(self.folder)
        self.controlnets = FluxControlNetEngine(self.folder)
        self.vae = VaeDecoderEngine(self.folder)
        self.store = LoraStore(path / "loras", "flux")

    def set_loras(self, loras) -> None:
        self.transformer.set_loras([(self.store.get(n, ("transformer",)), s) for n, s in loras])
        self.text.set_loras([(self.store.get(n, ("text_encoder", "text_encoder_2")), s) for n, s in loras])

    def latents(self, seed=42, guidance=3.5, controlnet=False, transformer=None, height=SIZE, width=SIZE,
                steps=STEPS, beside=False, controls=None):
        """``controls``: [(name, scale[, start, end])] (default with ``controlnet``: canny at 0.9); ``beside``: the
        ControlNets run in ``transformer``'s call (mode local), else before it (inline)."""
        from katz.diffusion.denoise import ControlInput
        from katz.diffusion.flux import denoise_flux
        from katz.diffusion.images import decode_control_image
        from katz.diffusion.schedulers import make_scheduler
        from katz.diffusion.text_encoding import tokenize

        ids = tokenize(self.tokenizers, PROMPT, None, do_cfg=False)
        embeds, pooled = self.text({k: torch.from_numpy(v) for k, v in ids.items()}, zero_negative=False)
        image = decode_control_image(control_png(), width, height, 1 << 24)
        controls = [ControlInput(c[0], image, *c[1:]) for c in (controls or ([("canny", 0.9)] if controlnet else []))]
        return denoise_flux(
            transformer=transformer or self.transformer,
            scheduler=make_scheduler("default", self.folder.scheduler_config),
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, seed=seed, steps=steps, guidance_scale=guidance,
            guidance_embeds=self.folder.guidance_embeds, height=height, width=width,
            latent_channels=self.folder.latent_channels, vae_scale_factor=self.folder.vae_scale_factor,
            controlnet=self.controlnets, controls=controls, controlnet_in_transformer=beside,
            encode=self.vae.encode_distribution,
            vae_shift_factor=self.vae.shift_factor, vae_scaling_factor=self.vae.scaling_factor,
        )

    def image(self, **kwargs) -> np.ndarray:
        from katz.diffusion.images import to_uint8

        return to_uint8(self.vae(self.latents(**kwargs)))


@pytest.fixture(scope="module")
def flux(preset_dir):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = Flux(preset_dir(preset))
        return cache[preset]

    return get


def _diffusers_image(path, controlnet=False, loras=(), seed=42, guidance=3.5):
    import diffusers

    call = dict(num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if controlnet:
        net = diffusers.FluxControlNetModel.from_pretrained(path / "controlnets" / "canny")
        pipe = diffusers.FluxControlNetPipeline.from_pretrained(path, controlnet=net)
        call.update(control_image=Image.open(io.BytesIO(control_png())), controlnet_conditioning_scale=0.9)
    else:
        pipe = diffusers.FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(path / "loras", weight_name=f"{name}.safetensors", adapter_name=name)
    if loras:
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(adapter_names=[n for n, _ in loras], lora_scale=1.0)
    out = pipe(PROMPT, **call).images[0]
    return (out * 255).round().astype(np.uint8)


def _max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ControlNet and LoRA together: test_ensemble_matches_diffusers (the served path)
CASES = [
    ("tiny-flux", dict()),
    ("tiny-flux-schnell", dict(seed=7)),
    ("tiny-flux", dict(loras=(("style", 0.8), ("detail", 0.5)), guidance=5.0)),  # peft; kohya with fused qkv
    ("tiny-flux", dict(controlnet=True)),
]


@pytest.mark.parametrize("preset, case", CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
def test_matches_diffusers(preset, case, flux, preset_dir):
    model = flux(preset)
    loras = case.get("loras", ())
    model.set_loras(loras)
    try:
        ours = model.image(**{k: v for k, v in case.items() if k != "loras"})
    finally:
        model.set_loras([])
    ref = _diffusers_image(preset_dir(preset), **case)
    assert ours.shape == (SIZE, SIZE, 3)
    assert ours.std() > 5, "image is flat: the test would not see a difference"
    assert _max_diff(ours, ref) <= TOLERANCE


def test_guidance_loras_and_controlnet_change_the_image_and_schnell_ignores_guidance(flux):
    dev, schnell = flux("tiny-flux"), flux("tiny-flux-schnell")
    plain = dev.image()
    assert _max_diff(plain, dev.image(guidance=6.0)) > 2  # a small effect in random weights, but one
    assert _max_diff(plain, dev.image(controlnet=True)) > 10
    dev.set_loras([("style", 1.0)])
    try:
        assert _max_diff(plain, dev.image()) > 10
    finally:
        dev.set_loras([])
    assert np.array_equal(plain, dev.image()), "a LoRA or ControlNet run changed the next image"
    assert np.array_equal(schnell.image(guidance=1.0), schnell.image(guidance=6.0))


def test_packing_positions_and_shift():
    from katz.diffusion.flux import calculate_shift, latent_image_ids, latent_size, pack_latents, unpack_latents

    x = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(x)
    assert tokens.shape == (1, 12, 64)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # token 1 = row 0, patch column 1
    assert torch.equal(unpack_latents(tokens, 6, 8), x)
    ids = latent_image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0]
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)
    assert latent_size(1024, 768, 8) == (128, 96) and latent_size(72, 72, 8) == (8, 8)


def test_flux_folder_facts(preset_dir, tmp_path):
    import shutil

    from katz.models.folder import ModelFolder, ModelFolderError

    dev, schnell = ModelFolder(preset_dir("tiny-flux")), ModelFolder(preset_dir("tiny-flux-schnell"))
    assert dev.family == schnell.family == "flux"
    assert dev.guidance_embeds and not schnell.guidance_embeds
    assert not dev.scheduler_config["use_dynamic_shifting"] is schnell.scheduler_config["use_dynamic_shifting"]
    assert dev.latent_channels == 16 and dev.vae_scale_factor == 8
    assert dev.min_image_size == 16  # one 2x2 patch of latent pixels
    assert dev.default_size == 1024  # FluxPipeline's default
    assert dev.text_encoder_parts == ("text_encoder", "text_encoder_2")
    broken = tmp_path / "broken"
    shutil.copytree(preset_dir("tiny-flux"), broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="text_encoder_2/"):
        ModelFolder(broken)


# --------------------------------------------------------------------------- #
# LoRAs
# --------------------------------------------------------------------------- #
def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_kohya_fused_layers_split_into_the_diffusers_modules(flux):
    """A kohya linear1 / img_attn_qkv LoRA merges exactly as the peft LoRA of its parts: down shared,
    up cut by rows (q, k, v and the 4x-wide MLP input)."""
    from katz.lora.weights import parse_lora

    engine = flux("tiny-flux").transformer
    gen = torch.Generator().manual_seed(3)
    dim = engine.transformer.config.num_attention_heads * engine.transformer.config.attention_head_dim
    down1, up1 = torch.randn(4, dim, generator=gen), torch.randn(7 * dim, 4, generator=gen)
    down2, up2 = torch.randn(4, dim, generator=gen), torch.randn(3 * dim, 4, generator=gen)
    kohya = {
        "lora_unet_single_blocks_1_linear1.lora_down.weight": down1,
        "lora_unet_single_blocks_1_linear1.lora_up.weight": up1,
        "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(2.0),
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": down2,
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": up2,
    }
    peft = {}
    for path, a, b in (("attn.to_q", 0, dim), ("attn.to_k", dim, 2 * dim), ("attn.to_v", 2 * dim, 3 * dim),
                       ("proj_mlp", 3 * dim, 7 * dim)):
        key = f"transformer.single_transformer_blocks.1.{path}"
        peft.update({f"{key}.lora_A.weight": down1, f"{key}.lora_B.weight": up1[a:b],
                     f"{key}.alpha": torch.tensor(2.0)})
    for i, path in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        key = f"transformer.transformer_blocks.0.attn.{path}"
        peft.update({f"{key}.lora_A.weight": down2, f"{key}.lora_B.weight": up2[i * dim:(i + 1) * dim]})
    base = _weights(engine.transformer)
    merged = []
    for tensors in (kohya, peft):
        weights = parse_lora(tensors, "x", "flux")
        assert set(weights.layers["transformer"]) == {
            "single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
            "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp",
            "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.add_v_proj"}
        engine.set_loras([(weights, 0.7)])
        merged.append(_weights(engine.transformer))
        engine.set_loras([])
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in base)
    assert not torch.equal(merged[0]["single_transformer_blocks.1.proj_mlp.weight"],
                           base["single_transformer_blocks.1.proj_mlp.weight"])
    after = _weights(engine.transformer)
    assert all(torch.equal(after[k], base[k]) for k in base), "restore is not bit-exact"


@pytest.mark.parametrize("tensors, words", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, 16),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(47, 4)}, "do not split"),
    ({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.ones(4, 16),
      "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.ones(32, 4)}, "original FLUX.1 layout"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 16),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(16, 4)}, "original FLUX.1 layout"),
    ({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 16),
      "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.ones(16, 4)}, "flux model does not have"),
])
def test_bad_flux_lora_keys_are_refused_naming_the_tensor(tensors, words):
    from katz.lora.weights import parse_lora

    with pytest.raises(LoraError, match=words) as err:
        parse_lora(tensors, "bad", "flux")
    stem = next(iter(tensors)).rsplit(".lora", 1)[0]
    assert stem in str(err.value)


def test_flux_lora_loads_for_flux_and_fails_for_sd15_through_the_manager(preset_dir, tmp_path):
    """The manager's family check: kohya's lora_unet_ prefix is the family's denoiser in both."""
    from katz.lora.manager import LoraManager
    from katz.lora.store import LoraStore

    save_file({"transformer.x_embedder.lora_A.weight": torch.ones(2, 64),
               "transformer.x_embedder.lora_B.weight": torch.ones(16, 2)}, str(tmp_path / "t.safetensors"))
    engine = Flux(preset_dir("tiny-flux")).transformer
    flux_manager = LoraManager(LoraStore(tmp_path, "flux"), [engine.lora], "cpu")
    assert flux_manager.get(["t"])  # a peft transformer LoRA with a top-level module loads
    from katz.engines.torch.unet import UNetEngine
    from katz.models.folder import ModelFolder

    unet = UNetEngine(ModelFolder(preset_dir("tiny-sd15")))
    sd_manager = LoraManager(LoraStore(tmp_path, "sd15"), [unet.lora], "cpu")
    with pytest.raises(LoraError, match="targets transformer, which a sd15 model does not have"):
        sd_manager.get(["t"])


def test_bal_bound_and_exact_restore_on_the_transformer(flux, preset_dir, tmp_path):
    """BAL unchanged on the FLUX transformer: a slow LoRA goes in at step k exactly, k = 0 gives the
    synchronous merge's latents, and the base weights come back bit for bit."""
    import shutil

    from katz.lora.bal import UNetLoras
    from katz.lora.manager import LoraManager
    from katz.lora.store import LoraStore

    model = flux("tiny-flux")
    engine = model.transformer
    shutil.copy(preset_dir("tiny-flux") / "loras" / "style.safetensors", tmp_path / "style.safetensors")
    base = _weights(engine.transformer)
    model.set_loras([("style", 1.0)])
    sync = model.latents()
    model.set_loras([])
    manager = LoraManager(LoraStore(tmp_path, "flux"), [engine.lora], "cpu", load_delay_s=1.0)
    bal = UNetLoras(manager, engine.set_loras, engine.lora)
    try:
        for k in (2, 0):
            bal.switch_to(())
            manager.clear_caches()
            loop = bal.begin((("style", 1.0),), k)

            def transformer(*args):
                loop.before_step()
                return engine(*args)

            latents = model.latents(transformer=transformer)
            loop.finish()
            assert loop.applied_step == k
            if k == 0:
                assert torch.equal(latents, sync)
            else:
                assert not torch.equal(latents, sync)
        bal.switch_to(())
        after = _weights(engine.transformer)
        assert all(torch.equal(after[k], base[k]) for k in base)
    finally:
        manager.close()


# --------------------------------------------------------------------------- #
# Serving: the ensemble's models in-process, then a real server
# --------------------------------------------------------------------------- #
def _request(**fields):
    req = {"prompt": np.array([PROMPT.encode()], object), "seed": np.array([42], np.int64),
           "steps": np.array([STEPS], np.int32)}
    for name, value in fields.items():
        if name in ("controlnets", "loras", "negative_prompt", "scheduler"):
            req[name] = np.array([v.encode() for v in value], object)
        elif name == "control_images":
            req[name] = np.array(value, object)
        elif name in ("width", "height", "lora_k", "steps"):
            req[name] = np.array([value], np.int32)
        else:
            req[name] = np.array(value if isinstance(value, list) else [value], np.float32)
    return req


@pytest.fixture(scope="module")
def ensemble(preset_dir):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    def make(preset, controlnet_mode="local"):
        path = preset_dir(preset)
        folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
        limits = Limits(default_width=SIZE, default_height=SIZE, default_guidance=3.5)
        return LocalEnsemble(Deployment(folder.path, folder.controlnets, path / "loras", limits,
                                        controlnet_mode=controlnet_mode))

    return make


def test_ensemble_matches_diffusers(ensemble, preset_dir):
    """The served path (preprocessing, text encoder, pipeline, transformer with BAL and local
    ControlNets, VAE decoder) gives diffusers' image."""
    ens = ensemble("tiny-flux")
    both = ens.generate(_request(controlnets=["canny"], control_images=[control_png()], controlnet_scales=0.9,
                                 loras=["detail"], lora_k=0))
    ref = _diffusers_image(preset_dir("tiny-flux"), controlnet=True, loras=(("detail", 1.0),))
    assert both["image"].std() > 5
    assert _max_diff(both["image"], ref) <= TOLERANCE
    assert int(both["lora_applied_step"][0]) == 0
    plain = ens.generate(_request())
    assert int(plain["lora_applied_step"][0]) == -1
    assert plain["image"].std() > 5


def test_controlnet_service_gives_the_local_image(ensemble):
    """Mode service: the ControlNets run in the controlnet model, which streams each block's residual
    back as the block finishes (in-process here: the model on a thread of its own); the image is
    mode local's bit for bit, with two ControlNets summed as one, and a scale window."""
    request = _request(controlnets=["canny", "canny"], control_images=[control_png(), control_png()],
                       controlnet_scales=[0.9, 0.4], loras=["detail"], lora_k=0)
    request["control_guidance_end"] = np.array([1.0, 0.5], np.float32)
    local = ensemble("tiny-flux").generate(request)
    service = ensemble("tiny-flux", "service")
    served = service.generate(request)
    assert np.array_equal(served["image"], local["image"]) and local["image"].std() > 5
    assert service.models["controlnet"].runs == STEPS + STEPS // 2  # canny at 0.4 ends half way
    assert service.models["unet"].controlnets is None  # no ControlNet weights beside the transformer


@pytest.mark.parametrize("preset, field, value, words", [
    ("tiny-flux", "negative_prompt", ["blurry"], "does not apply to FLUX models"),
    ("tiny-flux", "scheduler", ["euler"], "does not apply to FLUX models"),
    ("tiny-flux", "width", 72, "not a positive multiple of 16"),
    ("tiny-flux-schnell", "guidance_scale", 3.5, "does not apply to this FLUX model"),
    ("tiny-flux-schnell", "negative_prompt", ["blurry"], "does not apply to FLUX models"),
])
def test_fields_that_do_not_apply_to_flux_are_refused_naming_them(preset_dir, preset, field, value, words):
    from katz.deployment import Deployment
    from katz.errors import InvalidArgument
    from katz.request import Limits, parse_request

    dep = Deployment(preset_dir(preset), {}, None, Limits(default_width=SIZE, default_height=SIZE),
                     controlnet_mode="local")
    parse_request(_request(), dep.request_limits, frozenset(), lambda n: False)  # the same request without it
    with pytest.raises(InvalidArgument, match=f"^{field}: .*{words}"):
        parse_request(_request(**{field: value}), dep.request_limits, frozenset(), lambda n: False)


def test_sd_requests_keep_their_fields(preset_dir):
    from katz.deployment import Deployment
    from katz.request import Limits, parse_request

    dep = Deployment(preset_dir("tiny-sd15"), {}, None, Limits(default_width=SIZE, default_height=SIZE))
    req = parse_request(_request(negative_prompt=["blurry"], scheduler=["euler"], width=72, guidance_scale=3.5),
                        dep.request_limits, frozenset(), lambda n: False)
    assert (req.negative_prompt, req.scheduler, req.width) == ("blurry", "euler", 72)


def test_flux_deployment_refuses_what_is_not_built_for_it(preset_dir):
    from katz.deployment import Deployment, DeploymentError
    from katz.request import Limits

    path = preset_dir("tiny-flux")
    for setting, field in ((dict(unet_shards=2), "unet_shards"), (dict(loop="pipeline"), "loop"),
                           (dict(controlnet_mode="remote", controlnet_url="localhost:8001"), "controlnet_mode")):
        dep = Deployment(path, {}, None, Limits(), **{"controlnet_mode": "local", **setting})
        with pytest.raises(DeploymentError) as err:
            dep.validate()
        assert err.value.field == field


def _flux_requests(server):
    """test_served_by_katz_serve's requests: (the HTTP result at 2 steps, the streamed one at 3)."""
    import time
    from dataclasses import replace

    from tritonclient.utils import InferenceServerException

    from katz.client import Generation, infer, make_client
    from katz.client.streaming import StreamCancelled, stream_generate

    gen = Generation(prompt=PROMPT, seed=42, steps=2, width=SIZE, height=SIZE, controlnets=["canny"],
                     control_images=[control_png()], controlnet_scales=[0.9], loras=["detail"], lora_k=0)
    client = make_client(server.http_url)
    try:
        result = infer(client, gen)
        with pytest.raises(InferenceServerException) as err:
            infer(client, replace(gen, negative_prompt="blurry"))
        assert err.value.status() == "400"
        assert "negative_prompt: does not apply to FLUX models" in err.value.message()
    finally:
        client.close()
    seen = []
    streamed = stream_generate(server.grpc_url, replace(gen, steps=3), seen.append, timeout=120)
    assert [(p.step, p.steps) for p in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [p.elapsed_s for p in seen] == sorted(p.elapsed_s for p in seen)
    with pytest.raises(InferenceServerException) as err:
        stream_generate(server.grpc_url, replace(gen, negative_prompt="blurry"), timeout=120)
    assert err.value.message().startswith("negative_prompt: does not apply to FLUX models"), err.value.message()
    long = replace(gen, steps=150, width=512, height=512, controlnets=[], control_images=[],
                   controlnet_scales=[], loras=[])
    progress = []
    with pytest.raises(StreamCancelled):
        stream_generate(server.grpc_url, long, lambda p: progress.append(p) or p.step < 3, timeout=120)
    remaining = (progress[2].elapsed_s - progress[1].elapsed_s) * (150 - 3)
    assert remaining > 3.0, f"the long request is too short to tell ({remaining:.1f}s left)"
    start = time.monotonic()
    again = stream_generate(server.grpc_url, replace(gen, steps=3), timeout=120)
    took = time.monotonic() - start
    assert took < remaining / 2, f"the next request took {took:.1f}s; the cancelled loop had ~{remaining:.1f}s left"
    assert np.array_equal(again.image, streamed.image)
    return result, streamed


@pytest.mark.integration
def test_served_by_katz_serve(start_server, flux):
    """``katz serve --preset tiny-flux`` (no other flag): a ControlNet + LoRA request over HTTP gives
    the in-process image (which is diffusers', test_matches_diffusers); a field of another family is
    a 400 naming it. Over gRPC streaming (``katz_stream``) the same request reports each step of the
    loop running in the transformer's process, then the same image; a cancelled stream stops that
    loop at its next step (katz_stream has one instance and the transformer one: the next request is
    served long before the cancelled one would have ended)."""
    server = start_server("tiny-flux")
    try:
        result, streamed = _flux_requests(server)
    finally:
        server.stop()  # no other test uses it (a session's servers otherwise all live to its end)
    model = flux("tiny-flux")
    model.set_loras([("detail", 1.0)])
    try:
        ref, ref3 = model.image(controlnet=True, steps=2), model.image(controlnet=True, steps=3)
    finally:
        model.set_loras([])
    assert result.image.std() > 5
    assert _max_diff(result.image, ref) <= TOLERANCE
    assert _max_diff(streamed.image, ref3) <= TOLERANCE


@pytest.mark.integration
def test_controlnet_service_served_by_katz_serve(start_server, ensemble):
    """``katz serve --preset tiny-flux --controlnet-mode service``: the ControlNets run in the
    controlnet model, streaming each block's residual back over BLS (a decoupled model); the image is
    the in-process one of mode local, and the controlnet model did the work."""
    import urllib.request

    from katz.client import Generation, infer, make_client

    server = start_server("tiny-flux", ["--controlnet-mode", "service"])
    gen = Generation(prompt=PROMPT, seed=42, steps=STEPS, width=SIZE, height=SIZE, controlnets=["canny"],
                     control_images=[control_png()], controlnet_scales=[0.9], loras=["detail"], lora_k=0)
    try:
        client = make_client(server.http_url)
        try:
            result = infer(client, gen)
        finally:
            client.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server.stop()  # no other test uses it
    local = ensemble("tiny-flux").generate(_request(controlnets=["canny"], control_images=[control_png()],
                                                    controlnet_scales=0.9, loras=["detail"], lora_k=0))
    assert result.image.std() > 5 and _max_diff(result.image, local["image"]) <= TOLERANCE
    runs = [line for line in text.splitlines() if line.startswith("katz_controlnet_runs_total")]
    assert runs and float(runs[0].split()[-1]) == STEPS, runs


# --------------------------------------------------------------------------- #
# Latent parallelism for a transformer: image tokens split over shards
# --------------------------------------------------------------------------- #
def test_sequence_parallel_shards_give_the_unsharded_result(flux, preset_dir):
    """Two shards (threads) split the image tokens of every step: the attention processor is the
    unsharded one bit for bit, two even bands give the unsharded latents bit for bit here, and three
    uneven ones, with ControlNet residuals, agree up to floating-point order."""
    from katz.diffusion.flux import latent_size
    from katz.engines.torch.transformer import FluxTransformerEngine
    from katz.models.folder import ModelFolder
    from katz.parallel.sequence import SequenceParallel, install, token_bands

    assert token_bands(5, 3, 2) == [(0, 9), (9, 15)]
    assert token_bands(1, 4, 2) == [(0, 4), (4, 4)]
    model = flux("tiny-flux")
    plain = model.latents(controlnet=True)
    sharded_engine = FluxTransformerEngine(ModelFolder(preset_dir("tiny-flux")))
    install(sharded_engine.transformer)
    assert torch.equal(model.latents(controlnet=True, transformer=sharded_engine), plain)
    h, w = latent_size(SIZE, SIZE, 8)
    two = SequenceParallel(sharded_engine, 2, h // 2, w // 2)
    three = SequenceParallel(sharded_engine, 3, h // 2, w // 2)
    try:
        assert torch.equal(model.latents(controlnet=True, transformer=two), plain)
        assert torch.allclose(model.latents(controlnet=True, transformer=three), plain, atol=1e-5, rtol=0)
        wh, ww = latent_size(SIZE, 96, 8)
        wide = SequenceParallel(sharded_engine, 2, wh // 2, ww // 2)  # 4 rows of 6 tokens
        assert torch.allclose(model.latents(width=96, transformer=wide), model.latents(width=96), atol=1e-5, rtol=0)
    finally:
        for sp in (two, three, locals().get("wide")):
            if sp is not None:
                sp.close()


# --------------------------------------------------------------------------- #
# ControlNet-as-a-Service for a transformer: residuals streamed block by block
# --------------------------------------------------------------------------- #
def test_controlnets_beside_the_transformer_give_the_inline_latents(flux):
    """Mode local: the ControlNets run on their own thread while the transformer runs, each block's
    residual handed over when made; the latents are the inline baseline's bit for bit, for one
    ControlNet, two summed, and one inside a window of the steps; a ControlNet's failure reaches
    the caller (the transformer waiting for its residual is released)."""
    from katz.controlnet.blocks import TransformerControlNetStep

    model = flux("tiny-flux")
    beside = TransformerControlNetStep(model.transformer, model.controlnets)
    plain = model.latents()
    for controls in ([("canny", 0.9)], [("canny", 0.9), ("canny", -0.4)], [("canny", 0.9, 0.5, 1.0)]):
        inline = model.latents(controls=controls)
        assert not torch.equal(inline, plain)
        assert torch.equal(model.latents(controls=controls, transformer=beside, beside=True), inline)

    class Broken:
        net = staticmethod(model.controlnets.net)

        def __call__(self, *args):
            raise RuntimeError("controlnet exploded")

    failing = TransformerControlNetStep(model.transformer, Broken())
    with pytest.raises(RuntimeError, match="controlnet exploded"):
        model.latents(controlnet=True, transformer=failing, beside=True)


def test_perf_analyzer_input_is_a_valid_flux_request(preset_dir):
    """``katz perf``'s input data (no client code for FLUX) passes a FLUX server's validation."""
    import base64

    from katz.deployment import Deployment
    from katz.diffusion.images import decode_control_image
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits, parse_request
    from katz.tools.perf import input_data

    path = preset_dir("tiny-flux")
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    dep = Deployment(path, folder.controlnets, path / "loras", Limits(), controlnet_mode="local")
    data = input_data(count=2, steps=2, width=SIZE, height=SIZE, controlnets=["canny"], loras=[("style", 0.5)])
    for entry in data["data"]:
        tensors = {}
        for name, value in entry.items():
            if "b64" in value:  # Triton's BYTES serialization: a 4-byte length, then the bytes, per element
                raw, items = base64.b64decode(value["b64"]), []
                while raw:
                    size = int.from_bytes(raw[:4], "little")
                    items, raw = items + [raw[4:4 + size]], raw[4 + size:]
                tensors[name] = np.array(items, object)
            elif isinstance(value["content"][0], str):
                tensors[name] = np.array([v.encode() for v in value["content"]], object)
            elif isinstance(value["content"][0], float):
                tensors[name] = np.array(value["content"], np.float32)
            else:
                tensors[name] = np.array(value["content"], np.int64 if name == "seed" else np.int32)
        req = parse_request(tensors, dep.request_limits, frozenset(folder.controlnets), dep.loras.exists)
        assert (req.width, req.controlnets, req.loras) == (SIZE, ["canny"], ["style"])
        assert decode_control_image(req.control_images[0], SIZE, SIZE, 1 << 24).shape == (1, 3, SIZE, SIZE)


def test_cli_defaults_for_flux(preset_dir, tmp_path, monkeypatch):
    """`katz serve/render` with no mode or dtype flag: FLUX's ControlNets run inline (the ControlNet beside
    a compute-bound transformer step measured slower on one GPU, bench/RESULTS.md), in bfloat16 on a GPU
    (FLUX.1's activations overflow float16); a flag still wins, and SD keeps its defaults."""
    import torch

    from katz.cli import build_deployment, parser

    def deployment(preset, *flags):
        args = parser().parse_args(["render", "--model-dir", str(preset_dir(preset)), "--out", str(tmp_path), *flags])
        return build_deployment(args)

    cpu = deployment("tiny-flux", "--device", "cpu")
    assert (cpu.controlnet_mode, cpu.dtype) == ("inline", "float32")
    assert deployment("tiny-flux", "--device", "cpu", "--controlnet-mode", "local").controlnet_mode == "local"
    assert deployment("tiny-sdxl", "--device", "cpu").controlnet_mode == "service"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the GPU checks of a CUDA deployment
    try:
        gpu = deployment("tiny-flux", "--device", "cuda")
    except SystemExit as exc:  # a check this CPU machine cannot pass: the defaults are still decided before it
        pytest.skip(f"a CUDA deployment cannot be built here: {exc}")
    assert gpu.dtype == "bfloat16"
    assert deployment("tiny-flux", "--device", "cuda", "--dtype", "float16").dtype == "float16"
