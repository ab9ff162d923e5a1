"""Demucs adapter: fully quantized HTDemucs (Demucs 4) for music source separation.

The same shape as every toolkit adapter:

* :mod:`.wrappers` -- quantized wrappers of Demucs' modules, registered with the core on import;
* :mod:`.package` -- :func:`prepare_model`: the wrappers, both branches' inputs on split 8-bit tensors,
  both branches' outputs from combined 8-bit outputs.

To come in the same shape: the training glue (a Demucs solver step with the FQSS loss), Demucs' package
loading (``demucs.pretrained.get_model``) and the export rewrites.
"""
from .package import prepare_model
from .wrappers import (QCrossTransformerEncoder, QCrossTransformerEncoderLayer, QDConv, QHDecLayer, QHEncLayer,
                       QHTDemucs, QLayerScale, QMyTransformerEncoderLayer)

__all__ = ["QCrossTransformerEncoder", "QCrossTransformerEncoderLayer", "QDConv", "QHDecLayer", "QHEncLayer",
           "QHTDemucs", "QLayerScale", "QMyTransformerEncoderLayer", "prepare_model"]
