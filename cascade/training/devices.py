"""The device a run trains on and the settings resolved for it: autocast, channels-last,
and whether the training data moves to the GPU."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from cascade.core.errors import CascadeError
from cascade.training.data import tensors_of


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CascadeError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the config's ``amp`` on ``device``, or None (full precision).

    Raises:
        CascadeError: ``bf16`` on a GPU without bfloat16.
    """
    if setting == "off":
        return None
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if device.type == "cuda" and not bf16_gpu:
        raise CascadeError("amp: bf16: this GPU has no bfloat16 support; set amp: off")
    return torch.bfloat16


def resolve_channels_last(setting: str | bool, device: torch.device, input_shape: tuple[int, ...]) -> bool:
    """Whether the config's ``channels_last`` is on for ``device`` and inputs of ``input_shape``.

    Raises:
        CascadeError: ``true`` for inputs that are not images ``[C, H, W]``.
    """
    if setting == "auto":
        return device.type == "cuda" and len(input_shape) == 3
    if setting and len(input_shape) != 3:
        raise CascadeError(f"channels_last: true needs image inputs [C, H, W]; the task's are {list(input_shape)}")
    return bool(setting)


#: ``data_on_device: auto`` moves training data to the GPU when it takes at most this
#: fraction of the free GPU memory
DEVICE_DATA_FRACTION = 0.25


def data_on_device(dataset: Dataset, device: torch.device, setting: str | bool) -> Dataset:
    """``dataset`` with its tensors on ``device`` (a GPU), so that batches are indexed there
    with no host copy; ``dataset`` itself on the CPU, for data not held in memory, when
    ``setting`` is false, or (``auto``) when it would take more than
    :data:`DEVICE_DATA_FRACTION` of the free GPU memory."""
    if device.type != "cuda" or setting is False:
        return dataset
    tensors = tensors_of(dataset)
    if tensors is None:
        return dataset
    if setting == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if sum(t.numel() * t.element_size() for t in tensors) > DEVICE_DATA_FRACTION * free:
            return dataset
    return TensorDataset(*(t.to(device) for t in tensors))

