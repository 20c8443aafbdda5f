"""The random number generators training draws from, read and restored as plain data.

A training checkpoint holds them (:meth:`~cascade.training.trainer.Trainer.state_dict`),
so that a resumed phase draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cascade.core.errors import CheckpointError


def loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The torch generators a data loader draws from (its own and its samplers'), in a fixed order."""
    found: list[torch.Generator] = []
    pending: list[Any] = [loader.generator, loader.sampler, loader.batch_sampler]
    while pending:
        obj = pending.pop(0)
        if isinstance(obj, torch.Generator):
            if not any(obj is g for g in found):
                found.append(obj)
        elif obj is not None:  # a sampler: it may hold a generator, or wrap another sampler
            pending += [getattr(obj, "generator", None), getattr(obj, "sampler", None)]
    return found


def rng_state(generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
    """The state of torch's, NumPy's and Python's global RNGs and of ``generators``, as
    plain data and tensors (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # don't start CUDA just to read it
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: Sequence[torch.Generator] = ()) -> None:
    """Restore what :func:`rng_state` returned.

    Raises:
        CheckpointError: the state has a different number of loader generators.
    """
    if len(state["generators"]) != len(generators):
        raise CheckpointError(f"the checkpoint has {len(state['generators'])} data-loader generators, "
                              f"the loader {len(generators)}")
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
