"""Reading images from disk and turning them into normalised tensors.

Images are kept in OpenCV's BGR channel order end to end (the world is rendered with
OpenCV, and the detector is trained on BGR), so no colour conversion happens anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from vlpipe.errors import InputError

# Fixed affine normalisation of uint8 pixels to roughly [-1, 1]; fixed (not dataset
# statistics) so a trained detector never depends on a file computed elsewhere.
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 BGR array.

    Raises :class:`InputError` naming the file when it is missing, empty, truncated or
    not a decodable image (``cv2.imread`` would silently return ``None``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image file not found")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise InputError(path, "image file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(path, "corrupt or truncated image (cannot be decoded)")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(path, f"expected an 8-bit 3-channel image, got shape {img.shape} {img.dtype}")
    return img


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 BGR -> ``(3, H, W)`` float32, normalised to about [-1, 1]."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, H, W) uint8
    return (t.float() - PIXEL_MEAN) / PIXEL_STD


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 -> float32 normalised like :func:`image_to_tensor`."""
    return (images.float() - PIXEL_MEAN) / PIXEL_STD


def stack_images(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack BGR images of possibly different sizes into one uint8 batch.

    Smaller images are zero-padded at the bottom and right, so pixel coordinates (and
    therefore boxes) stay valid. Returns ``(batch (B, 3, Hmax, Wmax) uint8, sizes (B, 2)
    int64 as (h, w))``.
    """
    if not images:
        raise ValueError("stack_images needs at least one image")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    batch = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
    sizes = torch.zeros(len(images), 2, dtype=torch.int64)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(im.transpose(2, 0, 1))
        sizes[i, 0], sizes[i, 1] = im.shape[0], im.shape[1]
    return batch, sizes
