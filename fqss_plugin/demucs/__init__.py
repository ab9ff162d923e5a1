"""Demucs adapter: fully quantized HTDemucs (Demucs 4) for music source separation.

The same shape as every toolkit adapter:

* :mod:`.wrappers` -- quantized wrappers of Demucs' modules, registered with the core on import;
* :mod:`.package` -- :func:`prepare_model`: the wrappers, both branches' inputs on split 8-bit tensors,
  both branches' outputs from combined 8-bit outputs; :class:`FQSSHTDemucs` and
  :func:`save_quantized_model`: Demucs' own package format, which ``demucs.pretrained.get_model``
  reloads.

* :mod:`.audio_io` -- a soundfile backend for Demucs' own MUSDB18-HQ dataset code (``demucs.wav``).

To come in the same shape: the training glue (a Demucs solver step with the FQSS loss) and the export
rewrites.
"""
from .package import FQSSHTDemucs, prepare_model, save_quantized_model
from .wrappers import (QCrossTransformerEncoder, QCrossTransformerEncoderLayer, QDConv, QHDecLayer, QHEncLayer,
                       QHTDemucs, QLayerScale, QMyTransformerEncoderLayer)

__all__ = ["FQSSHTDemucs", "QCrossTransformerEncoder", "QCrossTransformerEncoderLayer", "QDConv", "QHDecLayer", "QHEncLayer",
           "QHTDemucs", "QLayerScale", "QMyTransformerEncoderLayer", "prepare_model", "save_quantized_model"]
