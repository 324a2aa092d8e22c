"""Images -> the vision embedder's inputs: decode, size to a soft-token budget, cut 48x48 patches.

Equal to transformers' `Gemma4UnifiedImageProcessor` (which needs torchvision, unusable with CPU
torch here), step by step:
  1. decode with Pillow, apply EXIF orientation, make 8-bit RGB (transparency composited on
     white, as transformers' `convert_to_rgb` does);
  2. pick the largest size with sides multiple of 48 and at most budget x 9 patches of 16 px
     (`target_size`), keeping the aspect ratio;
  3. resize the uint8 image as torchvision's tensor resize does: bicubic with antialias on
     float, then round and clamp back to uint8;
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
# photo (48 MP) passes; a crafted 50000x50000 PNG of a few KB does not.
MAX_IMAGE_PIXELS = 100_000_000


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [max_soft_tokens, 6912] float32 in [0, 1], zero rows after the real ones
    position_ids: torch.Tensor  # [max_soft_tokens, 2] int64 (x, y), (-1, -1) on padding rows
    num_soft_tokens: int  # real patches = placeholder tokens in the prompt
    size: tuple[int, int]  # (height, width) after resizing


# --- decoding -----------------------------------------------------------------------------
def _open(source: Any) -> Image.Image:
    """Whatever a message part may hold -> a PIL image, not yet decoded (lazy)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, str) and source.startswith("data:"):
        head, _, payload = source.partition(",")
        if ";base64" not in head:
            raise InputError("image data URL is not base64-encoded")
        try:
            source = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image data URL holds invalid base64: {e}") from e
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise InputError(f"image URLs are not fetched; download {source[:80]} and pass the file or its bytes")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("image bytes are empty")
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image file {path} does not exist" if not path.exists() else f"{path} is not a file")
        source = path
    elif not hasattr(source, "read"):
        raise InputError(f"cannot read an image from a {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            return Image.open(source)  # reads the header only
    except Image.DecompressionBombError as e:
        raise InputError(f"image is over the limit Pillow decodes safely (decompression bomb guard): {e}") from e
    except UnidentifiedImageError as e:
        raise InputError("not an image format Pillow can read (corrupt or unsupported file)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot decode image (truncated or corrupt file): {e}") from e


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise InputError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError(f"image arrays must be uint8, or float in [0, 1]; got {a.dtype}")
        a = np.round(a * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips these at 255 (a 16-bit scan turns white); scale instead.
        a = np.asarray(img)
        if img.mode == "F":
            a = a * 255 if a.size and np.nanmax(a) <= 1 else a
            a = np.nan_to_num(a)
        elif a.size and a.max() > 255:
            a = a.astype(np.float64) / 257  # 16-bit range onto 8-bit, 65535 -> 255
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        # transformers' convert_to_rgb: composite transparency on white.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: Any, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, bytes, file object, `data:` URL, PIL image or uint8 array -> an 8-bit RGB PIL image.

    Files and bytes get their EXIF orientation applied; PIL images and arrays are taken as given.
    """
    img = _open(source)
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                         "(a guard against decompression bombs; raise max_pixels to allow it)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if not isinstance(source, (Image.Image, np.ndarray)):
                img = ImageOps.exif_transpose(img)  # decodes; the size was checked above
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode image ({w}x{h}, {img.format or img.mode}): truncated or corrupt: {e}") from e


# --- sizing, resizing, patches ------------------------------------------------------------
def target_size(height: int, width: int, max_soft_tokens: int = 280) -> tuple[int, int]:
    """The reference's aspect-ratio rule: the largest (h, w), multiples of 48, within the budget."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise InputError(f"image soft-token budget must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens!r}")
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


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> uint8 [..., 3, height, width], as torchvision resizes uint8 tensors
    (bicubic, antialias): interpolate in float, then round and clamp."""
    if tuple(image.shape[-2:]) == (height, width):
        return image  # the reference skips the resize when the size already fits
    x = image.reshape(-1, *image.shape[-3:]).float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(*image.shape[:-2], height, width)


def patchify(pixels: torch.Tensor, max_soft_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float [C, H, W] (H, W multiples of 48) -> padded patches [max, 6912], positions [max, 2], count."""
    C, H, W = pixels.shape
    rows, cols = H // PATCH, W // PATCH
    n = rows * cols
    patches = pixels.reshape(C, rows, PATCH, cols, PATCH).permute(1, 3, 2, 4, 0).reshape(n, PATCH * PATCH * C)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], -1)
    out = torch.zeros(max_soft_tokens, PATCH * PATCH * C, dtype=patches.dtype)
    pos = torch.full((max_soft_tokens, 2), -1, dtype=torch.long)
    out[:n], pos[:n] = patches, positions
    return out, pos, n


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def preprocess_image(image: Image.Image | torch.Tensor, max_soft_tokens: int = 280) -> ProcessedImage:
    """An RGB image (PIL, or uint8 [3, H, W]) -> pixel values and positions for the model."""
    u8 = image if isinstance(image, torch.Tensor) else to_tensor(image)
    h, w = target_size(u8.shape[-2], u8.shape[-1], max_soft_tokens)
    pixels = resize(u8, h, w) * (1 / 255)  # the reference's rescale: uint8 tensor x Python float -> float32
    pixel_values, position_ids, n = patchify(pixels, max_soft_tokens)
    return ProcessedImage(pixel_values, position_ids, n, (h, w))


def batch_images(items: list[ProcessedImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack processed images: pixel_values [N, P, 6912], image_position_ids [N, P, 2].

    Every image is already padded to its budget; images of one request share it.
    """
    if len({tuple(i.pixel_values.shape) for i in items}) > 1:
        raise InputError("images of one request must share a soft-token budget")
    return torch.stack([i.pixel_values for i in items]), torch.stack([i.position_ids for i in items])
