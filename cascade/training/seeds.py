"""Per-phase seeds: where each training phase's random numbers start.

Every phase of a run draws its data order from :func:`phase_seed`, and the big network
and the pre-trained stages are built and trained under :func:`seeded_rng`, so that a
phase depends on its own settings and seed alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: where each training phase's random numbers start, per seed (see :func:`phase_seed`)
_PHASE_OFFSETS = {"big": 1, "pretrain": 2, "plain": 3, "big_init": 4, "pretrain_init": 5, "trained": 10,
                  "post_hoc": 50}


def phase_seed(seed: int, phase: str, index: int = 0, stage: int = 0) -> int:
    """The seed of one training phase's data order: distinct per phase, stage and index.

    Args:
        seed: the run's seed.
        phase: ``big``, ``pretrain``, ``plain``, ``trained`` (index: the method's position
            among the trained jobs) or ``post_hoc``; ``big_init`` and ``pretrain_init``:
            torch's global generator while the big network or a routed stage is built and
            trained (see :func:`seeded_rng`).
        index: which one of several phases of that kind.
        stage: the routed stage it trains.
    """
    return seed * 100 + _PHASE_OFFSETS[phase] + index + 1000 * stage


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on torch's global generator (and ``device``'s, on CUDA) seeded with
    ``seed``, then put them back as they were.

    The big network and the pre-trained stages are built and trained in such a block, so
    that they depend on their own settings and seed alone (a network loaded from the
    cache is the one training would give) and what follows draws the same random numbers
    whether they were trained or loaded.
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield
