"""Routing methods: how a cascade decides, after each stage, whether to answer or go on.

A method is one module (in ``cascade/``, ``baselines/`` or a user's own package, named
by dotted path) that registers one class in :data:`~cascade.core.registry.METHODS`:

- **post-hoc** (:class:`~cascade.contracts.methods.Predictor`): scores a trained stage (MSP, Gap,
  MC dropout...). The pipeline gives it the *plain* stages, fine-tuned as long as any
  trained method, one instance per stage.
- **trained** (:class:`~cascade.contracts.methods.TrainedMethod`): trains networks of its own
  from the pre-trained stages (AppealNet's predictor heads, a REINFORCE stopping policy) and
  returns one or more :class:`~cascade.contracts.methods.RoutedSystem`.

The interfaces are in :mod:`cascade.contracts.methods`; :mod:`cascade.methods.catalogue`
builds a run's methods from its config; ``appealnet/`` and ``reinforce/`` are the built-in
trained methods. The pipeline, the evaluator and the reports only see the interfaces: none
of them names a particular method. This package re-exports the interfaces and the catalogue.
"""

from cascade.contracts.methods import (
    CascadeContext,
    MethodKind,
    RoutedSystem,
    TrainedMethod,
    method_class,
    method_kind,
)
from cascade.methods.catalogue import (
    MethodEntry,
    build_methods,
    method_problems,
    scorer_key,
)

__all__ = [
    "CascadeContext",
    "MethodEntry",
    "MethodKind",
    "RoutedSystem",
    "TrainedMethod",
    "build_methods",
    "method_class",
    "method_kind",
    "method_problems",
    "scorer_key",
]
