"""Demucs adapter: fully quantized HTDemucs (Demucs 4) for music source separation.

The same shape as every toolkit adapter:

* :mod:`.wrappers` -- quantized wrappers of Demucs' modules, registered with the core on import;
* :mod:`.package` -- :func:`prepare_model`: the wrappers, both branches' inputs on split 8-bit tensors,
  both branches' outputs from combined 8-bit outputs; :class:`FQSSHTDemucs` and
  :func:`save_quantized_model`: Demucs' own package format, which ``demucs.pretrained.get_model``
  reloads; :func:`save_hub_folder`: the layout of Demucs' Hugging Face repositories (``get_model("hf://...")``);
  :func:`load_pretrained_htdemucs`: one HTDemucs from a package file or a model name.

* :mod:`.recipe` -- the training glue of the MUSDB18-HQ recipes: Demucs' datasets and augmentation, the L1
  loss with the FQSS distillation, validation and the museval test, for any model in Demucs' layout;
* :mod:`.export` -- the int8 ONNX export of a quantized HTDemucs (the network between STFT and iSTFT) and
  :class:`OrtHTDemucs`, which runs the file under ``demucs.apply.apply_model``; both registered with
  :mod:`fqss_plugin.export.registry` on import;
* :mod:`.audio_io` -- a soundfile backend for Demucs' own MUSDB18-HQ dataset code (``demucs.wav``).
"""
from . import export  # noqa: F401  (registers the exporter and the runtime of HTDemucs files)
from .export import OrtHTDemucs, export_htdemucs
from .package import FQSSHTDemucs, load_pretrained_htdemucs, prepare_model, save_hub_folder, save_quantized_model
from .wrappers import (QCrossTransformerEncoder, QCrossTransformerEncoderLayer, QDConv, QHDecLayer, QHEncLayer,
                       QHTDemucs, QLayerScale, QMyTransformerEncoderLayer)

__all__ = ["FQSSHTDemucs", "OrtHTDemucs", "export_htdemucs", "QCrossTransformerEncoder", "QCrossTransformerEncoderLayer", "QDConv", "QHDecLayer", "QHEncLayer",
           "QHTDemucs", "QLayerScale", "QMyTransformerEncoderLayer", "load_pretrained_htdemucs", "prepare_model",
           "save_hub_folder", "save_quantized_model"]
