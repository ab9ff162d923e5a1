"""Demucs adapter: fully quantized HTDemucs (Demucs 4) for music source separation.

The same shape as every toolkit adapter:

* :mod:`.wrappers` -- quantized wrappers of Demucs' modules, registered with the core on import;
* :mod:`.package` -- :func:`prepare_model` (both branches' inputs and outputs).
"""
from .package import prepare_model
from .wrappers import (QCrossTransformerEncoder, QCrossTransformerEncoderLayer, QDConv, QHDecLayer, QHEncLayer,
                       QHTDemucs, QLayerScale, QMyTransformerEncoderLayer)

__all__ = ["QCrossTransformerEncoder", "QCrossTransformerEncoderLayer", "QDConv", "QHDecLayer", "QHEncLayer",
           "QHTDemucs", "QLayerScale", "QMyTransformerEncoderLayer", "prepare_model"]
