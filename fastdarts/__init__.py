"""fastdarts: a fast DARTS (differentiable architecture search) for PyTorch.

Importing the package touches no GPU and compiles nothing.
"""

from fastdarts.errors import ConfigError, DataError, DivergedError, FastDartsError
from fastdarts.genotypes import (
    CNN_PRIMITIVES,
    RNN_PRIMITIVES,
    ConvGenotype,
    Genotype,
    RecurrentGenotype,
    load_genotype,
    save_genotype,
)
from fastdarts.ops.conv_mixed import MixedOp
from fastdarts.ops.recurrent_mixed import RecurrentMixedOp, recurrent_mixed
from fastdarts.spaces import ConvSearchModel, RNNSearchModel
from fastdarts.spaces.rnn import recurrent_mixed_reference

__version__ = "0.1.0"

__all__ = [
    "CNN_PRIMITIVES",
    "RNN_PRIMITIVES",
    "ConfigError",
    "ConvGenotype",
    "ConvSearchModel",
    "DataError",
    "DivergedError",
    "FastDartsError",
    "Genotype",
    "MixedOp",
    "RNNSearchModel",
    "RecurrentGenotype",
    "RecurrentMixedOp",
    "load_genotype",
    "recurrent_mixed",
    "recurrent_mixed_reference",
    "save_genotype",
]
