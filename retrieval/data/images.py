"""JPEG decoding to RGB uint8 with simplejpeg (libjpeg-turbo), Pillow as the fallback."""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None
from PIL import Image

log = logging.getLogger(__name__)


MAX_PIXELS = 40_000_000  # a Cdiscount picture has 32,400; anything past this is refused before decoding


class ImageDecodeError(ValueError):
    """A picture that is neither a decodable JPEG nor any image Pillow can read (or one over MAX_PIXELS)."""


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"picture of {width} x {height} pixels is over the {MAX_PIXELS:,}-pixel limit")


def picture_hash(data: bytes) -> int:
    """First 8 bytes of the MD5 of a picture's bytes, as a signed int64 (exact-duplicate key)."""
    return int.from_bytes(hashlib.md5(data).digest()[:8], "little", signed=True)


def decode_image(data: bytes, min_size: int | None = None) -> np.ndarray:
    """Decode JPEG (or any Pillow-readable) bytes to an RGB array ``[H, W, 3]`` uint8.

    ``min_size`` lets libjpeg-turbo down-scale in the DCT domain while keeping both sides
    ``>= min_size`` (much faster when the model wants small images). Grayscale and CMYK come out as RGB.
    """
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            h, w, *_ = simplejpeg.decode_jpeg_header(data)
        except (ValueError, RuntimeError):
            h = w = 0  # let Pillow decide below
        _check_pixels(w, h)
        try:
            kw = {"min_height": min_size, "min_width": min_size} if min_size else {}
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True, **kw)
        except (ValueError, RuntimeError):
            pass  # CMYK, progressive oddities, damage: let Pillow decide
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(*im.size)  # read from the header: nothing is decoded yet
            im.draft("RGB", (min_size, min_size)) if min_size else None
            return np.asarray(im.convert("RGB"))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"picture over the {MAX_PIXELS:,}-pixel limit ({e})") from e
    except Exception as e:
        raise ImageDecodeError(f"undecodable picture ({len(data)} bytes): {e}") from e


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB ``[H, W, 3]`` uint8 array as baseline JPEG bytes."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class DecodeStats:
    """Counts of pictures decoded and skipped; ``failures`` keeps the first few for the report."""

    decoded: int = 0
    failed: int = 0
    products_without_image: int = 0
    failures: list[str] = field(default_factory=list)

    def record_failure(self, where: str, err: Exception) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(f"{where}: {err}")

    def merge(self, other: "DecodeStats") -> None:
        self.decoded += other.decoded
        self.failed += other.failed
        self.products_without_image += other.products_without_image
        self.failures.extend(other.failures[: max(0, 20 - len(self.failures))])

    def summary(self) -> str:
        return (f"{self.decoded} images decoded, {self.failed} undecodable images skipped, "
                f"{self.products_without_image} products with no decodable image")
