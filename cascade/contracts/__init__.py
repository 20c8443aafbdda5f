"""The interfaces every cascade is made of, imported by every layer above.

- :mod:`~cascade.contracts.task`: Task, TaskLoss, Splits, Preprocessing, TaskOptions;
- :mod:`~cascade.contracts.stages`: StageOutput, Approximator, Oracle (white-box, black-box);
- :mod:`~cascade.contracts.methods`: the routing-method interface: Predictor, TrainedMethod,
  their contexts, RoutedSystem, MethodKind, and ``method_class`` (a registry lookup).
- :mod:`~cascade.contracts.loggers`: Logger, where training's curves go (TensorBoard, a
  user's own), and ``logger_class``.
"""
