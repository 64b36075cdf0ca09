"""katz.lora.weights: parsing, exact merge/restore, and agreement with diffusers' load_lora_weights + fuse_lora."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from katz.errors import LoraError
from katz.lora.patch import LoraPatcher, all_finite, attention_projections, copy_all, warm_up
from katz.lora.random import make_random_lora
from katz.lora.safetensors import read_lora_file
from katz.lora.weights import LoraLayer, LoraWeights, parse_lora
from katz.models.presets import _scheduler, _text_encoder, _unet_sd15, _unet_sdxl, _vae, write_tokenizer

RANK = 4


# --------------------------------------------------------------------------- #
# Fixtures and helpers
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def sdxl():
    return {
        "unet": _unet_sdxl(seed=4),
        "text_encoder": _text_encoder(with_projection=False, seed=2),
        "text_encoder_2": _text_encoder(with_projection=True, seed=3),
    }


@pytest.fixture(scope="module")
def sd15():
    return {"unet": _unet_sd15(seed=4), "text_encoder": _text_encoder(with_projection=False, seed=2)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def _encoders(models):
    return {k: v for k, v in models.items() if k != "unet"}


def _diffusers_fused(family, models, tokenizer, folder: Path, weight_name: str, scale: float):
    """Weights after diffusers' load_lora_weights + fuse_lora, peft wrapper names removed."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    m = copy.deepcopy(models)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=_vae(1),
            text_encoder=m["text_encoder"],
            text_encoder_2=m["text_encoder_2"],
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=m["unet"],
            scheduler=_scheduler(family),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=_vae(1),
            text_encoder=m["text_encoder"],
            tokenizer=tokenizer,
            unet=m["unet"],
            scheduler=_scheduler(family),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    pipe.fuse_lora(lora_scale=scale)
    return {
        comp: {k.replace(".base_layer", ""): v for k, v in getattr(pipe, comp).state_dict().items() if "lora_" not in k}
        for comp in models
    }


def _ours(models, loras):
    """Deep copies of ``models`` with ``loras`` merged by LoraPatcher -> state dicts."""
    out = {}
    for comp, module in models.items():
        module = copy.deepcopy(module)
        LoraPatcher(module, comp).apply([(w, s) for w, s in loras if comp in w.layers])
        out[comp] = module.state_dict()
    return out


def _assert_same(ref, ours, base, atol=1e-5):
    changed = 0
    for comp in base:
        b = base[comp].state_dict()
        assert set(ref[comp]) == set(ours[comp]) == set(b), comp
        for k in b:
            torch.testing.assert_close(ours[comp][k], ref[comp][k], atol=atol, rtol=0, msg=f"{comp}.{k}")
            assert torch.equal(ours[comp][k], b[k]) == torch.equal(ref[comp][k], b[k]), f"{comp}.{k}"
            changed += not torch.equal(ours[comp][k], b[k])
    return changed


def _weights_hash(module):
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _random_lora(module, component, paths, name, seed, rank=RANK, alpha=None):
    """LoraWeights on ``paths`` of ``module`` with seeded random factors."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(module.named_modules())
    layers = {}
    for p in paths:
        w = mods[p].weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        layers[p] = LoraLayer(down=down, up=up, alpha=alpha, key=f"{component}.{p}.lora_A.weight")
    return LoraWeights(name=name, layers={component: layers})


def _attn_paths(unet):
    return [n for n, _ in unet.named_modules() if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)]


def _expected(base_w, items):
    """base + sum(scale * alpha/r * up @ down) in float32 (reference, independent of katz.lora.weights)."""
    delta = torch.zeros_like(base_w, dtype=torch.float32)
    for scale, layer in items:
        factor = 1.0 if layer.alpha is None else layer.alpha / layer.rank
        d = layer.up.float().flatten(1) @ layer.down.float().flatten(1)
        delta += scale * factor * d.view(base_w.shape)
    return (base_w.float() + delta).to(base_w.dtype)


# --------------------------------------------------------------------------- #
# 1. Agreement with diffusers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_matches_diffusers_fuse(family, fmt, sdxl, sd15, tokenizer, tmp_path):
    models = sdxl if family == "sdxl" else sd15
    scale = 0.7
    make_random_lora(tmp_path / "l.safetensors", models["unet"], _encoders(models), rank=RANK, seed=11, fmt=fmt)
    keys = load_file(tmp_path / "l.safetensors")
    if fmt == "kohya":
        te = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
        assert all(k.startswith(("lora_unet_",) + te) for k in keys)
    else:
        assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)

    w = parse_lora(read_lora_file(tmp_path / "l.safetensors", "r"), "r", family)
    assert set(w.layers) == set(models)
    n_layers = sum(len(v) for v in w.layers.values())
    assert all(layer.alpha == RANK / 2 for v in w.layers.values() for layer in v.values())  # alpha != rank

    ref = _diffusers_fused(family, models, tokenizer, tmp_path, "l.safetensors", scale)
    ours = _ours(models, [(w, scale)])
    assert _assert_same(ref, ours, models) == n_layers


def _to_ldm(key: str) -> str:
    """diffusers-named kohya key -> original-SD (sgm) name, for SDXL's 2 layers per block."""
    key = re.sub(
        r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_",
        lambda m: f"lora_unet_input_blocks_{1 + 3 * int(m[1]) + int(m[2])}_1_",
        key,
    )
    key = re.sub(
        r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_",
        lambda m: f"lora_unet_output_blocks_{3 * int(m[1]) + int(m[2])}_1_",
        key,
    )
    return key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")


def test_kohya_ldm_names_match_diffusers(sdxl, tokenizer, tmp_path):
    make_random_lora(tmp_path / "k.safetensors", sdxl["unet"], _encoders(sdxl), rank=RANK, seed=12, fmt="kohya")
    sd = {_to_ldm(k): v for k, v in load_file(tmp_path / "k.safetensors").items()}
    assert any("input_blocks_" in k for k in sd) and any("middle_block_1_" in k for k in sd)
    # plus resnet / sampler / embedding convs and linears under their ldm names
    extra = {
        "input_blocks_0_0": "conv_in",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_7_0_out_layers_3": "up_blocks.2.resnets.1.conv2",
        "time_embed_0": "time_embedding.linear_1",
        "label_emb_0_2": "add_embedding.linear_2",
        "out_2": "conv_out",
    }
    g = torch.Generator().manual_seed(0)
    mods = dict(sdxl["unet"].named_modules())
    for ldm, path in extra.items():
        w = mods[path].weight
        sd[f"lora_unet_{ldm}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g) * 0.1
        up_shape = (w.shape[0], 2, 1, 1) if w.ndim == 4 else (w.shape[0], 2)
        sd[f"lora_unet_{ldm}.lora_up.weight"] = torch.randn(up_shape, generator=g)
        sd[f"lora_unet_{ldm}.alpha"] = torch.tensor(3.0)
    save_file(sd, str(tmp_path / "ldm.safetensors"))

    w = parse_lora(read_lora_file(tmp_path / "ldm.safetensors", "ldm"), "ldm", "sdxl", modules=sdxl)
    for path in extra.values():
        assert path in w.layers["unet"]
    ref = _diffusers_fused("sdxl", sdxl, tokenizer, tmp_path, "ldm.safetensors", 1.3)
    ours = _ours(sdxl, [(w, 1.3)])
    assert _assert_same(ref, ours, sdxl) == sum(len(v) for v in w.layers.values())


def test_peft_metadata_rank_and_alpha_patterns_match_diffusers(sd15, tokenizer, tmp_path):
    """Conv / linear layers of mixed rank, alpha from diffusers' header (lora_alpha + patterns)."""
    unet = sd15["unet"]
    mods = dict(unet.named_modules())
    g = torch.Generator().manual_seed(3)
    targets = {
        "conv_in": 2,  # conv 3x3, rank from rank_pattern
        "down_blocks.0.resnets.0.conv1": 4,  # conv 3x3
        "down_blocks.0.attentions.0.proj_in": 4,  # conv 1x1 in SD1.5
        "time_embedding.linear_1": 4,  # alpha from alpha_pattern
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": 4,
    }
    sd = {}
    for path, r in targets.items():
        w = mods[path].weight
        sd[f"unet.{path}.lora_A.weight"] = torch.randn(r, *w.shape[1:], generator=g) * 0.2
        sd[f"unet.{path}.lora_B.weight"] = torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []), generator=g)
    meta = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.rank_pattern": {"^conv_in": 2},
        "unet.alpha_pattern": {"time_embedding.linear_1": 1, "^conv_in": 3},
        "unet.target_modules": sorted(targets),
    }
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})

    w = parse_lora(read_lora_file(tmp_path / "m.safetensors", "m"), "m", "sd15")
    layers = w.layers["unet"]
    assert layers["conv_in"].factor == pytest.approx(3 / 2)
    assert layers["time_embedding.linear_1"].factor == pytest.approx(1 / 4)
    assert layers["down_blocks.0.resnets.0.conv1"].factor == pytest.approx(8 / 4)

    only_unet = {"unet": unet}
    ref = _diffusers_fused("sd15", sd15, tokenizer, tmp_path, "m.safetensors", 0.9)
    ours = _ours(only_unet, [(w, 0.9)])
    assert _assert_same({"unet": ref["unet"]}, ours, only_unet) == len(targets)


def test_old_diffusers_key_forms(sd15):
    unet, te = sd15["unet"], sd15["text_encoder"]
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    o = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    g = torch.Generator().manual_seed(0)
    dq, uq = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    dt, ut = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    sd = {
        f"unet.{q}.lora.down.weight": dq,
        f"unet.{q}.lora.up.weight": uq,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": dq,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": uq,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.down.weight": dt,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.up.weight": ut,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": dt,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.randn(64, 2),
    }
    w = parse_lora(sd, "old", "sd15")
    assert set(w.layers["unet"]) == {q, o}
    assert set(w.layers["text_encoder"]) == {
        "text_model.encoder.layers.1.self_attn.v_proj",
        "text_model.encoder.layers.0.mlp.fc1",
    }
    for comp, module in (("unet", unet), ("text_encoder", te)):
        LoraPatcher(copy.deepcopy(module), comp).validate(w)


def test_kohya_names_resolve_with_and_without_modules(sdxl, tmp_path):
    make_random_lora(tmp_path / "k.safetensors", sdxl["unet"], _encoders(sdxl), rank=RANK, seed=5, fmt="kohya")
    sd = read_lora_file(tmp_path / "k.safetensors", "k")
    flat = parse_lora(sd, "k", "sdxl")
    assert all("." not in p for v in flat.layers.values() for p in v)  # resolved later by LoraPatcher
    resolved = parse_lora(sd, "k", "sdxl", modules=sdxl)
    for comp, module in sdxl.items():
        names = dict(module.named_modules())
        assert all(p in names for p in resolved.layers[comp])
        a, b = copy.deepcopy(module), copy.deepcopy(module)
        LoraPatcher(a, comp).apply([(flat, 1.0)])
        LoraPatcher(b, comp).apply([(resolved, 1.0)])
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_make_random_lora_is_deterministic_and_unet_only(sd15, tmp_path):
    for fmt in ("peft", "kohya"):
        for i in range(3):
            make_random_lora(tmp_path / f"{fmt}{i}.safetensors", sd15["unet"], _encoders(sd15), rank=4, seed=6, fmt=fmt)
        first = (tmp_path / f"{fmt}0.safetensors").read_bytes()
        assert all((tmp_path / f"{fmt}{i}.safetensors").read_bytes() == first for i in (1, 2))
        # float16 weights: the float32 ones cast (alphas stay float32)
        make_random_lora(tmp_path / f"{fmt}h.safetensors", sd15["unet"], _encoders(sd15), rank=4, seed=6, fmt=fmt,
                         dtype=torch.float16)
        full, half = load_file(tmp_path / f"{fmt}0.safetensors"), load_file(tmp_path / f"{fmt}h.safetensors")
        assert set(full) == set(half)
        for k, v in half.items():
            want = full[k] if k.endswith(".alpha") else full[k].half()
            assert v.dtype == want.dtype and torch.equal(v, want), k
    make_random_lora(tmp_path / "a.safetensors", sd15["unet"], {}, rank=4, seed=6, fmt="peft")
    w = parse_lora(read_lora_file(tmp_path / "a.safetensors", "a"), "a", "sd15")
    assert set(w.layers) == {"unet"}
    assert len(w.layers["unet"]) == len(_attn_paths(sd15["unet"]))


# --------------------------------------------------------------------------- #
# 2. Several LoRAs at once
# --------------------------------------------------------------------------- #
def test_two_loras_sum_of_deltas(sdxl, tmp_path):
    unet = copy.deepcopy(sdxl["unet"])
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    make_random_lora(tmp_path / "a.safetensors", unet, {}, rank=4, seed=1, fmt="peft")
    make_random_lora(tmp_path / "b.safetensors", unet, {}, rank=8, seed=2, fmt="kohya")
    a = parse_lora(read_lora_file(tmp_path / "a.safetensors", "a"), "a", "sdxl", modules={"unet": unet})
    b = parse_lora(read_lora_file(tmp_path / "b.safetensors", "b"), "b", "sdxl", modules={"unet": unet})
    p = LoraPatcher(unet, "unet")
    p.apply([(a, 0.6), (b, -1.5)])
    assert p.applied == (("a", 0.6), ("b", -1.5))
    sd = unet.state_dict()
    for path in _attn_paths(unet):
        k = f"{path}.weight"
        want = _expected(base[k], [(0.6, a.layers["unet"][path]), (-1.5, b.layers["unet"][path])])
        torch.testing.assert_close(sd[k], want, atol=1e-6, rtol=0)
        assert not torch.equal(sd[k], base[k])
    # order of the list does not matter beyond float rounding
    other = copy.deepcopy(sdxl["unet"])
    LoraPatcher(other, "unet").apply([(b, -1.5), (a, 0.6)])
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- #
# 3. Exact restore
# --------------------------------------------------------------------------- #
def test_restore_and_switch_are_bit_identical(sdxl, tmp_path):
    unet = copy.deepcopy(sdxl["unet"])
    base_hash = _weights_hash(unet)
    make_random_lora(tmp_path / "a.safetensors", unet, {}, rank=4, seed=1, fmt="peft")
    a = parse_lora(read_lora_file(tmp_path / "a.safetensors", "a"), "a", "sdxl")
    paths = _attn_paths(unet)
    b = _random_lora(unet, "unet", paths[::3] + ["conv_in", "down_blocks.0.resnets.1.conv2"], "b", seed=9, alpha=3.0)

    p = LoraPatcher(unet, "unet")
    p.apply([(a, 1.0)])
    assert _weights_hash(unet) != base_hash
    p.restore()
    assert p.applied == ()
    assert _weights_hash(unet) == base_hash

    # a -> b equals b applied to a fresh copy, bit for bit
    p.apply([(a, 2.0)])
    p.apply([(b, 0.5)])
    fresh = copy.deepcopy(sdxl["unet"])
    LoraPatcher(fresh, "unet").apply([(b, 0.5)])
    assert _weights_hash(unet) == _weights_hash(fresh)
    p.apply([])
    assert _weights_hash(unet) == base_hash


def test_warm_up_merges_nothing_and_leaves_the_base(sdxl, tmp_path):
    unet = copy.deepcopy(sdxl["unet"])
    base_hash = _weights_hash(unet)
    assert attention_projections(unet) == _attn_paths(unet)
    p = LoraPatcher(unet, "unet")
    assert warm_up(p, ranks=(2, 4)) > 0
    assert p.applied == () and _weights_hash(unet) == base_hash
    # the pristine copies are made, so the first real merge copies nothing more
    assert p.pristine_bytes == sum(unet.get_submodule(q).weight.nbytes for q in _attn_paths(unet))
    make_random_lora(tmp_path / "a.safetensors", unet, {}, rank=4, seed=1, fmt="peft")
    a = parse_lora(read_lora_file(tmp_path / "a.safetensors", "a"), "a", "sdxl")
    before = p.pristine_bytes
    p.apply([(a, 1.0)])
    assert p.pristine_bytes == before and _weights_hash(unet) != base_hash
    p.restore()
    assert _weights_hash(unet) == base_hash
    assert warm_up(LoraPatcher(torch.nn.Sequential(torch.nn.Linear(2, 2)), "unet")) == 0.0  # nothing to warm


def test_same_list_is_not_merged_again(sd15):
    unet = copy.deepcopy(sd15["unet"])
    a = _random_lora(unet, "unet", _attn_paths(unet)[:4], "a", seed=1)
    p = LoraPatcher(unet, "unet")
    p.apply([(a, 1.0)])
    calls = []
    original = p._merge
    p._merge = lambda *args: (calls.append(1), original(*args))[1]
    p.apply([(a, 1.0)])
    assert calls == []
    p.apply([(a, 0.5)])
    assert calls == [1]
    # same name but a different (e.g. re-read) object is merged again
    p.apply([(copy.deepcopy(a), 0.5)])
    assert calls == [1, 1]


def test_random_sequences_end_at_base(sdxl, sd15, tmp_path):
    rng = random.Random(1234)
    unet = copy.deepcopy(sdxl["unet"])
    te = copy.deepcopy(sd15["text_encoder"])
    base_hash = (_weights_hash(unet), _weights_hash(te))
    paths = _attn_paths(unet)
    te_paths = [n for n, _ in te.named_modules() if n.endswith(("q_proj", "v_proj", "fc1"))]
    loras = [
        _random_lora(unet, "unet", rng.sample(paths, 40) + ["conv_in"], "u0", seed=1),
        _random_lora(unet, "unet", rng.sample(paths, 40), "u1", seed=2, alpha=1.0),
        _random_lora(unet, "unet", paths, "u2", seed=3, rank=2, alpha=8.0),
    ]
    make_random_lora(tmp_path / "k.safetensors", unet, {"text_encoder": te}, rank=4, seed=4, fmt="kohya")
    loras.append(parse_lora(read_lora_file(tmp_path / "k.safetensors", "k"), "k", "sd15"))
    loras.append(_random_lora(te, "text_encoder", te_paths, "t0", seed=5))
    bad_shape = _random_lora(unet, "unet", paths[:5], "bad", seed=6)
    bad_shape.layers["unet"][paths[3]].down = torch.randn(RANK, 7)
    bad_target = LoraWeights("ghost", {"unet": {"no.such.module": bad_shape.layers["unet"][paths[0]]}})
    te_layer = loras[-1].layers["text_encoder"][te_paths[0]]
    bad_te = LoraWeights("badte", {"text_encoder": {"text_model.final_layer_norm": te_layer}})
    bads = [bad_shape, bad_target, bad_te]

    pu, pt = LoraPatcher(unet, "unet"), LoraPatcher(te, "text_encoder")
    base_targets = {p: dict(unet.named_modules())[p].weight.clone() for p in paths}
    n_fail = 0
    for _ in range(200):
        op = rng.random()
        chosen = [(w, rng.choice([-2.0, -0.5, 0.3, 1.0, 1.7])) for w in rng.sample(loras, rng.randint(0, 3))]
        if op < 0.15:
            pu.restore()
            pt.restore()
        elif op < 0.4:
            chosen.insert(rng.randint(0, len(chosen)), (rng.choice(bads), 1.0))
            for patcher in (pu, pt):
                sub = [(w, s) for w, s in chosen if patcher.component in w.layers]
                if any(w in bads for w, _ in sub):
                    with pytest.raises(LoraError):
                        patcher.apply(sub)
                    n_fail += 1
                    assert patcher.applied == ()
                    if patcher is pu:
                        mods = dict(unet.named_modules())
                        assert all(torch.equal(mods[p].weight, w) for p, w in base_targets.items())
                else:
                    patcher.apply(sub)
        else:
            for patcher in (pu, pt):
                patcher.apply([(w, s) for w, s in chosen if patcher.component in w.layers])
    assert n_fail > 20
    pu.restore()
    pt.restore()
    assert (_weights_hash(unet), _weights_hash(te)) == base_hash


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_weight_dtypes(sd15, dtype):
    unet = copy.deepcopy(sd15["unet"]).to(dtype)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    paths = _attn_paths(unet)[:6]
    a = _random_lora(unet, "unet", paths, "a", seed=1, alpha=2.0)
    p = LoraPatcher(unet, "unet")
    p.apply([(a, 1.5)])
    sd = unet.state_dict()
    for path in paths:
        k = f"{path}.weight"
        assert sd[k].dtype == dtype
        if dtype == torch.float64:
            layer = a.layers["unet"][path]
            want = base[k] + 1.5 * (2.0 / RANK) * (layer.up.double() @ layer.down.double())
            torch.testing.assert_close(sd[k], want, atol=1e-12, rtol=0)
        else:
            torch.testing.assert_close(sd[k], _expected(base[k], [(1.5, a.layers["unet"][path])]), atol=0, rtol=0)
    p.restore()
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())


def test_merge_costs_a_few_kernels_per_shape_and_plans_are_cached(sd15):
    """The merge of one LoRA batches the adapted layers by shape: per batch three stacks, one
    baddbmm_ and one foreach copy, whatever the number of layers, plus one finiteness pass; the
    second apply of the same LoRA object reuses its plan (no shape checks again)."""
    from torch.profiler import ProfilerActivity, profile

    unet = copy.deepcopy(sd15["unet"])
    paths = _attn_paths(unet)
    shapes = {tuple(unet.get_submodule(q).weight.shape) for q in paths}
    a = _random_lora(unet, "unet", paths, "a", seed=1, alpha=2.0)
    b = _random_lora(unet, "unet", paths, "b", seed=2)
    p = LoraPatcher(unet, "unet")
    p.validate(a)  # as the loader does: the plan is made off the request path
    calls = []
    original = p._plan
    p._plan = lambda lora, check_values=True: (calls.append(lora.name), original(lora, check_values))[1]
    p.apply([(b, 1.0)])  # the first merge also copies the pristine weights
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        p.apply([(a, 1.0)])
    top = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    batches = top.count("aten::baddbmm_") + top.count("aten::addmm")  # addmm: a shape with one layer
    assert len(shapes) <= batches < len(shapes) + 4, sorted(top)
    assert len(top) <= 6 * batches + 10 < len(paths), sorted(set(top))
    p.apply([(b, 0.5)])
    assert calls == ["b"]  # a was planned by validate, b once


def test_grouped_merge_equals_the_per_layer_merge(sd15, monkeypatch):
    """Batches of any size (small scratch: many batches; a shape with one layer: addmm) give the
    weights the per-layer float64 sum gives, rounded once to float32."""
    import katz.lora.patch as lora_mod

    unet = copy.deepcopy(sd15["unet"])
    paths = _attn_paths(unet)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    a = _random_lora(unet, "unet", paths, "a", seed=3, alpha=4.0)
    want = {}
    for path in paths:
        layer = a.layers["unet"][path]
        w = base[f"{path}.weight"]
        want[path] = (w.double() + 0.7 * (4.0 / RANK) * (layer.up.double() @ layer.down.double())).float()
    for scratch in (1, 3 * 4 * 32 * 32, 128 << 20):  # one layer per batch, a few, all
        monkeypatch.setattr(lora_mod, "_GROUP_SCRATCH_BYTES", scratch)
        p = LoraPatcher(unet, "unet")
        p.apply([(a, 0.7)])
        for path in paths:
            torch.testing.assert_close(unet.get_submodule(path).weight, want[path], atol=2e-6, rtol=1e-6)
        p.restore()
        assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())


def test_plan_cache_keeps_no_lora_tensors_alive(sd15):
    import gc
    import weakref

    unet = copy.deepcopy(sd15["unet"])
    paths = _attn_paths(unet)[:4]
    p = LoraPatcher(unet, "unet")
    a = _random_lora(unet, "unet", paths, "a", seed=1)
    p.apply([(a, 1.0)])
    p.restore()
    up = weakref.ref(a.layers["unet"][paths[0]].up)
    del a
    gc.collect()
    assert up() is None


def test_all_finite_and_copy_all():
    big = torch.full((4, 4), 60000.0, dtype=torch.float16)  # norm 240000 overflows float16, not float32
    assert all_finite([torch.randn(3, 3), big, torch.randn(5, dtype=torch.float64)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            t = torch.randn(7, 5).to(dtype)
            t[3, 2] = bad
            assert not all_finite([torch.randn(2), t]), (bad, dtype)
    assert all_finite([])
    dst = [torch.zeros(3), torch.zeros(2, 2, dtype=torch.float16)]
    src = [torch.randn(3), torch.randn(2, 2).half()]
    copy_all(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))


def test_all_finite_without_foreach_norm_dtype(monkeypatch):
    """A torch whose _foreach_norm takes no dtype (older releases) still gets a correct answer."""
    original = torch._foreach_norm

    def old_foreach_norm(tensors, ord=2, **kwargs):
        if kwargs:
            raise TypeError("_foreach_norm() got an unexpected keyword argument 'dtype'")
        return original(tensors, ord)

    monkeypatch.setattr(torch, "_foreach_norm", old_foreach_norm)
    half = [torch.randn(4, 4).half(), torch.full((4, 4), 60000.0, dtype=torch.float16)]
    assert all_finite(half + [torch.randn(3)])
    half[1][0, 0] = float("inf")
    assert not all_finite(half + [torch.randn(3)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused CUDA merge needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_merge_rounds_once(sd15, dtype):
    """On CUDA one LoRA is merged with one addmm in the weight's dtype; cuBLAS sums in float32, so
    the result is the float32 reference rounded once, up to one unit in the last place."""
    unet = copy.deepcopy(sd15["unet"]).to("cuda", dtype)
    paths = _attn_paths(unet)
    a = _random_lora(unet, "unet", paths, "a", seed=1, alpha=2.0)
    for layer in a.layers["unet"].values():
        layer.down, layer.up = layer.down.to("cuda", dtype), layer.up.to("cuda", dtype)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    p = LoraPatcher(unet, "unet")
    p.apply([(a, 1.5)])
    sd = unet.state_dict()
    for path in paths:
        k = f"{path}.weight"
        want = _expected(base[k], [(1.5, a.layers["unet"][path])])
        ulp = (want.float().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
        assert ((sd[k].float() - want.float()).abs() <= ulp).all(), path
    p.restore()
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())


# --------------------------------------------------------------------------- #
# 4. Bad input
# --------------------------------------------------------------------------- #
def _raises(fn, *needles):
    with pytest.raises(LoraError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_bad_files(sd15, tmp_path):
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "pickled.safetensors")
    _raises(lambda: read_lora_file(tmp_path / "pickled.safetensors", "pk"), "lora 'pk'", "not a valid safetensors")
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "x.pt")
    _raises(lambda: read_lora_file(tmp_path / "x.pt", "pt"), "lora 'pt'", "not a .safetensors file")
    _raises(lambda: read_lora_file(tmp_path / "missing.safetensors", "gone"), "lora 'gone'", "does not exist")

    make_random_lora(tmp_path / "ok.safetensors", sd15["unet"], {}, rank=4, seed=1, fmt="peft")
    data = (tmp_path / "ok.safetensors").read_bytes()
    for cut in (len(data) // 2, 100, 7):
        (tmp_path / "trunc.safetensors").write_bytes(data[:cut])
        _raises(lambda: read_lora_file(tmp_path / "trunc.safetensors", "tr"), "lora 'tr'", "not a valid safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _raises(lambda: read_lora_file(tmp_path / "empty.safetensors", "e"), "lora 'e'")

    save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "meta.safetensors"),
              metadata={"lora_adapter_metadata": "{not json"})
    _raises(lambda: read_lora_file(tmp_path / "meta.safetensors", "mt"), "lora 'mt'", "lora_adapter_metadata")


def _peft(path, down, up):
    return {f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up}


def _kohya(stem, down, up, alpha=None):
    out = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        out[f"{stem}.alpha"] = alpha
    return out


def test_bad_keys_and_values():
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    nan = down.clone()
    nan[0, 0] = float("nan")

    def bad(sd, name, family="sdxl"):
        return lambda: parse_lora(sd, name, family)

    _raises(bad({"unet.foo.hada_w1_a": down}, "fmt"), "lora 'fmt'", "'unet.foo.hada_w1_a'", "unknown key format")
    _raises(bad({"weird": down}, "fmt"), "'weird'", "unknown key format")
    _raises(bad(_peft(q, nan, up), "nan"), "lora 'nan'", f"'{q}.lora_A.weight'", "NaN")
    _raises(bad(_kohya("lora_unet_x", down, up, torch.tensor(float("inf"))), "ia"), "lora 'ia'", "lora_unet_x.alpha")
    _raises(bad({f"{q}.lora_A.weight": down}, "half"), "lora 'half'", "no matching up")
    _raises(bad(_peft(q, down, torch.randn(32, 3)), "rk"), "lora 'rk'", "rank")
    _raises(bad(_kohya("lora_te2_x", down, up), "te2", "sd15"), "lora 'te2'", "text_encoder_2")
    _raises(bad(_peft(q, down.long(), up), "int"), "lora 'int'", "floating")
    _raises(bad({"lora_unet_x.dora_scale": down}, "dora"), "lora 'dora'", "DoRA")
    _raises(bad({}, "empty"), "lora 'empty'")
    _raises(bad(_kohya("lora_unet_input_blocks_1_0_weird", down, up), "ldm"), "lora 'ldm'", "original-SD")


def test_validate_and_failed_apply_leave_base(sd15, tmp_path):
    unet = copy.deepcopy(sd15["unet"])
    base_hash = _weights_hash(unet)
    p = LoraPatcher(unet, "unet")
    make_random_lora(tmp_path / "good.safetensors", unet, {}, rank=4, seed=1, fmt="kohya")
    good = parse_lora(read_lora_file(tmp_path / "good.safetensors", "good"), "good", "sd15")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    ghost = "lora_unet_down_blocks_0_attentions_9_to_q"
    nowhere = parse_lora(_kohya(ghost, torch.randn(2, 32), torch.randn(32, 2)), "nowhere", "sd15")
    shape = parse_lora(_peft(f"unet.{q}", torch.randn(2, 31), torch.randn(32, 2)), "shape", "sd15")
    norm_sd = _peft("unet.conv_norm_out", torch.randn(2, 32), torch.randn(32, 2))
    norm = parse_lora(norm_sd, "norm", "sd15")
    nan_layer = _random_lora(unet, "unet", [q], "nanl", seed=2)
    nan_layer.layers["unet"][q].up[0, 0] = float("nan")

    _raises(lambda: p.validate(nowhere), "lora 'nowhere'", f"'{ghost}.lora_down.weight' targets no module of the unet")
    _raises(lambda: p.validate(shape), "lora 'shape'", f"'unet.{q}.lora_A.weight'", "shape mismatch")
    _raises(lambda: p.validate(norm), "lora 'norm'", "GroupNorm", "Linear and Conv2d")
    _raises(lambda: p.validate(nan_layer), "lora 'nanl'", "NaN")
    # with modules given, parse_lora resolves (and rejects) targets itself
    _raises(lambda: parse_lora(norm_sd, "norm", "sd15", modules={"unet": torch.nn.Linear(1, 1)}), "targets no module")
    assert _weights_hash(unet) == base_hash  # validate touches nothing

    for bad in (nowhere, shape, norm, nan_layer):
        p.apply([(good, 1.0)])
        assert _weights_hash(unet) != base_hash
        with pytest.raises(LoraError):
            p.apply([(good, 0.5), (bad, 1.0)])
        assert p.applied == ()
        assert _weights_hash(unet) == base_hash
    with pytest.raises(LoraError, match="not finite"):
        p.apply([(good, float("nan"))])
    assert _weights_hash(unet) == base_hash

    # merged values that overflow the weight dtype are refused, base kept
    half = copy.deepcopy(sd15["unet"]).half()
    half_hash = _weights_hash(half)
    ph = LoraPatcher(half, "unet")
    with pytest.raises(LoraError, match="not finite"):
        ph.apply([(good, 1e6)])
    assert _weights_hash(half) == half_hash


def test_store_reads_only_the_requested_components(preset_dir):
    """The text-encoder model reads just its part of a file; a UNet-only file gives it nothing."""
    from katz.lora.store import LoraStore

    store = LoraStore(preset_dir("tiny-sdxl") / "loras", "sdxl")
    full = store.get("detail")
    te = store.get("detail", ("text_encoder", "text_encoder_2"))
    assert set(te.layers) == {"text_encoder", "text_encoder_2"} and "unet" in full.layers
    for comp in te.layers:
        for path, layer in te.layers[comp].items():
            assert torch.equal(layer.down, full.layers[comp][path].down)
            assert layer.alpha == full.layers[comp][path].alpha
    assert store.get("style", ("text_encoder", "text_encoder_2")).layers == {}


# --------------------------------------------------------------------------- #
# Merging LoRAs that are still arriving; the deferred finiteness check
# --------------------------------------------------------------------------- #
class _Drip:
    """An arrival (katz.lora.patch.Arrival) letting ``per`` more layers in at each wait, in the
    order given, and raising ``fail`` at wait number ``fail_at``. Like bytes still on their way, a
    layer's tensors hold NaN until it arrives (a merge reading them early is caught)."""

    def __init__(self, layers, per, fail_at=None, fail=None):
        self.layers = list(layers)
        self.order = {id(l): i for i, l in enumerate(self.layers)}
        self.values = [(l.down.clone(), l.up.clone()) for l in self.layers]
        for l in self.layers:
            l.down.fill_(float("nan"))
            l.up.fill_(float("nan"))
        self.per, self.released, self.waits = per, 0, 0
        self.fail_at, self.fail = fail_at, fail
        self.fences = 0
        self.finished = False

    def arrived(self, layer):
        return self.order[id(layer)] < self.released

    def await_more(self):
        self.waits += 1
        if self.waits == self.fail_at:
            raise self.fail
        for i in range(self.released, min(self.released + self.per, len(self.layers))):
            self.layers[i].down.copy_(self.values[i][0])
            self.layers[i].up.copy_(self.values[i][1])
        self.released += self.per

    def fence(self):
        self.fences += 1

    def finish(self):
        self.finished = True


def _layers(*loras):
    return [l for w in loras for l in w.layers["unet"].values()]


@pytest.mark.parametrize("two, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float64)],
                         ids=["one-lora", "two-loras", "float64-lora"])
def test_streamed_merge_is_the_one_shot_merge_bit_for_bit(sd15, two, dtype):
    """Merging each unit as its layers' bytes arrive gives the weights the one-shot merge gives, bit
    for bit (the same units, the same kernels), and restores the base exactly; no unit reads a layer
    before it arrived (a float64 LoRA is converted to the weights' dtype only then)."""
    unet = copy.deepcopy(sd15["unet"])
    base = _weights_hash(unet)
    paths = _attn_paths(unet)
    a = _random_lora(unet, "unet", paths, "a", seed=1, alpha=2.0)
    b = _random_lora(unet, "unet", paths[::3], "b", seed=2)  # several LoRAs on a module: per-module units
    for layer in _layers(a, b):
        layer.down, layer.up = layer.down.to(dtype), layer.up.to(dtype)
    loras = [(a, 0.8), (b, 1.3)] if two else [(a, 0.8)]
    one_shot = copy.deepcopy(unet)
    LoraPatcher(one_shot, "unet").apply(loras)
    p = LoraPatcher(unet, "unet")
    for w, _ in loras:
        p.validate(w, check_values=False)  # as the loader does, before the bytes are there
    drip = _Drip(_layers(*(w for w, _ in loras)), per=5)
    p.apply(loras, arrival=drip)
    assert drip.finished and drip.waits > 5 and drip.fences > 1  # merged in several rounds
    assert _weights_hash(unet) == _weights_hash(one_shot)
    p.restore()
    assert _weights_hash(unet) == base


def test_streamed_merge_that_fails_midway_leaves_the_base(sd15):
    unet = copy.deepcopy(sd15["unet"])
    base = _weights_hash(unet)
    a = _random_lora(unet, "unet", _attn_paths(unet), "a", seed=1)
    p = LoraPatcher(unet, "unet")
    p.validate(a, check_values=False)
    drip = _Drip(_layers(a), per=4, fail_at=3, fail=LoraError("lora 'a': tensor 'x' contains NaN or infinite values"))
    with pytest.raises(LoraError, match="NaN"):
        p.apply([(a, 1.0)], arrival=drip)
    assert drip.released > 0 and p.applied == ()  # some units were merged before the failure
    assert _weights_hash(unet) == base


def test_deferred_check_reports_non_finite_merged_weights_at_settle(sd15):
    """With defer_check the merge never waits for the device; settle() reads the flag: a scale that
    overflows the weights fails there, naming the LoRA, with the base restored."""
    unet = copy.deepcopy(sd15["unet"])
    base = _weights_hash(unet)
    paths = _attn_paths(unet)
    a = _random_lora(unet, "unet", paths, "a", seed=1)
    for layer in a.layers["unet"].values():
        layer.up.mul_(1e4)  # up @ down ~ 1e3: times 1e38 overflows float32
    p = LoraPatcher(unet, "unet")
    p.apply([(a, 1e38)], defer_check=True)
    assert p.applied == (("a", 1e38),) and p.check_done()  # a CPU merge: the flag is known already
    with pytest.raises(LoraError, match="'a'.*not finite"):
        p.settle()
    assert p.applied == () and _weights_hash(unet) == base
    p.apply([(a, 1e-4)], defer_check=True)
    p.settle()  # finite: nothing raised, the LoRA stays
    assert p.applied == (("a", 1e-4),)
    p.apply([(a, 1e38)], defer_check=True)
    p.apply([(a, 2e-4)], defer_check=True)  # a new merge rewrites every weight: the old flag is moot
    p.settle()
    assert p.applied == (("a", 2e-4),)


def test_prepare_makes_the_pristine_copies_before_the_merge(sd15):
    """The loader calls prepare() once a LoRA is validated: the merge then copies no weight, and an
    exact restore still holds; prepare() of a module already patched copies nothing."""
    unet = copy.deepcopy(sd15["unet"])
    base = _weights_hash(unet)
    paths = _attn_paths(unet)
    a = _random_lora(unet, "unet", paths, "a", seed=1)
    p = LoraPatcher(unet, "unet")
    p.validate(a)
    copied = p.prepare(a)
    assert copied == p.pristine_bytes == sum(unet.get_submodule(q).weight.numel() * 4 for q in paths)
    p.apply([(a, 1.0)])
    assert p.pristine_bytes == copied
    assert p.prepare(a) == 0
    p.restore()
    assert _weights_hash(unet) == base
