"""SpeechBrain adapter: a fully quantized SepFormer (and the dual-path family) in SpeechBrain recipes.

One module per job, the same shape as every toolkit adapter:

* :mod:`.wrappers` -- quantized wrappers of SpeechBrain's modules, registered with the core on import;
* :mod:`.hparams` -- :func:`quantize_inplace` for the recipe yaml
  (``!apply:fqss_plugin.speechbrain.quantize_inplace [!ref <modules>, !ref <fqss>]``, which returns the
  float teacher) and the ``Pretrainer`` transfer hook that loads float or quantized checkpoints;
* :mod:`.brain` -- :func:`fqss_brain` / :class:`FQSSBrainMixin`: a recipe's own separation ``Brain``
  for QAT with distillation;
* :mod:`.package` -- inference packages that ``SepformerSeparation.from_hparams`` reloads, and
  :class:`SepformerWaveform` (the SepFormer as one ``[B, T] -> [B, n_src, T]`` module);
* :mod:`.export` -- the package loader of ``fqss export``, registered with
  :mod:`fqss_plugin.export.registry` on import.
"""
from . import export  # noqa: F401  (registers the package loader)
from ..quant.state import is_quantized, reset_quantizers
from .brain import FQSSBrainMixin, fqss_brain
from .hparams import MODULE_KEYS, quantize_inplace, transfer_into_quantized
from .package import (QuantizedSepformerSeparation, SepformerWaveform, load_quantized_separator, prepare_waveform,
                      save_pretrained_separator, separate_sources)
from .wrappers import (QDual_Path_Model, QDualComputationBlock, QSBCumulativeLayerNorm, QSBDecoder, QSBEncoder,
                       QSBGlobalLayerNorm, QSBPositionalEncoding, QSBTransformerBlock, QTransformerEncoderLayer)

__all__ = ["FQSSBrainMixin", "MODULE_KEYS", "QDual_Path_Model", "QDualComputationBlock", "QSBCumulativeLayerNorm",
           "QSBDecoder", "QSBEncoder", "QSBGlobalLayerNorm", "QSBPositionalEncoding", "QSBTransformerBlock",
           "QTransformerEncoderLayer", "QuantizedSepformerSeparation", "SepformerWaveform", "is_quantized",
           "load_quantized_separator", "prepare_waveform", "quantize_inplace", "reset_quantizers",
           "save_pretrained_separator", "separate_sources", "transfer_into_quantized", "fqss_brain"]
