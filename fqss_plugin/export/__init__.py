"""Int8 deployment: export a trained fqss separator to ONNX QDQ and run it with onnxruntime.

::

    from fqss_plugin.export import to_onnx, OrtSeparator
    to_onnx(model, "model.onnx")                  # freeze + export + deploy passes + onnx.checker
    estimates = OrtSeparator("model.onnx", threads=1).separate(mixture)

* :func:`to_onnx` -- :mod:`.export`; the torch-side rewrites are in :mod:`.view`, the ONNX
  passes in :mod:`.passes`, the QLSTM time loops (as ONNX ``Loop``) in :mod:`.recurrent`. Asteroid
  encoder-masker-decoder models (ConvTasNet, DPTNet) export as they are; a SpeechBrain SepFormer as a
  :class:`fqss_plugin.speechbrain.SepformerWaveform`.
* :class:`OrtSeparator`, :func:`ort_op_report` (which ops onnxruntime runs in integer and which in
  float), :func:`parity_report` (torch vs onnxruntime, end to end and per quantizer) -- :mod:`.runtime`.
* Command line: ``fqss export`` and ``fqss separate`` (:mod:`.cli`).
"""
from .export import ExportResult, load_export_settings, to_onnx
from .runtime import OpReport, OrtSeparator, ParityReport, QuantizerParity, ort_op_report, parity_report
from .view import ExportError, export_view

__all__ = ["ExportError", "ExportResult", "OpReport", "OrtSeparator", "ParityReport", "QuantizerParity",
           "export_view", "load_export_settings", "ort_op_report", "parity_report", "to_onnx"]
