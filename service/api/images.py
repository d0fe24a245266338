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


INLINE_MAX_BYTES = 256 * 1024
"""Requests whose images total at most this many bytes (encoded) and..."""
INLINE_MAX_PIXELS = 1024 * 1024
"""...at most this many pixels (read from the headers) are decoded on the event loop: see
:func:`cheap_to_decode`."""


def cheap_to_decode(encoded: list[bytes]) -> bool:
    """Whether decoding ``encoded`` images costs less than a trip through the thread pool.

    On 2 cores shared with the model, handing a request's decoding to FastAPI's thread pool and
    back cost the server about 1 ms of CPU per request, more than decoding a small image (0.2 ms
    for the load test's 96 px PNGs): batched throughput went up 11 % without the trip
    (docs/benchmarks.md). Only small uploads qualify, by their bytes and by the pixel counts their
    headers declare (a small file can declare a huge image), so the event loop never blocks long.
    Anything unreadable goes to the thread pool, where decoding reports it.
    """
    if sum(len(data) for data in encoded) > INLINE_MAX_BYTES:
        return False
    pixels = 0
    for data in encoded:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a bomb's warning is decode_image's to raise)
                with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:  # reads the header only
                    width, height = image.size
        except Exception:  # (any decoding error is reported by decode_image, off the loop)
            return False
        pixels += width * height
    return pixels <= INLINE_MAX_PIXELS


def small_base64(texts: list[str]) -> bool:
    """Whether base64 images (plain or ``data:`` URLs) are few enough bytes to decode from base64
    on the event loop (see :func:`cheap_to_decode`)."""
    return sum(len(text) for text in texts) <= INLINE_MAX_BYTES * 4 // 3 + 4 * len(texts)


def decode_base64(text: str, max_bytes: int, label: str = "image") -> bytes:
    """The bytes of a base64 string or a ``data:image/...;base64,`` URL; remote URLs are refused."""
    if text.startswith(("http://", "https://")):
        raise InvalidInput(f"{label}: remote image URLs are not fetched; send the image as base64 or a data URL")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise InvalidInput(f"{label}: only data:image/...;base64 URLs are accepted")
    if len(text) > max_bytes * 4 // 3 + 4:
        raise PayloadTooLarge(f"{label} exceeds {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{label} is not valid base64") from exc


def decode_base64_image(text: str, max_bytes: int, max_pixels: int, label: str = "image") -> Image.Image:
    """:func:`decode_base64`, then :func:`decode_image`."""
    return decode_image(decode_base64(text, max_bytes, label), max_bytes, max_pixels, label)
