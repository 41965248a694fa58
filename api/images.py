"""Decode an uploaded image and bring it to the model's input size, without torch.

Mirrors torchvision's ``ImageClassification`` preset on a PIL image step for step (shorter side to
``resize_size`` with the same PIL filter, then the same center crop), so the worker only has to
scale and normalise: the service's answers equal ``model(weights.transforms()(image))``.
"""

from __future__ import annotations

import io
import re
import struct
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


# What ``jpeg_frame`` reads: frame headers of baseline, extended and progressive Huffman JPEGs (what
# every decoder the worker may use takes), and the segments that come before a scan in them: DHT,
# DQT, DRI, comments and application data (JFIF, EXIF, ICC, Adobe...).
_FRAMES = (0xC0, 0xC1, 0xC2)
_BEFORE_SCAN = frozenset((0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))
_SOS = 0xDA


def jpeg_frame(body: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` of a plain 8-bit JPEG with 1 or 3 components, read from its
    marker segments up to its first scan without Pillow (2 µs a 640x480 JPEG here, where Pillow
    takes 28 µs to open it and parse its tables); None for anything else: not a JPEG, a segment
    that runs past the body, another kind of frame or segment, fill bytes, no scan. Only the
    structure is read; the worker's decoder checks the tables and the data, and answers what it
    cannot decode with ``invalid_image``."""
    n = len(body)
    if body[:3] != b"\xff\xd8\xff":
        return None
    i, frame = 2, None
    while i + 4 <= n:
        if body[i] != 0xFF:
            return None
        marker = body[i + 1]
        (length,) = struct.unpack_from(">H", body, i + 2)
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        if marker == _SOS:
            return frame
        if marker in _FRAMES:
            if frame is not None or length < 8:
                return None
            bits, height, width, components = struct.unpack_from(">BHHB", body, i + 4)
            if bits != 8 or components not in (1, 3) or length != 8 + 3 * components or not width or not height:
                return None
            frame = (width, height, components)
        elif marker not in _BEFORE_SCAN:
            return None
        i = end
    return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """``InvalidImage`` for an image without pixels, ``PayloadTooLarge`` for more than ``max_pixels``."""
    if width < 1 or height < 1:
        raise InvalidImage("the image has no pixels")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")


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
    check_pixels(*im.size, max_pixels)
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


_OBJECT_REPR = re.compile(r" ?<[^<>]* (?:object )?at 0x[0-9a-fA-F]+>")  # Pillow names the BytesIO it read


def _short(exc: BaseException) -> str:
    """What the client is told of a decoding error: the library's words, with no object repr (a
    memory address says nothing to a client), and at most 200 characters."""
    text = _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__
    return text[:200]
