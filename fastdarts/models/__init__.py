"""The discrete evaluation networks built from a genotype (trained from scratch)."""

from fastdarts.models.cnn import NetworkCIFAR
from fastdarts.models.rnn import RNNModel

__all__ = ["NetworkCIFAR", "RNNModel"]
