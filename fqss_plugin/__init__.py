"""fqss: fully quantized (8-bit weights and activations, input and output included) source separation.

The public API::

    QuantConfig, prepare, coverage_report, freeze, FQSSLoss, register,
    calibration_step, attach_calibration, parameter_groups
"""
from .loss import FQSSLoss
from .quant import (QuantConfig, attach_calibration, calibration_step, coverage_report, freeze, parameter_groups,
                    prepare, register)

__all__ = ["FQSSLoss", "QuantConfig", "attach_calibration", "calibration_step", "coverage_report", "freeze",
           "parameter_groups", "prepare", "register"]
__version__ = "0.1.0"
