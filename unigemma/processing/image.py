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
from PIL import Image, ImageOps, UnidentifiedImageError

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


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB."""
    if img.mode.startswith("I;16"):
        # Deviation: Pillow (and so the reference) clips 16-bit samples at 255, turning a
        # 16-bit scan white. Map the 16-bit range onto 8 bits instead (65535 -> 255).
        a = np.asarray(img).astype(np.float64) / 257
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    elif img.mode in ("I", "F"):
        # 32-bit int / float: no declared range. Floats in [0, 1] are scaled, int data above 255
        # is taken as 16-bit; anything else is clipped as Pillow would.
        a = np.nan_to_num(np.asarray(img).astype(np.float64))
        if a.size and img.mode == "F" and a.max() <= 1:
            a = a * 255
        elif a.size and img.mode == "I" and a.max() > 255:
            a = a / 257
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        # transformers' convert_to_rgb (PIL images): alpha-composite on opaque white.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: Any, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, bytes, file object, `data:` URL or base64 string, PIL image, or uint8 array -> 8-bit RGB PIL.

    Encoded images get their EXIF orientation applied (as transformers' loaders do); PIL
    images and arrays are taken as given (as its processor does). Every failure is an InputError.
    """
    with warnings.catch_warnings():
        # Pillow warns on odd EXIF, truncated reads, palette transparency...; we either cope
        # or raise InputError, and the size guard below is ours.
        warnings.simplefilter("ignore")
        if isinstance(source, Image.Image):
            return _checked_rgb(source, max_pixels, encoded=False)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return _checked_rgb(_from_array(source), max_pixels, encoded=False)
        with _open(_bytes_of(source)) as img:  # closes the file (multi-frame images keep it open)
            return _checked_rgb(img, max_pixels, encoded=True)


def _checked_rgb(img: Image.Image, max_pixels: int | None, encoded: bool) -> Image.Image:
    """Size guard, decode, EXIF orientation (encoded files only), RGB: a new image."""
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
            img = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the pixels as stored
            pass
    try:
        return _to_rgb(img)
    except Exception as e:  # e.g. a mode Pillow cannot convert (LAB)
        raise InputError(f"cannot convert a {img.mode} image to RGB: {type(e).__name__}: {e}") from e


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
    # Each 48x48 block flattened as (row, column, channel): the order the reference's 16-px
    # patches + 3x3 kernel-ordered merge produce.
    patches = pixels.reshape(C, rows, PATCH, cols, PATCH).permute(1, 3, 2, 4, 0).reshape(n, PATCH * PATCH * C)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], -1)  # (x, y): column first
    out = torch.zeros(max_soft_tokens, PATCH * PATCH * C, dtype=patches.dtype)
    pos = torch.full((max_soft_tokens, 2), -1, dtype=torch.long)
    out[:n], pos[:n] = patches, positions
    return out, pos, n


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W] (non-RGB modes converted as `load_image` does)."""
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def preprocess_image(image: Any, max_soft_tokens: int = 280, *, match: str = "cpu") -> ProcessedImage:
    """An RGB image (PIL, uint8 [3, H, W] tensor, or anything `load_image` takes) -> pixel
    values and positions for the model; `match` picks the resize kernel (see `resize`)."""
    max_soft_tokens = check_budget(max_soft_tokens)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        u8 = image
    else:
        u8 = to_tensor(image if isinstance(image, Image.Image) else load_image(image))
    h, w = target_size(u8.shape[-2], u8.shape[-1], max_soft_tokens)
    pixels = resize(u8, h, w, match=match) * (1 / 255)  # the reference's rescale: uint8 x Python float -> float32
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
