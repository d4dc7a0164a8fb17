"""Reference search spaces in plain PyTorch: the recurrent (PTB) and convolutional (CIFAR-10)."""

from fastdarts.spaces.base import Batch, MaskSpec, SearchModel, SearchOutput
from fastdarts.spaces.cnn import ConvSearchModel
from fastdarts.spaces.rnn import RNNSearchModel

__all__ = [
    "Batch",
    "ConvSearchModel",
    "MaskSpec",
    "RNNSearchModel",
    "SearchModel",
    "SearchOutput",
]
