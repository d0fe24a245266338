"""Decoding untrusted image bytes safely (size, pixel caps, decompression bombs, bad data), and
remembering what was decoded recently."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service import metrics
from service.errors import InvalidInput, PayloadTooLarge
from service.lru import SizedLRU

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


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded from an upload, and a key naming its content: a hash of the encoded bytes,
    which the engine uses as the image's key in its feature and prefix caches."""

    image: Image.Image
    key: str


def content_key(data: bytes) -> str:
    """The key of an encoded image: a hash of its bytes (the same picture encoded twice differently
    gets two keys, and is merely decoded and encoded by the vision tower twice)."""
    return "bytes:" + hashlib.blake2b(data, digest_size=20).hexdigest()


_HITS, _MISSES = metrics.DECODED_IMAGE_LOOKUPS.labels("hit"), metrics.DECODED_IMAGE_LOOKUPS.labels("miss")


class DecodedImages:
    """Images decoded recently, by :func:`content_key`, at most ``capacity_bytes`` of RGB pixels.

    Questions about an image often come in several requests (several questions about one picture,
    or one per adapter). Decoding a PNG and hashing its pixels was a third of the HTTP layer's CPU
    per request in the load test (a py-spy profile; docs/benchmarks.md), on the cores the model
    runs on; a known image costs a hash of its encoded bytes instead. Only images that decoded
    without error are kept, so a known one is known good: identical bytes decode identically under
    the same limits. Shared by the event loop and the thread pool (the LRU takes its own lock).
    """

    def __init__(self, capacity_bytes: int):
        self._images: SizedLRU[DecodedImage] = SizedLRU(
            capacity_bytes, size=lambda entry: entry.image.width * entry.image.height * 3)

    def _looks_up_on_the_loop(self, encoded: list[bytes]) -> bool:
        # Uploads of more than INLINE_MAX_BYTES in all are not hashed on the event loop.
        return bool(self._images.capacity) and sum(len(data) for data in encoded) <= INLINE_MAX_BYTES

    def _get(self, key: str) -> DecodedImage | None:
        found = self._images.get(key)
        (_HITS if found is not None else _MISSES).inc()
        return found

    def known(self, encoded: list[bytes]) -> tuple[list[DecodedImage | None], bool]:
        """What each of ``encoded`` decoded to before (None for those not here), and whether they
        were looked up at all: uploads of more than :data:`INLINE_MAX_BYTES` in all are not (this
        runs on the event loop, and hashing them would hold it up); :meth:`decode` looks them up."""
        if not self._looks_up_on_the_loop(encoded):
            return [None] * len(encoded), False
        return [self._get(content_key(data)) for data in encoded], True

    def decode(self, data: bytes, max_bytes: int, max_pixels: int, label: str = "image",
               look_up: bool = True) -> DecodedImage:
        """What ``data`` decoded to before (unless ``look_up`` is false: :meth:`known` just missed
        it), else :func:`decode_image`, kept for next time."""
        if len(data) > max_bytes:  # (before hashing what may be a huge upload)
            raise PayloadTooLarge(f"{label} is {len(data)} bytes; the limit is {max_bytes}")
        key = content_key(data)
        found = self._get(key) if look_up and self._images.capacity else None
        if found is not None:
            return found
        decoded = DecodedImage(decode_image(data, max_bytes, max_pixels, label), key)
        self._images.put(key, decoded)
        return decoded
