"""Datasets: Penn Treebank for the recurrent search space, CIFAR-10 for the convolutional one."""

from .cifar import CIFAR10Split, augment, load_cifar10, normalize, search_split
from .ptb import Corpus, batchify, get_batch, load_ptb

__all__ = [
    "CIFAR10Split",
    "Corpus",
    "augment",
    "batchify",
    "get_batch",
    "load_cifar10",
    "load_ptb",
    "normalize",
    "search_split",
]
