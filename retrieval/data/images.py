"""JPEG decoding to RGB uint8 with simplejpeg (libjpeg-turbo), Pillow as the fallback."""
from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None
from PIL import Image

log = logging.getLogger(__name__)


MAX_PIXELS = 40_000_000  # a Cdiscount picture has 32,400; anything past this is refused before decoding
# Pictures that cannot be decoded reduced (every format but single-scan baseline JPEG: PNG, WebP, GIF, BMP,
# progressive or multi-scan JPEG, whose coefficients are all held) are decoded at full size first, so they get a
# lower cap: a lossless WebP of 4096 x 4096 in 702 bytes took 260 MB to decode; 2048 x 2048 keeps one picture
# near 65 MB at worst. A 39 KB blank PNG of 6,324 x 6,324 (40 Mpx) is refused from its header.
MAX_FULL_PIXELS = 2048 * 2048
MAX_SIDE = 16384  # a 16,000,000 x 1 strip cannot be reduced toward a square input: refused
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # what Pillow may open (no EPS/Ghostscript, no TIFF)


class ImageDecodeError(ValueError):
    """A picture that is neither a decodable JPEG nor any image Pillow can read (or one over a pixel cap)."""


def _check_pixels(width: int, height: int, cap: int = MAX_PIXELS, what: str = "") -> None:
    if max(width, height) > MAX_SIDE:
        raise ImageDecodeError(f"picture of {width} x {height} pixels has a side over {MAX_SIDE:,} pixels")
    if width * height > cap:
        raise ImageDecodeError(f"picture of {width} x {height} pixels is over the {cap:,}-pixel limit{what}")


def _progressive(data: bytes) -> bool:
    """Whether JPEG ``data`` is progressive (SOF2/SOF6/SOF10/SOF14): a walk over the marker segments."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xC2, 0xC6, 0xCA, 0xCE):
            return True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return False  # another frame type, or the scan began
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _multi_scan(data: bytes) -> bool:
    """Whether JPEG ``data`` holds more than one scan (libjpeg then keeps every coefficient, whatever the
    reduction): the marker segments are walked to the first scan, then its entropy-coded bytes to the next
    marker (0xFF followed by neither 0x00 stuffing nor a restart marker), and so on to the end of the image."""
    i, scans = 2, 0
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return scans > 1
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")  # the segment (a scan's header, for 0xDA)
        if marker != 0xDA:
            continue
        scans += 1
        if scans > 1:
            return True
        while True:  # the entropy-coded data, up to the next marker
            i = data.find(b"\xff", i)
            if i < 0 or i + 1 >= len(data):
                return False
            nxt = data[i + 1]
            if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                i += 1 if nxt == 0xFF else 2
                continue
            break
    return scans > 1


def picture_hash(data: bytes) -> int:
    """First 8 bytes of the MD5 of a picture's bytes, as a signed int64 (exact-duplicate key)."""
    return int.from_bytes(hashlib.md5(data).digest()[:8], "little", signed=True)


def _no_repr(message: str) -> str:
    """A library's message without the object reprs some put in it (``<_io.BytesIO object at 0x7f...>``)."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "the picture", message)


def decode_image(data: bytes, min_size: int | None = None) -> np.ndarray:
    """Decode JPEG (or PNG, WebP, GIF, BMP) bytes to an RGB array ``[H, W, 3]`` uint8.

    ``min_size`` decodes a reduced picture keeping both sides ``>= min_size`` (what the model needs): JPEG
    down-scales in the DCT domain (libjpeg-turbo, or Pillow's ``draft``), so a 40 Mpx JPEG never exists at full
    size; other formats are decoded whole (under :data:`MAX_FULL_PIXELS`) and reduced by an integer factor.
    Every pixel cap is checked from the header, before anything is decoded. Grayscale and CMYK come out as RGB.
    """
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            h, w, *_ = simplejpeg.decode_jpeg_header(data)
        except (ValueError, RuntimeError):
            h = w = 0  # let Pillow decide below
        _check_pixels(w, h)
        if w * h > MAX_FULL_PIXELS and (_progressive(data) or _multi_scan(data)):
            _check_pixels(w, h, MAX_FULL_PIXELS, " for a progressive or multi-scan JPEG")
        try:
            kw = {"min_height": min_size, "min_width": min_size} if min_size else {}
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True, **kw)
        except (ValueError, RuntimeError):
            pass  # CMYK, progressive oddities, damage: let Pillow decide
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            return _pillow_decode(im, min_size, data)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"picture over the {MAX_PIXELS:,}-pixel limit ({e})") from e
    except Image.UnidentifiedImageError as e:  # its message names an in-memory object: never shown
        raise ImageDecodeError(f"undecodable picture ({len(data)} bytes): not a picture in a known format "
                               f"(starts {data[:8].hex(' ')})") from e
    except Exception as e:
        raise ImageDecodeError(f"undecodable picture ({len(data)} bytes): {type(e).__name__}: "
                               f"{_no_repr(str(e))}") from e


def _pillow_decode(im: Image.Image, min_size: int | None, data: bytes) -> np.ndarray:
    """An opened picture (only its header read so far) as RGB, reduced toward ``min_size`` where given."""
    w, h = im.size
    _check_pixels(w, h)
    if im.format == "JPEG" and not im.info.get("progressive") and not _multi_scan(data):
        if min_size:
            im.draft("RGB", (min_size, min_size))  # DCT scaling: the reduced picture is all that is decoded
    else:
        _check_pixels(w, h, MAX_FULL_PIXELS, f" for a {im.format} picture" if im.format != "JPEG"
                      else " for a progressive JPEG")
    factor = min(im.size) // min_size if min_size else 1
    if factor >= 2:
        if im.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"):
            im = im.convert("RGB")  # palette, 1-bit, 16-bit: Image.reduce takes none of them
        im = im.reduce(factor)
    return np.asarray(im.convert("RGB"))


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
