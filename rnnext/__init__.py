"""rnnext: fused C++/CUDA recurrent layers, drop-in replacements for torch.nn's RNN, GRU, LSTM."""

from . import functional, reference
from .modules import GRU, LSTM, RNN

__all__ = ["RNN", "GRU", "LSTM", "functional", "reference"]
__version__ = "0.1.0"
