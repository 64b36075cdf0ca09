"""katz.engines.torch.experimental.fp8: float8 transformer linears (CPU here; the GPU path is in test_cuda_graphs.py).

The float8 matmul must stay close to the float16/32 one, convert exactly the transformer linears,
follow LoRA merges, and a restored base must re-quantize to the bytes it had at load.
"""

from __future__ import annotations

import re

import pytest
import torch

from katz.engines.torch.experimental.fp8 import (
    FP8,
    Fp8Linear,
    fp8_targets,
    quantize,
    quantize_linears,
    requantize,
    row_scale,
    tensor_scale,
)
from katz.lora.patch import LoraPatcher
from katz.lora.random import make_random_lora
from katz.lora.safetensors import read_lora_file
from katz.lora.weights import parse_lora
from katz.models.presets import _unet_sdxl


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _weight_quantized(m) -> torch.Tensor:
    """What ``m.weight`` quantizes to, as bytes."""
    scale = row_scale(m.weight) if m.rowwise else tensor_scale(m.weight)
    return quantize(m.weight, scale).view(torch.uint8)


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_linear_is_close_to_the_linear_it_replaces(rowwise):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    fp8 = Fp8Linear.from_linear(lin, rowwise)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias  # shared, not copied
    assert fp8.weight_fp8.dtype == FP8 and fp8.weight_scale.shape == ((1, 48) if rowwise else ())
    assert torch.equal(fp8.weight_fp8.view(torch.uint8), _weight_quantized(fp8))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y, ref = fp8(x), lin(x)
    assert y.shape == ref.shape == (3, 5, 48)
    # e4m3 keeps 3 mantissa bits: a relative error of a few percent, not more
    assert 0 < _rel(y, ref) < 0.08
    with torch.no_grad():
        assert torch.equal(fp8(torch.zeros(2, 64)), lin.bias.expand(2, -1))  # no NaN from a zero scale


def test_fp8_linear_refuses_shapes_the_tensor_cores_do_not_take():
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(torch.nn.Linear(64, 40))


@pytest.fixture(scope="module")
def unet():
    return _unet_sdxl(seed=4)


def _inputs(unet, batch=2):
    torch.manual_seed(1)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (torch.randn(batch, 4, 16, 16), torch.tensor([500.0] * batch),
            torch.randn(batch, 77, cfg.cross_attention_dim),
            {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * batch,
                                                                                   dtype=torch.float32)})


def _step(unet, x):
    with torch.no_grad():
        return unet(x[0], x[1], encoder_hidden_states=x[2], added_cond_kwargs=x[3], return_dict=False)[0]


def test_quantize_linears_converts_the_transformer_linears_only(unet):
    import copy

    net = copy.deepcopy(unet)
    ref = _step(net, _inputs(net))
    names = quantize_linears(net)
    suffixes = {re.sub(r"^.*\.attentions\.\d+\.(transformer_blocks\.\d+\.)?", "", n) for n in names}
    assert suffixes == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                        "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"}
    # the text keys/values (77 tokens), time embeddings and convolutions stay as they were
    kept = [n for n, m in net.named_modules() if type(m) is torch.nn.Linear]
    assert kept and all(re.search(r"attn2\.to_[kv]$|embedding|time_emb_proj$", n) for n in kept)
    assert fp8_targets(net) == []  # nothing left to convert: converting twice is a no-op
    out = _step(net, _inputs(net))
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < 0.1


@pytest.mark.parametrize("rowwise", [False, True])
def test_lora_merges_requantize_and_the_base_comes_back_bit_exact(unet, tmp_path, rowwise):
    import copy

    net = copy.deepcopy(unet)
    quantize_linears(net, rowwise)
    fp8s = {n: m for n, m in net.named_modules() if isinstance(m, Fp8Linear)}
    before = {n: (m.weight_fp8.clone(), m.weight_scale.clone()) for n, m in fp8s.items()}
    base_out = _step(net, _inputs(net))
    seen = []

    def on_change(modules):
        seen.append(len(modules))
        requantize(modules)

    patcher = LoraPatcher(net, "unet", on_change=on_change)
    path = tmp_path / "l.safetensors"
    make_random_lora(path, unet, {}, rank=4, seed=3, fmt="peft")
    lora = parse_lora(read_lora_file(path, "l"), "l", "sdxl")
    patcher.apply([(lora, 1.0)])
    assert seen and seen[-1] == len(lora.layers["unet"])
    changed = [n for n, m in fp8s.items() if not torch.equal(m.weight_fp8.view(torch.uint8),
                                                              before[n][0].view(torch.uint8))]
    assert changed  # the LoRA's layers re-quantized from their merged float weights ...
    for n in changed:
        assert torch.equal(fp8s[n].weight_fp8.view(torch.uint8), _weight_quantized(fp8s[n]))
    assert _rel(_step(net, _inputs(net)), base_out) > 1e-3  # ... and the step sees them
    patcher.apply([(lora, 0.5)])
    patcher.apply([])
    for n, m in fp8s.items():  # base restored: the float8 bytes and scales of load time
        assert torch.equal(m.weight_fp8.view(torch.uint8), before[n][0].view(torch.uint8)), n
        assert torch.equal(m.weight_scale, before[n][1]), n
    assert torch.equal(_step(net, _inputs(net)), base_out)


def test_fp8_is_refused_where_it_cannot_run():
    from katz.deployment import Deployment
    from katz.engines.torch.cuda_graphs import Acceleration
    from katz.request import Limits

    with pytest.raises(ValueError, match="float8 tensor cores"):
        Acceleration(fp8=True).quantize(torch.nn.Linear(16, 16), torch.device("cpu"))
    assert Acceleration().quantize(torch.nn.Linear(16, 16), torch.device("cpu")) is False
    params = Deployment("m", {}, None, Limits(), engine="tensorrt", engine_dir="e", fp8=True, controlnet_mode="inline").to_parameters()
    with pytest.raises(ValueError, match="fp8 is for the torch engines"):
        Deployment.from_parameters(params, "cuda")
    assert Deployment.from_parameters({**params, "engine": "torch"}, "cpu").fp8 is True


def test_cli_refuses_fp8_without_a_float8_gpu(preset_dir):
    import argparse

    from katz.cli import _add_model_args, build_deployment

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this host has float8 tensor cores")
    p = argparse.ArgumentParser()
    _add_model_args(p)
    args = p.parse_args(["--model-dir", str(preset_dir("tiny-sdxl")), "--experimental-fp8"])
    with pytest.raises(SystemExit, match="--experimental-fp8 needs GPUs with float8 tensor cores"):
        build_deployment(args)
