"""transformers' Gemma 4 unified image/video helper functions, without torchvision.

Their modules import torchvision at the top (which cannot load with CPU torch here), so the
pure-torch helpers are lifted out of the installed source files by name and run as written.
"""

from __future__ import annotations

import ast
import functools
import math
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def helpers(module: str) -> dict:
    import transformers

    path = Path(transformers.__file__).parent / "models" / "gemma4_unified" / f"{module}.py"
    tree = ast.parse(path.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)
    return {n.name: namespace[n.name] for n in functions}


def reference_image(u8_resized: torch.Tensor, max_soft_tokens: int):
    """The reference `_preprocess` steps 2-6 on an already resized uint8 [3, H, W] image."""
    h = helpers("image_processing_gemma4_unified")
    image = u8_resized * (1 / 255)  # TorchvisionBackend.rescale: image * scale
    ph, pw = image.shape[-2] // 16, image.shape[-1] // 16
    teacher = h["convert_image_to_patches"](image, 16)
    grid = torch.meshgrid(torch.arange(pw), torch.arange(ph), indexing="xy")
    positions = torch.stack(grid, dim=-1).reshape(teacher.shape[0], 2)
    merged, merged_pos = h["patches_merge"](teacher[None], positions[None], teacher.shape[0] // 9)
    num = merged.shape[1]
    pv, pos = h["pad_along_first_dim"](merged[0], merged_pos[0], max_soft_tokens)
    return pv, pos, num


def reference_video(u8_resized: torch.Tensor, max_soft_tokens: int):
    """The reference video `_preprocess` steps 2-6 on resized uint8 frames [F, 3, H, W]."""
    h = helpers("video_processing_gemma4_unified")
    video = (u8_resized.float() - 0.0) / 255.0  # fused normalize with mean 0, std 1/rescale = 255
    F_, ph, pw = video.shape[0], video.shape[-2] // 16, video.shape[-1] // 16
    patches = h["convert_video_to_patches"](video, 16)
    grid = torch.meshgrid(torch.arange(pw), torch.arange(ph), indexing="xy")
    positions = torch.stack(grid, dim=-1).reshape(patches.shape[1], 2)[None].repeat(F_, 1, 1)
    merged, merged_pos = h["patches_merge"](patches, positions, patches.shape[1] // 9)
    num = merged.shape[1]
    pv, pos = h["pad_to_max_patches"](merged, merged_pos, max_soft_tokens)
    return pv, pos, num


def reference_size(height: int, width: int, max_soft_tokens: int) -> tuple[int, int]:
    return helpers("image_processing_gemma4_unified")["get_aspect_ratio_preserving_size"](
        height, width, patch_size=16, max_patches=max_soft_tokens * 9, pooling_kernel_size=3)
