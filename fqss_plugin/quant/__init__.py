"""The toolkit-agnostic quantization core: quantizers, wrappers, signal splitter/combiner, prepare."""
from .attention import QMultiheadAttention
from .calibration import attach_calibration, calibration_step, is_calibrating
from .config import QuantConfig
from .coverage import CoverageReport, coverage_report
from .layers import Add, Concat, Mul, QAdd, QConcat, QMul, QuantizedLayer, QuantizedModule
from .optim import parameter_groups, quantizer_parameters
from .prepare import freeze, prepare
from .quantizers import ActivationQuantizer, WeightQuantizer
from .recurrent import QLSTM
from .registry import register
from .signal_io import InputSplitter, OutputCombiner, SplitActivationQuantizer
from .state import is_quantized, reset_quantizers

__all__ = [
    "ActivationQuantizer", "Add", "Concat", "Mul", "CoverageReport", "InputSplitter", "OutputCombiner", "QAdd", "QConcat",
    "QLSTM", "QMul", "QMultiheadAttention",
    "QuantConfig", "QuantizedLayer", "QuantizedModule", "SplitActivationQuantizer", "WeightQuantizer", "attach_calibration",
    "calibration_step", "coverage_report", "freeze", "is_calibrating", "is_quantized", "parameter_groups", "prepare",
    "quantizer_parameters", "register", "reset_quantizers",
]
