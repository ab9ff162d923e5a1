"""What to quantize and how: one small dataclass shared by every toolkit adapter."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


@dataclass
class QuantConfig:
    """Quantization settings for :func:`fqss_plugin.prepare`.

    Attributes:
        weight_bits: bits of every weight (symmetric, per output channel). 7 by default: weight codes in
            ``-64..63`` keep every integer Conv/MatMul exact on x86 CPUs without VNNI, whose u8 x s8
            kernels add pairs of products in a saturating int16 (``255 * (64 + 64) <= 32767``;
            :mod:`fqss_plugin.export.saturation`). QAT learns under the constraint (measured cost:
            none, BENCHMARKS.md "Int8 on every CPU"). 8: the full int8 range, which such CPUs get wrong
            (exported as uint8 weights by default, or for VNNI CPUs only with ``to_onnx(target="vnni")``).
        act_bits: bits of every activation (asymmetric, per tensor).
        in_splits: number of ``act_bits`` signals the network input is split into
            (MSB + residuals, :class:`~fqss_plugin.quant.signal_io.InputSplitter`); 1 means a single
            learned input quantizer (vanilla QAT).
        out_splits: number of ``act_bits`` outputs the network output is recombined from
            (:class:`~fqss_plugin.quant.signal_io.OutputCombiner`); 1 means a single output quantizer.
        decoder_in_splits: number of ``act_bits`` tensors the decoder's *input* is carried by
            (:class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`; the decoder runs once per
            tensor). It applies to decoders that quantize their own input, a product computed outside
            any module such as the mask product of Asteroid's and SpeechBrain's decoders; the output
            of a linear decoder is no more precise than its input. 1: one 8-bit tensor.
        encoder_out_splits: number of ``act_bits`` tensors the encoder's *output* (the mixture's
            representation, which the masker reads and the mask multiplies) is carried by; 1: one.
        normalize_input: divide each example by its peak before splitting and multiply the output
            back (only used with ``in_splits > 1``).
        calib_steps: optimizer steps during which activation ranges are calibrated from data
            before they are learned.
        calib_method: ``"ema"`` (running min/max) or ``"mse"`` (MSE-optimal clipping per batch).
        ema_momentum: weight of the past in the running min/max.
        learn_ranges: train steps and zero points after calibration (LSQ+); False keeps them fixed.
        quantizer_lr: learning rate of the quantizers' (log-)steps and zero points, given to the
            optimizer by :func:`~fqss_plugin.quant.parameter_groups`; ``None``: the optimizer's own.
        weight_init: where weight steps start (:class:`~fqss_plugin.quant.quantizers.WeightQuantizer`):
            ``"mse"``, per channel at the clipping with the least quantization error, or ``"max"``, at the
            channel's largest weight.
        exclude: names of modules (as in ``named_modules``) to leave in float.
        layer_weight_bits: per-layer weight bits, ``{module name: bits}`` (names as in ``named_modules`` of the
            model given to :func:`~fqss_plugin.prepare`; a name also covers the modules inside it): mixed
            precision, e.g. ``{"masker.TCN.3": 4}``. Layers not named take ``weight_bits``.
        layer_act_splits: ``{module name: n}``: every output activation inside the named modules is carried by
            ``n`` ``act_bits`` tensors (:class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`: the first
            quantized on its learned range, the others its stretched residuals), i.e. ``n·act_bits`` bits of
            precision on the same range. For a branch whose activations spread over a wide range, such as
            HTDemucs' frequency branch, where one 8-bit grid either clips the tails or rounds the bulk coarsely.
            A consumer's integer op then runs once per tensor. Layers with an output combiner keep it.
    """

    weight_bits: int = 7
    act_bits: int = 8
    in_splits: int = 2
    out_splits: int = 2
    decoder_in_splits: int = 1
    encoder_out_splits: int = 1
    normalize_input: bool = True
    calib_steps: int = 100
    calib_method: str = "ema"
    ema_momentum: float = 0.9
    learn_ranges: bool = True
    quantizer_lr: float | None = 1e-2
    weight_init: str = "mse"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    layer_weight_bits: dict[str, int] = field(default_factory=dict)
    layer_act_splits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 2 <= value <= 16:
                raise ValueError(f"QuantConfig.{name} must be an integer in 2..16, got {value!r}")
        for name in ("in_splits", "out_splits", "decoder_in_splits", "encoder_out_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 4:
                raise ValueError(f"QuantConfig.{name} must be an integer in 1..4, got {value!r}")
        if not isinstance(self.calib_steps, int) or self.calib_steps < 0:
            raise ValueError(f"QuantConfig.calib_steps must be a non-negative integer, got {self.calib_steps!r}")
        if self.calib_method not in ("ema", "mse"):
            raise ValueError(f"QuantConfig.calib_method must be 'ema' or 'mse', got {self.calib_method!r}")
        if self.weight_init not in ("mse", "max"):
            raise ValueError(f"QuantConfig.weight_init must be 'mse' or 'max', got {self.weight_init!r}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"QuantConfig.ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
        if self.quantizer_lr is not None and not (isinstance(self.quantizer_lr, (int, float)) and self.quantizer_lr > 0):
            raise ValueError(f"QuantConfig.quantizer_lr must be a positive number or None, got {self.quantizer_lr!r}")
        self.exclude = tuple(self.exclude)
        self.layer_weight_bits = dict(self.layer_weight_bits)
        bad = {k: v for k, v in self.layer_weight_bits.items() if not isinstance(v, int) or not 2 <= v <= 16}
        if bad:
            raise ValueError(f"QuantConfig.layer_weight_bits: bits must be integers in 2..16, got {bad}")
        self.layer_act_splits = dict(self.layer_act_splits)
        bad = {k: v for k, v in self.layer_act_splits.items() if not isinstance(v, int) or not 1 <= v <= 4}
        if bad:
            raise ValueError(f"QuantConfig.layer_act_splits: splits must be integers in 1..4, got {bad}")

    def act_splits_of(self, name: str) -> int:
        """The number of tensors carrying the output activations of module ``name``: the entry of
        ``layer_act_splits`` that owns it (:func:`owner`), else 1."""
        key = owner(self.layer_act_splits, name)
        return 1 if key is None else self.layer_act_splits[key]

    def for_module(self, name: str) -> QuantConfig:
        """This config with the ``weight_bits`` of module ``name`` (the entry of ``layer_weight_bits`` that owns
        it, :func:`owner`); ``self`` when none applies."""
        key = owner(self.layer_weight_bits, name)
        return self if key is None else replace(self, weight_bits=self.layer_weight_bits[key], layer_weight_bits={})

    @classmethod
    def fqss(cls, **overrides) -> QuantConfig:
        """The FQSS method: 8-bit activations and weights (7-bit weight codes in int8, exact on every CPU), input split into 2 x 8-bit signals, output from 2 x 8-bit outputs, and
        (beyond the paper) the two operands of the mask product, the encoder's output, and the
        decoder's input, the product, on 2 x 8-bit tensors."""
        return cls(**{"in_splits": 2, "out_splits": 2, "decoder_in_splits": 2, "encoder_out_splits": 2, **overrides})

    @classmethod
    def vanilla(cls, **overrides) -> QuantConfig:
        """Vanilla QAT baseline: 8-bit activations and weights (the same 7-bit weight codes) with a single 8-bit
        input and output quantizer."""
        return cls(**{"in_splits": 1, "out_splits": 1, "normalize_input": False, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def inside(name: str, key: str) -> bool:
    """Whether module ``name`` is module ``key`` or lies inside it (names as in ``named_modules``)."""
    return name == key or name.startswith(key + ".")


def owner(keys, name: str) -> str | None:
    """The most specific of ``keys`` (module names) that module ``name`` lies inside, or None: per-layer
    settings for ``encoder`` and ``encoder.0`` give ``encoder.0.conv`` the latter's."""
    owners = [key for key in keys if inside(name, key)]
    return max(owners, key=len) if owners else None


def read_layer_weight_bits(path: str | None) -> dict[str, int]:
    """A per-layer weight-bits map from a JSON or YAML file ``{module name: bits}`` (as ``fqss analyze
    --weight-budget`` writes it), for ``QuantConfig(layer_weight_bits=...)``; ``{}`` for no file.
    ``ValueError`` for an unreadable file or another structure."""
    if not path:
        return {}
    import yaml
    try:
        bits = yaml.safe_load(Path(path).read_text())           # JSON is YAML
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"not a readable JSON/YAML file ({error})") from None
    if not isinstance(bits, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in bits.items()):
        raise ValueError("expected a mapping {module name: bits}")
    return bits
