"""Concrete tasks and networks; importing this package registers them."""

from tasks import cifar_networks, networks  # noqa: F401  (registers the networks)
from tasks.cifar10 import Cifar10Task
from tasks.digits import DigitsTask
from tasks.image_folder import ImageFolderTask
from tasks.keypoints import KeypointTask
from tasks.mnist import MnistTask

__all__ = ["Cifar10Task", "DigitsTask", "ImageFolderTask", "KeypointTask", "MnistTask"]
