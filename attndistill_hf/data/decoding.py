"""Decoding: any image value (bytes, path, ``{"bytes", "path"}`` dict, PIL image) to 8-bit RGB, or None.

Bad data never raises here: truncated, corrupt, missing or empty data gives None, so that the collator (and
the GPU decoding of :mod:`attndistill_hf.data.gpu_augment`) can skip the image and count it. So does an image
larger than :data:`MAX_IMAGE_PIXELS` that cannot be decoded reduced.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000
"""The most pixels an image may have to be decoded whole (8000 x 8000; 192 MB as 8-bit RGB).

Training crops are a few hundred pixels wide, so a larger image only costs memory: a 10000 x 10000 PNG
of one colour is a file of a few hundred kB that takes gigabytes to decode. The limit is about three
times a full-frame camera photo (20 to 24 megapixels), the largest kind of image in photo collections
such as ImageNet, whose images average well under a megapixel. The size is read from the file's header
before any pixel is decoded.

A JPEG above the limit is decoded at 1/2, 1/4 or 1/8 of its size (the least reduction that fits, done by
the JPEG decoder itself). Any other image above it (PNG and most formats cannot be reduced while
decoding), and a JPEG that even 1/8 leaves above it, is skipped and counted like an unreadable one. By
default PIL refuses to open images above twice its own ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179
megapixels), JPEGs included: those are skipped too.
"""

_JPEG_REDUCTIONS = (2, 4, 8)  # the scales libjpeg decodes at directly (DCT scaling), via Image.draft
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB as the models expect.

    Transparent images are composited on white, as viewers show them (dropping alpha would reveal
    whatever colour hides under transparent pixels, often black). 16-bit images are scaled to 8 bits
    (PIL's own conversion clips them, turning most of the image white). 32-bit integer images are treated
    as 16-bit when they exceed 255; float images as [0, 1] when they fit in it, else [0, 255].
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.float32)
        if mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float32)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _fits(image: Image.Image) -> bool:
    """Whether ``image``, opened but not decoded yet, fits :data:`MAX_IMAGE_PIXELS`; a JPEG that does not is
    first set to decode at the least reduction that makes it fit, when there is one."""
    width, height = image.size
    if width * height <= MAX_IMAGE_PIXELS:
        return True
    for factor in _JPEG_REDUCTIONS:
        # The reduced size rounds up: the same sizes as the decoder's.
        if math.ceil(width / factor) * math.ceil(height / factor) <= MAX_IMAGE_PIXELS:
            # A no-op for other formats and for pixels already decoded, so the size is checked again.
            image.draft(None, (width // factor, height // factor))
            break
    return image.width * image.height <= MAX_IMAGE_PIXELS


def _open(source: Any) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            # PIL warns when it opens an image above its own limit, which is above ours: _fits decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if not _fits(image):
                    return None
                image.load()
                return to_rgb(image) if image.mode != "RGB" else image.copy()
    except Exception:  # corrupt data raises many types in PIL (OSError, SyntaxError, struct.error, ...)
        return None


def decode_image(value: Any) -> Image.Image | None:
    """Decode one image value to RGB, or return None when it cannot be decoded (never raises for bad data).

    Accepts what ``datasets`` gives with ``Image(decode=False)`` (``{"bytes": ..., "path": ...}``), raw
    bytes, a file path, or a PIL image. Truncated, corrupt, missing or empty data gives None so the
    caller can skip and count it, as does an image above :data:`MAX_IMAGE_PIXELS` that cannot be decoded
    reduced (a JPEG can). Raises ``TypeError`` only for a value that is no image at all (a misconfigured
    column).
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        try:
            if not _fits(value):
                return None
            value.load()
            return to_rgb(value)
        except Exception:
            return None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return decode_image(bytes(data))
        if path:
            return _open(path)
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(value))) if len(value) else None
    if isinstance(value, (str, os.PathLike)):
        return _open(value)
    raise TypeError(
        f"Cannot read an image from a {type(value).__name__}; the image column must hold image bytes, "
        "paths or {'bytes', 'path'} dicts"
    )
