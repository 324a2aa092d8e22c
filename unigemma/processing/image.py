"""Images -> the vision embedder's inputs: decode, size to a soft-token budget, cut 48x48 patches.

Equal to transformers' `Gemma4UnifiedImageProcessor` (which needs torchvision, unusable with CPU
torch here), step by step:
  1. decode with Pillow, apply EXIF orientation, make 8-bit RGB (transparency composited on
     white, as transformers' `convert_to_rgb` does; 16-bit samples scaled to 8 bits where
     Pillow, and so the reference, would clip them at 255);
  2. pick the largest size with sides multiple of 48 and at most budget x 9 patches of 16 px
     (`target_size`), keeping the aspect ratio;
  3. resize the uint8 image as torchvision's `resize(..., BICUBIC, antialias=True)` does on
     the processor's default device, the CPU (`resize`; its CUDA kernel differs, see there);
     the kernel's horizontal pass runs on bands of rows as they are converted to RGB, so a
     large image never exists as a full-size RGB or float copy (bit-equal to one call);
  4. x 1/255, cut 48x48 patches in raster order, each flattened as (row, column, channel),
     with (x, y) patch positions; pad to `max_soft_tokens` rows (zeros, position (-1, -1)).
The reference cuts 16-px patches and merges 3x3 of them; that is the same as cutting 48-px
patches directly, which the tests check against its own helper functions.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

PATCH = 48  # pixels per patch side: 3x3 of the reference's 16-px "teacher" patches
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
# Decompression-bomb guard, checked from the header before any pixel is decoded. An 8000x6000
# photo (48 MP) passes; a crafted 50000x50000 PNG of a few KB does not. (Pillow's own guard,
# 2 x Image.MAX_IMAGE_PIXELS ~ 179 MP, still applies above this unless the caller raises it.)
MAX_IMAGE_PIXELS = 100_000_000
# Only common formats that decode in-process: Image.open would also take EPS (runs Ghostscript),
# WMF, FITS... and TGA, whose loose header check mistakes stray bytes for an image.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "PPM", "AVIF", "JPEG2000", "QOI")
_BASE64 = re.compile(r"[A-Za-z0-9+/=_\-\s]+")


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [max_soft_tokens, 6912] float32 in [0, 1], zero rows after the real ones
    position_ids: torch.Tensor  # [max_soft_tokens, 2] int64 (x, y), (-1, -1) on padding rows
    num_soft_tokens: int  # real patches = placeholder tokens in the prompt
    size: tuple[int, int]  # (height, width) after resizing


# --- decoding -----------------------------------------------------------------------------
def _b64(text: str, what: str) -> bytes:
    """Standard or URL-safe base64, line breaks and missing padding forgiven."""
    text = re.sub(r"\s", "", text).translate(str.maketrans("-_", "+/"))
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{what}: {e}") from e
    if not data:
        raise InputError("image data is empty")
    return data


def _bytes_of(source: Any) -> Any:
    """Strings (path, data: URL, bare base64 as transformers accepts) and buffers -> a file object or path."""
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            raise InputError(f"image URLs are not fetched; download {source[:80]} and pass the file or its bytes")
        if source.startswith("data:"):
            head, _, payload = source.partition(",")
            if ";base64" not in head:
                raise InputError("image data URL is not base64-encoded")
            return io.BytesIO(_b64(payload, "image data URL holds invalid base64"))
        # transformers reads any string that is not a file as base64; only long strings of the
        # base64 alphabet are taken so, so that a mistyped path still says "does not exist".
        if len(source) >= 64 and not os.path.exists(source) and _BASE64.fullmatch(source):
            return io.BytesIO(_b64(source, "image string is neither a file nor valid base64"))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("image bytes are empty")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image file {path} does not exist" if not path.exists() else f"{path} is not a file")
        return path
    if hasattr(source, "read"):
        return source
    raise InputError(f"cannot read an image from a {type(source).__name__}")


def _open(source: Any) -> Image.Image:
    """A file object or path -> a PIL image with only its header read (lazy)."""
    try:
        return Image.open(source, formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise InputError(f"image is over the limit Pillow decodes safely (decompression bomb guard): {e}") from e
    except UnidentifiedImageError as e:
        raise InputError(f"not an image format we read ({', '.join(FORMATS)}), or a corrupt file") from e
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise InputError(f"cannot decode image (truncated or corrupt file): {type(e).__name__}: {e}") from e


def _from_array(a: Any) -> Image.Image:
    """[H, W], [H, W, 1|3|4] (or channel-first [1|3|4, H, W]) uint8, or float in [0, 1] -> PIL."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channel-first, as torchvision tensors are
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise InputError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"image has no pixels (array of shape {a.shape})")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError(f"image arrays must be uint8, or float in [0, 1]; got {a.dtype}")
        a = np.round(a * 255).astype(np.uint8)  # (the reference would resize the floats as given)
    if a.ndim == 3 and a.shape[-1] == 4:
        # transformers' torchvision convert_to_rgb for 4-channel arrays: blend on white in
        # float32, then back to uint8 by x 255.999 and truncation (torchvision's to_dtype).
        x = torch.from_numpy(a).float().mul_(1.0 / 255)
        rgb, alpha = x[..., :3], x[..., 3:]
        a = (rgb * alpha + (1 - alpha)).mul_(255 + 1.0 - 1e-3).to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(a))


# Pixels converted to RGB at a time: 1 MP, i.e. ~10 MB of transient buffers whatever the image's size.
BAND_PIXELS = 1 << 20


def _deep_rule(img: Image.Image) -> str | None:
    """How 16/32-bit and float images map to 8 bits; decided over the whole image, applied per band.

    Deviation for "I;16": Pillow (and so the reference) clips 16-bit samples at 255, turning a
    16-bit scan white; we map the 16-bit range onto 8 bits (65535 -> 255). 32-bit int / float
    have no declared range: floats all in [0, 1] are scaled, int data above 255 is taken as
    16-bit; anything else is clipped as Pillow would.
    """
    if img.mode.startswith("I;16"):
        return "div257"
    if img.mode == "I":
        return "div257" if img.getextrema()[1] > 255 else "clip"
    if img.mode == "F":
        # max of nan_to_num over bands (getextrema's NaN handling is not documented)
        top = max(float(np.nan_to_num(np.asarray(b, np.float64)).max()) for _, b in _bands(img))
        return "mul255" if top <= 1 else "clip"
    return None


def _bands(img: Image.Image):
    """(first row, a crop of at most BAND_PIXELS pixels) over the image, top to bottom."""
    W, H = img.size
    rows = max(1, BAND_PIXELS // max(W, 1))
    for y in range(0, H, rows):
        yield y, img.crop((0, y, W, min(H, y + rows)))


def _band_rgb(band: Image.Image, rule: str | None) -> np.ndarray:
    """One band -> uint8 [rows, W, 3]; every step is per pixel, so bands equal the whole."""
    if rule is not None:
        a = np.asarray(band, dtype=np.float64)  # a copy of one band, then worked on in place
        if band.mode == "F":
            np.nan_to_num(a, copy=False)
        if rule == "div257":
            a /= 257
        elif rule == "mul255":
            a *= 255
        band = Image.fromarray(np.clip(np.round(a, out=a), 0, 255, out=a).astype(np.uint8))  # no alpha, as before
    if "A" in band.getbands() or band.info.get("transparency") is not None:
        # transformers' convert_to_rgb (PIL images): alpha-composite on opaque white.
        rgba = band.convert("RGBA")
        band = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(band.convert("RGB"))


def _rgb_rows(img: Image.Image):
    """(first row, uint8 [3, rows, W] tensor) per band of `img` made 8-bit RGB."""
    rule = _deep_rule(img)
    for y, band in _bands(img):
        yield y, torch.from_numpy(_band_rgb(band, rule)).permute(2, 0, 1).contiguous()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, in memory of the output plus one band."""
    if img.mode == "RGB":
        return img
    out = Image.new("RGB", img.size)
    for y, band in _rgb_rows(img):
        out.paste(Image.fromarray(band.permute(1, 2, 0).numpy()), (0, y))
    return out


def load_image(source: Any, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, bytes, file object, `data:` URL or base64 string, PIL image, or uint8 array -> 8-bit RGB PIL.

    Encoded images get their EXIF orientation applied (as transformers' loaders do); PIL
    images and arrays are taken as given (as its processor does). Every failure is an InputError.
    """
    img = _decoded(source, max_pixels)
    rgb = _converted(lambda: _to_rgb(img), img)
    return rgb.copy() if rgb is source else rgb  # a new image, never the caller's own


def _converted(fn, img: Image.Image):
    try:
        return fn()
    except InputError:
        raise
    except Exception as e:  # e.g. a mode Pillow cannot convert (LAB)
        raise InputError(f"cannot convert a {img.mode} image to RGB: {type(e).__name__}: {e}") from e


def _decoded(source: Any, max_pixels: int | None) -> Image.Image:
    """Any image source -> a decoded PIL image in its own mode (EXIF-oriented if encoded)."""
    with warnings.catch_warnings():
        # Pillow warns on odd EXIF, truncated reads, palette transparency...; we either cope
        # or raise InputError, and the size guard below is ours.
        warnings.simplefilter("ignore")
        if isinstance(source, Image.Image):
            return _checked(source, max_pixels, encoded=False)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return _checked(_from_array(source), max_pixels, encoded=False)
        with _open(_bytes_of(source)) as img:  # closes the file (multi-frame images keep it open)
            return _checked(img, max_pixels, encoded=True)


def image_size(source: Any) -> tuple[int, int] | None:
    """(height, width) from the header alone (no pixel decoded; EXIF rotation not applied);
    None for a file object that cannot be rewound. Errors are the loader's InputErrors."""
    if isinstance(source, Image.Image):
        return source.height, source.width
    if isinstance(source, (np.ndarray, torch.Tensor)):
        shape = tuple(source.shape)
        if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
            shape = shape[1:]  # channel-first, as _from_array reads it
        return (shape[0], shape[1]) if len(shape) >= 2 else None
    opened = _bytes_of(source)
    if opened is source:  # the caller's file object
        if not (hasattr(opened, "seek") and opened.seekable()):
            return None
        at = opened.tell()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _open(opened).size[::-1]
        finally:
            opened.seek(at)  # the loader reads it again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _open(opened) as img:
            return img.height, img.width


def _checked(img: Image.Image, max_pixels: int | None, encoded: bool) -> Image.Image:
    """Size guard, decode, EXIF orientation (encoded files only)."""
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                         "(a guard against decompression bombs; raise max_pixels to allow it)")
    try:
        img.load()  # the actual decode: truncated or corrupt data fails here
    except Exception as e:
        raise InputError(f"cannot decode image ({w}x{h} {img.format or img.mode}): truncated or corrupt: "
                         f"{type(e).__name__}: {e}") from e
    if encoded:
        try:
            # exif_transpose copies the whole image even when upright: only call it to turn one
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the pixels as stored
            pass
    return img


# --- sizing, resizing, patches ------------------------------------------------------------
def check_budget(max_soft_tokens: Any) -> int:
    """The budget as an int, or InputError unless it is one of the five the model was trained on."""
    if isinstance(max_soft_tokens, bool) or not isinstance(max_soft_tokens, (int, np.integer)) \
            or max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise InputError(f"image soft-token budget must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens!r}")
    return int(max_soft_tokens)


def target_size(height: int, width: int, max_soft_tokens: int = 280) -> tuple[int, int]:
    """The reference's aspect-ratio rule: the largest (h, w), multiples of 48, within the budget."""
    max_soft_tokens = check_budget(max_soft_tokens)
    target_px = max_soft_tokens * 9 * 16 * 16  # budget x 9 teacher patches of 16x16 px
    factor = math.sqrt(target_px / (height * width))
    h = int(math.floor(factor * height / PATCH)) * PATCH
    w = int(math.floor(factor * width / PATCH)) * PATCH
    longest = max_soft_tokens * PATCH  # a one-patch-high strip may hold the whole budget
    if h == 0:  # very wide: one patch high, as wide as the aspect ratio allows
        h, w = PATCH, min(int(math.floor(width / height)) * PATCH, longest)
    elif w == 0:
        w, h = PATCH, min(int(math.floor(height / width)) * PATCH, longest)
    return h, w


def resize(image: torch.Tensor, height: int, width: int, *, match: str = "cpu") -> torch.Tensor:
    """uint8 [..., 3, H, W] -> uint8 [..., 3, height, width], as torchvision's tensor resize
    (bicubic, antialias, Keys a = -0.5 as Pillow) does on the reference's device:

    * "cpu" (the processor's default device): torchvision hands the uint8 tensor straight to
      `F.interpolate`, whose uint8 kernel works in fixed point and stores the horizontal pass
      as uint8 before the vertical one (Pillow's scheme);
    * "cuda": torchvision interpolates in float32, then clamps and rounds.
    The two differ by a level or so on photos (more on noise, where the first pass overshoots).
    """
    if match not in ("cpu", "cuda"):
        raise ValueError(f"match must be 'cpu' or 'cuda', got {match!r}")
    if tuple(image.shape[-2:]) == (height, width):
        return image  # the reference skips the resize when the size already fits
    x = image.reshape(-1, *image.shape[-3:])
    if match == "cpu":
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    else:
        x = F.interpolate(x.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0, 255).round_().to(torch.uint8)
    return x.reshape(*image.shape[:-2], height, width)


def patchify(pixels: torch.Tensor, max_soft_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float [C, H, W] (H, W multiples of 48) -> padded patches [max, 6912], positions [max, 2], count."""
    C, H, W = pixels.shape
    rows, cols = H // PATCH, W // PATCH
    n = rows * cols
    out = torch.zeros(max_soft_tokens, PATCH * PATCH * C, dtype=pixels.dtype)
    # Each 48x48 block flattened as (row, column, channel): the order the reference's 16-px
    # patches + 3x3 kernel-ordered merge produce; written straight into the padded output.
    out[:n].view(rows, cols, PATCH, PATCH, C).copy_(pixels.reshape(C, rows, PATCH, cols, PATCH).permute(1, 3, 2, 4, 0))
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.full((max_soft_tokens, 2), -1, dtype=torch.long)
    pos[:n] = torch.stack([xs.flatten(), ys.flatten()], -1)  # (x, y): column first
    return out, pos, n


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W] (non-RGB modes converted as `load_image` does)."""
    out = torch.empty(3, image.height, image.width, dtype=torch.uint8)

    def fill():
        for y, band in _rgb_rows(image):
            out[:, y:y + band.shape[1]] = band
    _converted(fill, image)
    return out


def _resized(img: Image.Image, height: int, width: int, match: str) -> torch.Tensor:
    """A decoded PIL image (any mode) -> uint8 [3, height, width], as `resize(to_tensor(img))`.

    On the CPU kernel each band of rows is made RGB and resized horizontally at once, then the
    narrower intermediate vertically: the kernel's own two passes (uint8 in between), so the
    result is bit-equal while memory holds one band and [3, H, width], not the whole image.
    """
    if match != "cpu" or img.width == width:  # the float kernel is one pass; or nothing to narrow
        return resize(_converted(lambda: to_tensor(img), img), height, width, match=match)
    inter = torch.empty(3, img.height, width, dtype=torch.uint8)
    rule = _converted(lambda: _deep_rule(img), img)
    for y, band in _bands(img):
        rgb = torch.from_numpy(_converted(lambda: _band_rgb(band, rule), img)).permute(2, 0, 1).contiguous()
        inter[:, y:y + rgb.shape[1]] = resize(rgb, rgb.shape[1], width)
        del rgb
    return resize(inter, height, width)


def preprocess_image(image: Any, max_soft_tokens: int = 280, *, match: str = "cpu") -> ProcessedImage:
    """An image (PIL, uint8 [3, H, W] tensor, or anything `load_image` takes) -> pixel values
    and positions for the model; `match` picks the resize kernel (see `resize`). Encoded
    sources are decoded, converted and resized band by band (memory ~ the output, plus the
    decoded file)."""
    max_soft_tokens = check_budget(max_soft_tokens)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        h, w = target_size(image.shape[-2], image.shape[-1], max_soft_tokens)
        u8 = resize(image, h, w, match=match)
    else:
        img = image if isinstance(image, Image.Image) else _decoded(image, MAX_IMAGE_PIXELS)
        h, w = target_size(img.height, img.width, max_soft_tokens)
        u8 = _resized(img, h, w, match)
        del img
    pixels = u8 * (1 / 255)  # the reference's rescale: uint8 x Python float -> float32
    pixel_values, position_ids, n = patchify(pixels, max_soft_tokens)
    return ProcessedImage(pixel_values, position_ids, n, (h, w))


def batch_images(items: list[ProcessedImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack processed images: pixel_values [N, P, 6912], image_position_ids [N, P, 2].

    As the reference: every image is padded to its budget P (not to the batch's longest), so
    all images of one request must share one budget.
    """
    if not items:
        raise InputError("no images to batch")
    if len({tuple(i.pixel_values.shape) for i in items}) > 1:
        raise InputError("images of one request must share a soft-token budget")
    return torch.stack([i.pixel_values for i in items]), torch.stack([i.position_ids for i in items])
