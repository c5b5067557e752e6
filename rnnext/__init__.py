"""rnnext: fused C++/CUDA recurrent layers, drop-in replacements for torch.nn's RNN, GRU, LSTM."""

from . import functional, reference
from .modules import GRU, LSTM, RNN, convert, revert
from .streaming import TruncatedBPTT

__all__ = [
    "RNN",
    "GRU",
    "LSTM",
    "TruncatedBPTT",
    "convert",
    "revert",
    "functional",
    "reference",
]
__version__ = "0.1.0"
