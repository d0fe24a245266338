"""Decoding untrusted image bytes safely (size, pixel caps, decompression bombs, bad data)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(data: bytes, max_bytes: int, max_pixels: int, label: str = "image") -> Image.Image:
    if not data:
        raise InvalidInput(f"{label} is empty")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{label} is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Raster formats only: never EPS/PS (which would run Ghostscript) or other exotic decoders.
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(f"{label} is {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise PayloadTooLarge(f"{label} is too large to decode: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"{label} is not a decodable image") from exc
    return image.convert("RGB")


def decode_base64_image(text: str, max_bytes: int, max_pixels: int, label: str = "image") -> Image.Image:
    """A base64 string or a ``data:image/...;base64,`` URL; remote URLs are refused."""
    if text.startswith(("http://", "https://")):
        raise InvalidInput(f"{label}: remote image URLs are not fetched; send the image as base64 or a data URL")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise InvalidInput(f"{label}: only data:image/...;base64 URLs are accepted")
    if len(text) > max_bytes * 4 // 3 + 4:
        raise PayloadTooLarge(f"{label} exceeds {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{label} is not valid base64") from exc
    return decode_image(data, max_bytes, max_pixels, label)
