"""Image conversions at the edges of the pipeline.

* control images: encoded PNG/JPEG bytes -> float tensor ``[1, 3, H, W]`` in
  ``[0, 1]``, resized exactly as diffusers' ControlNet pipelines do;
* decoded images: VAE output ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``uint8``
  ``[H, W, 3]`` and PNG bytes, rounded as diffusers rounds.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import torch
from PIL import Image

from katz.errors import InvalidArgument


@functools.cache
def control_image_processor():
    """diffusers' image processor for control images (made once; importing diffusers takes seconds,
    so the preprocessing model calls this at load, not on the first ControlNet request)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(do_convert_rgb=True, do_normalize=False)


def decode_control_image(data: bytes, width: int, height: int, max_pixels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> ``[1, 3, height, width]`` float32 in ``[0, 1]``."""
    if not data:
        raise InvalidArgument("control_images", "image is empty (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ("PNG", "JPEG", "WEBP"):
                raise InvalidArgument("control_images", f"unsupported image format {img.format}; send PNG or JPEG")
            if img.width * img.height > max_pixels:
                raise InvalidArgument(
                    "control_images", f"image is {img.width}x{img.height}, above the {max_pixels}-pixel limit"
                )
            img.load()
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument("control_images", "image has too many pixels") from None
    except Exception as exc:  # PIL raises many types for bad data
        raise InvalidArgument("control_images", f"cannot decode image ({type(exc).__name__}: {exc})") from None
    if img.width == 0 or img.height == 0:
        raise InvalidArgument("control_images", "image has zero size")
    return control_image_processor().preprocess(img.convert("RGB"), height=height, width=width).to(torch.float32)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """VAE output ``[1, 3, H, W]`` (or ``[3, H, W]``) in ``[-1, 1]`` -> ``uint8 [H, W, 3]``."""
    if image.ndim == 4:
        image = image[0]
    x = (image.float() / 2 + 0.5).clamp(0, 1)
    x = x.permute(1, 2, 0).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """``uint8 [H, W, 3]`` -> PNG file bytes, with ``text`` as tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    # level 1: a fraction of the default's time on 1024² images, files ~10% larger
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()
