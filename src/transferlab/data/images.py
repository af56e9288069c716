"""Decoding one image file into an RGB PIL image, or a :class:`BadImageError` saying why not.

Truncated files are never silently padded (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False) and the
decompression-bomb limit is set explicitly, so dirty data is reported instead of hidden.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from transferlab.errors import BadImageError

#: Largest image (in pixels) we agree to decode. Tiny ImageNet is 64x64 and ImageNet photos are a few
#: megapixels; anything above this is far more likely a decompression bomb than a training image.
MAX_IMAGE_PIXELS = 64_000_000

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_image_name(name: str) -> bool:
    """True if ``name`` has an image file suffix (case-insensitive)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def decode_image(data: bytes, origin: str) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image.

    ``origin`` names the file in any error (a path, or ``archive.zip:member``). Grayscale, palette,
    CMYK, alpha and 16-bit images are converted to 8-bit RGB; alpha is composited on white.
    """
    img = open_image(data, origin)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise BadImageError(origin, f"cannot convert mode {img.mode} to RGB: {e}") from e


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def open_image(data: bytes, origin: str) -> Image.Image:
    """Decode ``data`` fully, keeping its original mode (``data check`` reports the modes)."""
    if not data:
        raise BadImageError(origin, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    origin, f"{w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS:,} (decompression bomb?)"
                )
            img.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(origin, f"image too large, refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise BadImageError(origin, "not an image file PIL can identify") from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError for truncated data ("image file is truncated", "broken data stream").
        raise BadImageError(origin, f"cannot decode: {e}") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect it to look."""
    mode = img.mode
    if mode in ("L", "RGB") and "transparency" in img.info:
        # A PNG tRNS colour key is transparency too: composite it on white like an alpha channel.
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # PIL's decoders put 16-bit samples (16-bit PGM/PPM, some TIFFs) in mode "I" scaled to 0..65535,
        # so that is the range unless the values exceed it. Never stretch per image: a dark 16-bit
        # image must stay dark, and look the same whether it was stored as PGM or PNG.
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 65535.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = ((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
