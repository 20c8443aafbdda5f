"""Concrete tasks and networks; importing this package registers them."""

from tasks import networks  # noqa: F401  (registers the networks)
from tasks.digits import DigitsTask
from tasks.keypoints import KeypointTask
from tasks.mnist import MnistTask

__all__ = ["DigitsTask", "KeypointTask", "MnistTask"]
