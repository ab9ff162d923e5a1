"""Asteroid adapter: quantized wrappers for Asteroid's own modules.

Importing this module registers wrappers so that :func:`fqss_plugin.prepare` fully covers
Asteroid's ``ConvTasNet`` and ``DPTNet`` (and every ``BaseEncoderMaskerDecoder`` built from the
same parts):

* the filterbank ``Encoder``/``Decoder`` of ``asteroid_filterbanks`` (an ``F.conv1d`` /
  ``F.conv_transpose1d`` on the filterbank's parameter): quantized filters, input splitter on the
  encoder, output combiner on the decoder. The decoder also quantizes its *input*: that is the
  output of the model's mask multiplication (``est_masks * tf_rep``), which has no module;
* ``GlobLN`` / ``ChanLN``: output quantized, statistics and affine in float like ``GroupNorm``;
* ``TDConvNet``: the residual and skip-connection sums of its forward pass become ``QAdd``;
* DPTNet's ``ImprovedTransformedLayer`` (its two residual sums) and ``DPTransformer`` (the
  overlap-add ``fold`` and the ``tanh x sigmoid`` gate); attention and LSTM internals are quantized
  by the core's ``QMultiheadAttention`` and ``QLSTM``.

Use :func:`prepare_model` (``prepare`` with the encoder/decoder names of Asteroid models).
"""
from __future__ import annotations

from pathlib import Path

import torch
from asteroid import models as asteroid_models
from asteroid.engine.system import System
from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
from asteroid.masknn.attention import DPTransformer, ImprovedTransformedLayer
from asteroid.masknn.convolutional import TDConvNet
from asteroid.masknn.norms import ChanLN, GlobLN
from asteroid_filterbanks.enc_dec import Decoder, Encoder, multishape_conv1d, multishape_conv_transpose1d
from asteroid.models.base_models import BaseModel
from asteroid.utils.hub_utils import cached_download
from torch import nn
from torch.torch_version import TorchVersion

from .atomic import atomic_path
from .loss import FQSSLoss
from .quant import QuantConfig, calibration_step, freeze, prepare, register
from .quant.layers import (NORM_INTERNALS, Add, Mul, OutputQuantized, QAdd, QMul, QuantizedLayer, QuantizedModule,
                           activation_quantizer)


class QGlobLN(OutputQuantized, GlobLN):
    """Asteroid's global layer norm with a quantized output."""

    float_internals = NORM_INTERNALS


class QChanLN(OutputQuantized, ChanLN):
    """Asteroid's channel-wise layer norm with a quantized output."""

    float_internals = NORM_INTERNALS


class QFilterbankEncoder(QuantizedLayer, Encoder):
    """Filterbank analysis ``conv1d(x, filters)`` with quantized filters (``weight`` = the filters)."""

    bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.get_filters()

    def linear_op(self, x, weight, bias):
        spec = multishape_conv1d(self.filterbank.pre_analysis(x), filters=weight, stride=self.stride,
                                 padding=self.padding, as_conv1d=self.as_conv1d)
        return self.filterbank.post_analysis(spec)


class QFilterbankDecoder(QuantizedLayer, Decoder):
    """Filterbank synthesis (overlap-add) with quantized filters and a quantized input.

    The input quantizer puts the masked representation (the model's mask product) on a grid.
    """

    bias = None
    weight_axis = 1

    def _init_quantization(self, config: QuantConfig) -> None:
        super()._init_quantization(config)
        self.input_quantizer = activation_quantizer(config)

    @property
    def weight(self) -> torch.Tensor:
        return self.get_filters()

    def linear_op(self, x, weight, bias):
        wav = multishape_conv_transpose1d(self.filterbank.pre_synthesis(x), weight, stride=self.stride,
                                          padding=self.padding, output_padding=self.output_padding)
        return self.filterbank.post_synthesis(wav)

    def forward(self, spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
        wav = QuantizedLayer.forward(self, spec)
        return wav if length is None else wav[..., :min(length, wav.shape[-1])]


class QTDConvNet(QuantizedModule, TDConvNet):
    """ConvTasNet's temporal conv net with quantized residual and skip-connection sums."""

    def _init_quantization(self, config: QuantConfig) -> None:
        blocks = len(self.TCN)
        self.residual_adds = nn.ModuleList(QAdd.convert_(Add(), config) for _ in range(blocks))
        self.skip_adds = nn.ModuleList(QAdd.convert_(Add(), config) for _ in range(blocks - 1)) \
            if self.skip_chan else None

    def forward(self, mixture_w: torch.Tensor) -> torch.Tensor:
        batch, _, n_frames = mixture_w.size()
        output = self.bottleneck(mixture_w)
        skip_connection = None
        for i, layer in enumerate(self.TCN):
            tcn_out = layer(output)
            if self.skip_chan:
                residual, skip = tcn_out
                skip_connection = skip if skip_connection is None else self.skip_adds[i - 1](skip_connection, skip)
            else:
                residual = tcn_out
            output = self.residual_adds[i](output, residual)
        score = self.mask_net(skip_connection if self.skip_chan else output)
        score = score.view(batch, self.n_src, self.out_chan, n_frames)
        return self.output_act(score)


class QImprovedTransformedLayer(QuantizedModule, ImprovedTransformedLayer):
    """DPTNet's transformer layer (attention, then a BiLSTM feed-forward) with quantized residual sums.

    Attention and LSTM are :class:`~fqss_plugin.quant.QMultiheadAttention` /
    :class:`~fqss_plugin.quant.QLSTM` through the registry; this wrapper adds the two sums.
    """

    def _init_quantization(self, config: QuantConfig) -> None:
        self.attention_residual = QAdd.convert_(Add(), config)
        self.feedforward_residual = QAdd.convert_(Add(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tomha = x.permute(2, 0, 1)
        out = self.mha(tomha, tomha, tomha)[0]
        x = self.norm_mha(self.attention_residual(self.dropout(out.permute(1, 2, 0)), x))
        out = self.linear(self.dropout(self.activation(self.recurrent(x.transpose(1, -1))[0])))
        return self.norm_ff(self.feedforward_residual(self.dropout(out.transpose(1, -1)), x))


class QDPTransformer(QuantizedModule, DPTransformer):
    """DPTNet's masker with a quantized overlap-add (``fold``) and a quantized ``tanh x sigmoid`` gate."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.overlap_add_quantizer = activation_quantizer(config)
        self.gate = QMul.convert_(Mul(), config)

    def forward(self, mixture_w: torch.Tensor) -> torch.Tensor:
        if self.input_layer is not None:
            mixture_w = self.input_layer(mixture_w.transpose(1, 2)).transpose(1, 2)
        mixture_w = self.in_norm(mixture_w)
        n_orig_frames = mixture_w.shape[-1]
        mixture_w = self.ola.unfold(mixture_w)
        batch, _, chunk_size, n_chunks = mixture_w.size()
        for intra, inter in self.layers:
            mixture_w = self.ola.inter_process(self.ola.intra_process(mixture_w, intra), inter)
        output = self.first_out(mixture_w)
        output = output.reshape(batch * self.n_src, self.in_chan, chunk_size, n_chunks)
        output = self.overlap_add_quantizer(self.ola.fold(output, output_size=n_orig_frames))
        output = self.gate(self.net_out(output), self.net_gate(output))
        return self.output_act(output.reshape(batch, self.n_src, self.in_chan, -1))


for _float_type, _wrapper in [(GlobLN, QGlobLN), (ChanLN, QChanLN), (Encoder, QFilterbankEncoder),
                              (Decoder, QFilterbankDecoder), (TDConvNet, QTDConvNet),
                              (ImprovedTransformedLayer, QImprovedTransformedLayer), (DPTransformer, QDPTransformer)]:
    register(_float_type, _wrapper)


def prepare_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """:func:`fqss_plugin.prepare` for an Asteroid ``BaseEncoderMaskerDecoder`` (``encoder``/``decoder``)."""
    return prepare(model, config, encoder="encoder", decoder="decoder")


# -- training -------------------------------------------------------------------------------------

class FQSSSystem(System):
    """Asteroid ``System`` for quantization-aware training with distillation from a float teacher.

    Only ``common_step`` changes: training minimises :class:`~fqss_plugin.FQSSLoss` (the teacher's
    estimate feeds its distillation term), validation reports the usual PIT negative SI-SDR in dB
    as ``val_loss``. The teacher is held outside the registered submodules, so it is neither
    optimised, nor checkpointed, nor switched to train mode by Lightning; it is moved to the
    device when fitting starts. After every optimizer step, :func:`calibration_step` counts the
    step for the calibrating quantizers (and averages their ranges over DDP ranks).
    """

    def __init__(self, model, optimizer, loss_func, train_loader, val_loader=None, scheduler=None, config=None,
                 teacher: nn.Module | None = None) -> None:
        super().__init__(model, optimizer, loss_func, train_loader, val_loader, scheduler, config)
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.validation_loss = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def common_step(self, batch, batch_nb, train=True):
        inputs, targets = batch[0], batch[1]
        estimate = self(inputs)
        if not train:
            return self.validation_loss(estimate, targets)
        if not isinstance(self.loss_func, FQSSLoss):
            return self.loss_func(estimate, targets)
        teacher_estimate = None
        if self.loss_func.lambda_kd > 0:
            if self.teacher is None:
                raise ValueError("FQSSSystem: the loss has lambda_kd > 0 but no teacher was given")
            with torch.no_grad():
                teacher_estimate = self.teacher(inputs)
        loss = self.loss_func(estimate, targets, teacher_estimate)
        if self.loss_func.distillation_share is not None:
            self.log("kd_share", self.loss_func.distillation_share, on_epoch=True, on_step=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        calibration_step(self.model)


# -- loading and saving models -------------------------------------------------------------------

PACKAGE_FILES = ("best_model.pth", "model.pth", "pytorch_model.bin")


def _load_package(path: Path) -> dict:
    """``torch.load`` an Asteroid model package (it pickles ``torch.__version__`` as a TorchVersion)."""
    try:
        with torch.serialization.safe_globals([TorchVersion]):
            package = torch.load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable Asteroid model package ({type(error).__name__}: {error})") from None
    if not isinstance(package, dict) or not {"model_name", "model_args", "state_dict"} <= set(package):
        raise ValueError(f"{path}: not an Asteroid model package (expected keys model_name, model_args, state_dict)")
    return package


def resolve_package(source: str | Path) -> dict:
    """The model package at ``source``: a package file, a directory holding one, or a Hugging Face hub id.

    Hub ids (e.g. ``JorisCos/ConvTasNet_Libri2Mix_sepclean_8k``) go through Asteroid's own
    download code (``asteroid.utils.hub_utils.cached_download``), which honours ``HF_HUB_OFFLINE``
    and ``ASTEROID_CACHE``.
    """
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in PACKAGE_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no model package in this directory (looked for {', '.join(PACKAGE_FILES)})")
        path = found[0]
    elif not path.exists():
        if Path(source).suffix in (".pth", ".bin", ".ckpt") or str(source).startswith((".", "/")):
            raise FileNotFoundError(f"{source}: no such model file")
        try:
            path = Path(cached_download(str(source)))
        except Exception as error:  # noqa: BLE001 - hub/network errors get one clear message
            raise FileNotFoundError(f"{source}: not a local file or directory, and not available from the Hugging Face "
                                    f"hub ({type(error).__name__}: {error})") from None
    return _load_package(path)


def load_float_model(source: str | Path) -> nn.Module:
    """A float Asteroid model from a package file, a directory or a hub id (the FQSS teacher)."""
    package = resolve_package(source)
    if "fqss" in package:
        raise ValueError(f"{source}: this is a quantized fqss model; a float teacher is needed here")
    return BaseModel.from_pretrained(package)


def load_quantized_model(source: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized_model`: float architecture, ``prepare``, strict load."""
    package = resolve_package(source)
    if "fqss" not in package:
        raise ValueError(f"{source}: not a quantized fqss model (no 'fqss' entry); use load_float_model for float ones")
    model = asteroid_models.get(package["model_name"])(**package["model_args"])
    prepare_model(model, QuantConfig(**package["fqss"]["config"]))
    try:
        model.load_state_dict(package["state_dict"], strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: its weights do not fit a quantized {package['model_name']} "
                         f"({str(error).splitlines()[0]})") from None
    if package["fqss"].get("frozen"):
        freeze(model)
    return model


def save_quantized_model(model: nn.Module, path: str | Path, config: QuantConfig, infos: dict | None = None) -> Path:
    """Write an Asteroid package (``serialize()``) plus the quantization config, atomically."""
    package = model.serialize()
    package["infos"] = {k: (str(v) if k == "software_versions" else v) for k, v in package.get("infos", {}).items()}
    package["infos"].update(infos or {})
    package["fqss"] = {"config": config.to_dict()}
    return atomic_save(package, path)


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
