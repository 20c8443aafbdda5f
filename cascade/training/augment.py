"""Batched data augmentation for image tasks, run on the training device.

Random numbers come from torch's global CPU generator (small tensors made on the CPU,
then moved to the batch's device), so the trainer's checkpointed RNG state replays
them exactly on resume, whatever the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True) -> Tensor:
    """The standard CIFAR augmentation of a batch: zero-pad each image by ``padding``
    pixels, crop a random window of the original size, and mirror it left-right with
    probability 0.5; every image draws its own window and coin.

    Vectorized: one padding and one gather for the whole batch, no per-image loop.
    Random numbers, in this order: the offsets ``torch.randint(0, 2 * padding + 1,
    (2, B))`` (row offsets first, then column offsets; skipped when ``padding`` is 0),
    then the flips ``torch.rand(B) < 0.5`` (skipped without ``flip``).

    Args:
        x: a batch ``[B, C, H, W]`` of any dtype, on any device.
        padding: pixels of zeros added on each side before cropping (for inputs
            normalized by mean and std, zero is the mean pixel); 0 crops nothing.
        flip: also mirror a random half of the images.

    Returns:
        A new batch ``[B, C, H, W]`` with ``x``'s dtype and device: output pixel
        ``[b, c, i, j]`` is padded pixel ``[b, c, dy[b] + i, dx[b] + j]``, with ``j``
        read as ``W - 1 - j`` where image ``b`` is flipped.

    Raises:
        ValueError: ``x`` is not 4-dimensional, or ``padding`` is negative.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip needs a batch [B, C, H, W], got shape {list(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    if b == 0 or (padding == 0 and not flip):
        return x.clone()
    rows = torch.arange(h).expand(b, h)  # [B, H]: padded row of each output row
    cols = torch.arange(w).expand(b, w)  # [B, W]
    if padding:
        dy, dx = torch.randint(0, 2 * padding + 1, (2, b))
        rows, cols = rows + dy[:, None], cols + dx[:, None]
    if flip:
        flipped = torch.rand(b) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)  # mirror = read the window backwards
    src = F.pad(x, (padding,) * 4) if padding else x  # [B, C, H + 2p, W + 2p]
    # one gather over the flattened padded images (faster than 4-D advanced indexing)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).reshape(b, 1, h * w)  # [B, 1, H*W]
    flat = flat.to(x.device).expand(b, c, h * w)
    return src.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)
