"""Asteroid adapter: FQSS quantization-aware training of Asteroid separators (ConvTasNet, DPTNet, ...).

One module per job, the same shape as every toolkit adapter:

* :mod:`.wrappers` -- quantized wrappers of Asteroid's modules, registered with the core on import;
* :mod:`.stereo` -- :class:`StereoConvTasNet`, the music ConvTasNet (multichannel, Demucs' tensor layout) from
  Asteroid's parts;
* :mod:`.system` -- :class:`FQSSSystem`, the Asteroid ``System`` of QAT with distillation;
* :mod:`.package` -- :func:`prepare_model` and the quantized model classes registered with Asteroid
  (``FQSSConvTasNet``, ``FQSSDPTNet``: ``ConvTasNet.from_pretrained`` rebuilds a quantized package);
  :func:`prepare_qat` (float weights, teacher, quantization: the start of a QAT recipe); loading a float
  teacher (file, directory or hub id), saving and loading a quantized model;
* :mod:`.export` -- the export rewrites of Asteroid's modules and the package loader of ``fqss
  export``, registered with :mod:`fqss_plugin.export.registry` on import;
* :mod:`.recipe` -- the building blocks of the LibriMix recipes (conf, data, trainer, evaluation).
"""
from . import export  # noqa: F401  (registers the export rewrites and the package loader)
from .package import (PACKAGE_FILES, load_float_model, load_quantized_model, prepare_model, prepare_qat,
                      quantized_class, resolve_package, save_quantized_model)
from .stereo import StereoConvTasNet
from .system import FQSSSystem
from .wrappers import (QChanLN, QDPTransformer, QFilterbankDecoder, QFilterbankEncoder, QGlobLN,
                       QImprovedTransformedLayer, QTDConvNet)

__all__ = ["FQSSSystem", "PACKAGE_FILES", "QChanLN", "QDPTransformer", "QFilterbankDecoder", "QFilterbankEncoder",
           "QGlobLN", "QImprovedTransformedLayer", "QTDConvNet", "StereoConvTasNet", "load_float_model", "load_quantized_model",
           "prepare_model", "prepare_qat", "quantized_class", "resolve_package", "save_quantized_model"]
