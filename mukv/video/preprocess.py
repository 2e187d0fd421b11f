"""Frames -> normalised pixel tensors for the vision tower, as the checkpoint's own processor makes them.

The published ReKV / MuKV code feeds frames through the checkpoint's ``LlavaOnevisionVideoProcessor`` (the
slow PIL processor of the transformers of their time). Per frame it resizes the uint8 image straight to
(S, S), aspect ratio not kept, no crop, with ``PIL.Image.resize(..., BICUBIC)`` (``image_transforms.resize``:
numpy -> PIL image -> resize -> numpy, so the result is uint8 again, rounded and clipped by PIL), then rescales
by 1/255 and normalises with the checkpoint's ``image_mean`` / ``image_std`` in float32. ``resize_frames``
and ``preprocess_frames`` do exactly that (``FrameResize.pil_uint8``, the default); a frame already at (S, S)
is not resized (PIL would return a copy of it). ``FrameResize.torch_float`` keeps the earlier resize of this
project: float bicubic with antialias in torch, never rounded to uint8 (within a few levels of PIL's, more at
sharp edges). Rescale and normalisation are the same for both. No torchvision anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class FrameResize(str, Enum):
    """``model.resize``: how frames that are not at the vision size are brought to it."""

    pil_uint8 = "pil_uint8"  # the checkpoint processor's: PIL bicubic on uint8, uint8 out (default)
    torch_float = "torch_float"  # torch bicubic + antialias in float, no rounding (this project's earlier resize)

    def __str__(self) -> str:
        return self.value


def frame_resize(value: FrameResize | str) -> FrameResize:
    """``value`` as a :class:`FrameResize`; an unknown name is a ValueError listing the choices."""
    if isinstance(value, FrameResize):
        return value
    try:
        return FrameResize(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in FrameResize)
        raise ValueError(f"unknown frame resize '{value}'; choose one of {choices}") from None


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (n, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (RGB 0-255), got dtype {frames.dtype}")
    return frames


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> uint8 (n, size, size, 3): each frame through ``PIL.Image.resize((size, size),
    BICUBIC)``, as transformers' slow processor resizes video frames. Frames already at (size, size) are
    returned as they are (no copy)."""
    return resize_frames_to(frames, size, size)


def resize_frames_to(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> uint8 (n, height, width, 3) through ``PIL.Image.resize(BICUBIC)`` (as the Qwen-VL
    processors resize); frames already at that size are returned as they are."""
    from PIL import Image

    frames = _check_frames(frames)
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC))
    return out


def preprocess_frames(frames: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
                      resize: FrameResize | str = FrameResize.pil_uint8) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float32 (n, 3, size, size): resize (see ``resize``), ``x / 255``, then
    ``(x - mean) / std`` per channel in float32 (bit-identical to transformers' ``rescale`` + ``normalize``)."""
    import torch
    import torch.nn.functional as F

    mode = frame_resize(resize)
    frames = _check_frames(frames)
    if mode is FrameResize.pil_uint8:
        frames = resize_frames(frames, size)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # a new tensor (uint8 in)
    if x.shape[-2:] != (size, size):  # torch_float only: pil_uint8 frames are at the size by now
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 255)
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(m).div_(s)
