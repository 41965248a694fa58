"""Decode an uploaded image and bring it to the model's input size, without torch.

Mirrors torchvision's ``ImageClassification`` preset on a PIL image step for step (shorter side to
``resize_size`` with the same PIL filter, then the same center crop), so the worker only has to
scale and normalise: the service's answers equal ``model(weights.transforms()(image))``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from common.errors import InvalidImage, PayloadTooLarge
from common.protocol import TensorData

FORMATS = ("JPEG", "PNG", "WEBP")
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def open_image(body: bytes, max_pixels: int) -> Image.Image:
    """Open ``body`` as a JPEG, PNG or WebP; the pixel count is checked before any pixel is decoded."""
    if not body:
        raise InvalidImage("the request body is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(body), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise PayloadTooLarge(f"the image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"not a JPEG, PNG or WebP image ({_short(exc)})") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise InvalidImage("the image has no pixels")
    if w * h > max_pixels:
        raise PayloadTooLarge(f"the image has {w}x{h} pixels, more than the limit of {max_pixels}")
    return im


def to_model_input(im: Image.Image, spec: dict[str, Any], max_pixels: int) -> TensorData:
    """Resize and center-crop to the worker's ``spec``; returns HWC uint8 RGB of ``spec['shape']``."""
    resize, crop = int(spec["resize_size"]), int(spec["crop_size"])
    resample = _FILTERS.get(str(spec.get("interpolation", "bilinear")), Image.Resampling.BILINEAR)
    try:
        im.load()
        rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"the image cannot be decoded ({_short(exc)})") from None
    w, h = rgb.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if new_w * new_h > max_pixels:
        raise PayloadTooLarge(f"a {w}x{h} image would be {new_w}x{new_h} after resizing: aspect ratio too extreme")
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), resample)
    if new_w < crop or new_h < crop:  # torchvision pads with zeros first; so do we
        pad_left, pad_top = max(crop - new_w, 0) // 2, max(crop - new_h, 0) // 2
        canvas = Image.new("RGB", (max(new_w, crop), max(new_h, crop)))
        canvas.paste(rgb, (pad_left, pad_top))
        rgb, new_w, new_h = canvas, canvas.width, canvas.height
    top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
    rgb = rgb.crop((left, top, left + crop, top + crop))
    return TensorData("uint8", (crop, crop, 3), rgb.tobytes())


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
