"""The one cache of trained networks: the big network and the pre-trained stages, kept
by what decides them (:class:`CacheSlot`), so that runs differing only downstream reuse them.

An entry (``{"model", "steps", "history"}``: the weights, the phase's steps and its loss
history) is kept on disk in a :class:`~cascade.training.checkpoint.NetworkCache` when the
config's ``big_cache`` / ``pretrain_cache`` is on, and in memory for the runs of one
process that share a :class:`PhaseCache` ``memory`` (an ablation). An on-disk hit is
loaded into the phase's trainer as if it had trained, so the run records the same
steps and losses; an in-memory hit only loads the weights: the phase is not run
(nor logged, nor in ``metrics.json``'s ``training``), as the process already ran it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from cascade.config.schema import NetworkSpec, OptimConfig
from cascade.core.errors import CheckpointError
from cascade.engine.plan import Plan
from cascade.training import distributed
from cascade.training.checkpoint import NetworkCache

log = logging.getLogger(__name__)


class CacheSlot(NamedTuple):
    """Where a training phase's network is kept."""

    what: str  # the network, in messages: "seed 0 big"
    label: str  # starts the file name: "big-resnet101_cifar"
    key: dict[str, Any]  # everything that decides the trained network
    disk: bool  # kept in the on-disk cache too (the config's big_cache / pretrain_cache)


def cache_slot(plan: Plan, what: str, label: str, seed: int, spec: NetworkSpec, oc: OptimConfig,
               disk: bool = True, **extra: Any) -> CacheSlot:
    """The slot of a phase.

    The key holds what decides the trained network: the task's options, the
    perturbations of the training data, the network, the phase's settings, the seed
    and the training settings that change its numbers (device type, amp,
    channels-last). Not the number of processes (torchrun: the same global batches,
    so the same network but for rounding and batch-norm statistics; a big network
    trained on 8 GPUs serves runs on one), the torch version, nor the data files'
    contents: a task reading other data under the same options must change them.
    """
    cfg = plan.cfg
    perturb = {k: v for k, v in cfg.perturb.model_dump(mode="json").items() if k != "shift"}  # shift: cal/test only
    key = {"network": label, "task": cfg.task.model_dump(mode="json"), "perturb": perturb,
           "spec": spec.model_dump(mode="json"), "train": oc.model_dump(mode="json"), "seed": seed,
           "device": plan.device.type, "amp": str(plan.amp), "channels_last": plan.channels_last, **extra}
    return CacheSlot(what, f"{label}-{spec.name}", key, disk)


class PhaseCache:
    """The network cache of one run: on disk (``disk``) and in memory (``memory``), either may be None.

    Args:
        disk: the on-disk cache, or None (``big_cache`` and ``pretrain_cache`` off).
        memory: entries shared by the runs of one process, by key, or None.
    """

    def __init__(self, disk: NetworkCache | None, memory: dict[str, dict] | None):
        self.disk = disk
        self.memory = memory

    def recall(self, slot: CacheSlot) -> dict | None:
        """The weights of ``slot`` this process trained or loaded before, or None."""
        return self.memory.get(_text(slot.key)) if self.memory is not None else None

    def lookup(self, slot: CacheSlot, model: nn.Module) -> tuple[Path, dict] | None:
        """``(file, entry)`` of ``slot`` in the on-disk cache, or None."""
        if not (slot.disk and self.disk is not None):
            return None
        return self._disk_lookup(slot, model)

    def _disk_lookup(self, slot: CacheSlot, model: nn.Module) -> tuple[Path, dict] | None:
        """Rank 0 decides for every rank (a rank that trained while another loaded would wait for it forever)."""
        found = self.disk.load(slot.key, slot.label) if distributed.is_main() else None
        if found is not None:
            differences = NetworkCache.fits(found[1], model)
            if differences:
                log.warning("network cache: %s does not fit %s (%s); training instead, and replacing it",
                            found[0], slot.what, differences)
                found = None
        path = distributed.broadcast(str(found[0]) if found is not None else None)
        if path is not None and found is None:  # another rank: read what rank 0 found
            found = self.disk.load(slot.key, slot.label)
            if found is None:
                raise CheckpointError(f"{path}: rank {distributed.rank()} cannot read the cached network rank 0 read")
        return found

    def remember(self, slot: CacheSlot, model: nn.Module) -> None:
        """Keep ``model``'s weights in memory for the next runs of this process."""
        if self.memory is not None:
            self.memory[_text(slot.key)] = copy.deepcopy(model.state_dict())

    def store(self, slot: CacheSlot, model: nn.Module, steps: int, history: dict) -> None:
        """Keep the network ``slot`` trained in the on-disk cache (when it has a place there)."""
        if slot.disk and self.disk is not None and distributed.is_main():
            path = self.disk.save(slot.key, slot.label, model.state_dict(), {"steps": steps, "history": history})
            log.info("%s network: saved to cache %s", slot.what, path)


def _text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)
