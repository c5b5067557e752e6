"""rnnext: fused C++/CUDA recurrent layers, drop-in replacements for torch.nn's RNN, GRU, LSTM."""

from . import functional, pooling, reference
from .modules import GRU, LSTM, RNN, convert, revert
from .pooling import AttentionPooling, SequenceClassifier
from .streaming import TruncatedBPTT

__all__ = [
    "RNN",
    "GRU",
    "LSTM",
    "TruncatedBPTT",
    "SequenceClassifier",
    "AttentionPooling",
    "convert",
    "revert",
    "functional",
    "pooling",
    "reference",
]
__version__ = "0.1.0"
