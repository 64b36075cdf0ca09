"""``postprocessing`` (VAE image -> uint8) and ``png_encoder`` (uint8 -> PNG with the settings)."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from katz.serving.factory import create_model
from katz.serving.postprocessing import PNG_TEXT_KEYS, PngEncoder, Postprocessing


def _params(**values) -> np.ndarray:
    return np.array([json.dumps(values).encode()], dtype=object)


def test_postprocessing_returns_the_uint8_image():
    decoded = torch.linspace(-1.2, 1.2, 3 * 8 * 16).reshape(1, 3, 8, 16)
    out = Postprocessing(None).execute({"image": decoded})
    assert set(out) == {"image", "pixels"}
    image = out["image"]
    assert out["pixels"] is image
    assert image.shape == (8, 16, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255  # clamped to [-1, 1] first


def test_png_encoder_keeps_the_pixels_and_writes_the_settings():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    settings = dict(seed=7, steps=3, guidance_scale=5.0, scheduler="euler", width=16, height=8,
                    controlnets=["canny"], loras=["style"], prompt="not written")
    # the backend hands it a torch tensor, LocalEnsemble the numpy array postprocessing returned
    for image in (torch.from_numpy(pixels), pixels):
        out = PngEncoder(None).execute({"image": image, "params": _params(**settings)})
        assert set(out) == {"png"} and out["png"].shape == (1,) and out["png"].dtype == object
        png = Image.open(io.BytesIO(out["png"][0]))
        assert np.array_equal(np.asarray(png.convert("RGB")), pixels)
        assert png.text == {f"katz:{k}": str(settings[k]) for k in PNG_TEXT_KEYS}


def test_png_encoder_writes_only_the_settings_it_has():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    out = PngEncoder(None).execute({"image": pixels, "params": _params(seed=1, steps=2)})
    assert Image.open(io.BytesIO(out["png"][0])).text == {"katz:seed": "1", "katz:steps": "2"}


def test_roles_build_both_models(preset_dir):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits

    path = preset_dir("tiny-sd15")
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    params = Deployment(folder.path, folder.controlnets, path / "loras", Limits(), controlnet_mode="inline").to_parameters()
    assert isinstance(create_model("postprocessing", params, "cpu"), Postprocessing)
    assert isinstance(create_model("png_encoder", params, "cpu"), PngEncoder)
