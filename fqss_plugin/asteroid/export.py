"""Asteroid's export rewrites, registered with :mod:`fqss_plugin.export.registry` on import.

On the frozen export copy (:func:`fqss_plugin.export.export_view`), :func:`rewrite_asteroid` swaps the
classes of Asteroid's modules for variants that compute the same values with ops the ONNX exporter
writes plainly:

* the multichannel decoder of ``StereoConvTasNet`` becomes, with ``decoder="matmul"``, one integer MatMul
  per output channel plus an overlap-add;
* the filterbank encoder/decoder call ``F.conv1d`` / ``F.conv_transpose1d`` directly instead of
  Asteroid's shape-dispatching ``multishape_*`` helpers; the decoder can also be written as an
  integer MatMul plus overlap-add (``decoder="matmul"``), for which onnxruntime has an int8 kernel,
  while it has none for ConvTranspose;
* the dual-path ``fold`` (DPTNet, DPRNN: ``F.fold``, an opset-18 ``Col2Im``) is written as pads and
  sums in ``F.fold``'s own summation order (:func:`_overlap_add_fold`);
* ``GlobLN``/``ChanLN`` compute the same values in torch, without the scripted helper (which exports
  as ``If`` nodes), and export as a shorter op chain (:class:`_LayerNormFunction`).

It also registers the loader of Asteroid model packages for ``fqss export``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from asteroid.dsp.overlap_add import DualPathProcessing
from torch import nn

from ..export.registry import ExportOptions, PackageLoader, register_package_loader, register_rewrite
from ..export.view import ExportError, swap_class
from .package import PACKAGE_FILES, load_float_model, load_quantized_model
from ..quant.quantizers import FrozenWeightQuantizer
from .wrappers import QChanLN, QFilterbankDecoder, QFilterbankEncoder, QGlobLN, QMultichannelDecoder


class _LayerNormFunction(torch.autograd.Function):
    """Asteroid's gLN/cLN: in torch the very same kernels (bit-identical); in ONNX a shorter op chain.

    torch: ``gamma * (x - mean) / sqrt(var + eps) + beta`` (``torch.var``, biased), as Asteroid computes it.
    ONNX: ``d = x - mean``, ``a = gamma / sqrt(mean(d*d) + eps)`` (a ``[1, C, 1]`` vector), ``d * a + beta``:
    two full-size float passes fewer than the traced formula (onnxruntime has no fused kernel for a norm over
    channels and time; ``LayerNormalization`` with a per-channel scale measured slower). Same value up to
    float rounding; the parity report measures the effect (codes differing after the norm's quantizer).

    With ``staged``, each mean over several axes is taken one axis at a time, innermost first
    (:func:`_mean`): onnxruntime's ``ReduceMean`` over ``[1, 2]`` sums all ``C*T`` values into one
    float32 accumulator, whose relative error grows with the input length (measured: 5.6e-6 for 128 x 4000
    values, 1.9e-4 for 128 x 32000), while the mean of per-channel means stays near float32 precision (1e-7
    for both). It costs speed: the embedded ConvTasNet ran 24.5 ms joint, 34.0 ms staged (4 s, 1 thread).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, dims: tuple[int, ...], eps: float, staged: bool):
        mean = x.mean(dim=dims, keepdim=True)
        var = torch.var(x, dim=dims, keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return gamma.reshape(shape) * ((x - mean) / torch.sqrt(var + eps)) + beta.reshape(shape)

    @staticmethod
    def symbolic(g, x, gamma, beta, dims, eps, staged):
        rank = x.type().dim() if x.type().dim() is not None else 3
        shape = g.op("Constant", value_t=torch.tensor([1, -1] + [1] * (rank - 2), dtype=torch.int64))
        mean = _mean(g, x, dims, staged)
        d = g.op("Sub", x, mean)
        var = _mean(g, g.op("Mul", d, d), dims, staged)
        std = g.op("Sqrt", g.op("Add", var, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
        a = g.op("Div", g.op("Reshape", gamma, shape), std)
        return g.op("Add", g.op("Mul", d, a), g.op("Reshape", beta, shape))


def _mean(g, x, dims: tuple[int, ...], staged: bool):
    """``ReduceMean`` over ``dims``; with ``staged`` one axis at a time from the last: every partial mean
    averages the same number of values, so the result is the joint mean, with float32 sums of one axis'
    length only."""
    if not staged:
        return g.op("ReduceMean", x, axes_i=list(dims), keepdims_i=1)
    for axis in sorted(dims, reverse=True):
        x = g.op("ReduceMean", x, axes_i=[axis], keepdims_i=1)
    return x


def _export_norm_forward(self, x: torch.Tensor, EPS: float = 1e-8) -> torch.Tensor:
    """Asteroid's gLN/cLN without the scripted helper (which exports as ``If`` nodes)."""
    return self.output_quantizer(_LayerNormFunction.apply(x, self.gamma, self.beta, self._fqss_norm_dims(x), EPS,
                                                          self._fqss_staged_means))


def _filterbank_encoder_op(self, x, weight, bias):
    spec = F.conv1d(self.filterbank.pre_analysis(x), weight, stride=self.stride, padding=self.padding)
    return self.filterbank.post_analysis(spec)


def _filterbank_decoder_op(self, x, weight, bias):
    """``F.conv_transpose1d`` on ``[*, N, frames]`` flattened to 3-D, like ``multishape_conv_transpose1d``."""
    lead = x.shape[:-2]
    spec = self.filterbank.pre_synthesis(x).reshape((-1,) + tuple(x.shape[-2:]))
    wav = F.conv_transpose1d(spec, weight, stride=self.stride, padding=self.padding,
                             output_padding=self.output_padding)
    return self.filterbank.post_synthesis(wav.reshape(lead + (-1,)) if len(lead) > 1 else wav)


def _matmul_decoder_op(self, x, weight, bias):
    """The same synthesis as an (integer) MatMul per frame plus an overlap-add of ``K/stride`` shifted parts."""
    n_filters, _, kernel = weight.shape
    stride = self.stride
    lead = x.shape[:-2]
    spec = self.filterbank.pre_synthesis(x).reshape(-1, n_filters, x.shape[-1]).transpose(1, 2)   # [B', F, N]
    wav = _overlap_add(torch.matmul(spec, weight.reshape(n_filters, kernel)), stride)            # [B', 1, T]
    if self.padding:
        wav = wav[..., self.padding:wav.shape[-1] - self.padding]
    return self.filterbank.post_synthesis(wav.reshape(lead + (-1,)) if len(lead) > 1 else wav)


def _overlap_add(frames: torch.Tensor, stride: int) -> torch.Tensor:
    """``[B', F, K]`` frames -> ``[B', 1, (F - 1) * stride + K]``: the ``K / stride`` parts of every frame added at
    their offsets (the summation of a transposed conv whose kernel is a multiple of its stride)."""
    parts = frames.shape[-1] // stride
    frames = frames.reshape(frames.shape[0], frames.shape[1], parts, stride)
    wav = sum(F.pad(frames[:, :, j], (0, 0, j, parts - 1 - j)) for j in range(parts))           # [B', F+parts-1, S]
    return wav.reshape(wav.shape[0], 1, -1)


def _matmul_multichannel_op(self, x, weight, bias):
    """The multichannel decoder as one integer MatMul per output channel plus an overlap-add; each channel's
    filters are their own constant with their own (per-channel) step, so the int8 codes feed the MatMul
    directly. ``weight`` (the whole quantized filter bank) is not used: the same codes come from the
    per-channel copies made by :func:`rewrite_asteroid`."""
    spec = x.transpose(1, 2)                                                                      # [B', F, N]
    n_filters, kernel = self.channel_weights[0].shape[0], self.channel_weights[0].shape[-1]
    wav = torch.cat([_overlap_add(torch.matmul(spec, quantizer(w).reshape(n_filters, kernel)), self.stride[0])
                     for w, quantizer in zip(self.channel_weights, self.channel_quantizers)], dim=1)
    return wav if bias is None else wav + bias.reshape(1, -1, 1)


def _split_channels(module: QMultichannelDecoder) -> None:
    """Per-output-channel copies of a frozen multichannel decoder's filters and weight quantizer."""
    frozen = module.weight_quantizer
    module.channel_weights = nn.ParameterList(
        nn.Parameter(module.weight[:, c:c + 1].detach().clone(), requires_grad=False)
        for c in range(module.weight.shape[1]))
    module.channel_quantizers = nn.ModuleList(FrozenWeightQuantizer(frozen.scale[c:c + 1], 1, frozen.bits)
                                              for c in range(module.weight.shape[1]))


def _overlap_add_fold(self, x: torch.Tensor, output_size: int | None = None) -> torch.Tensor:
    """Asteroid's ``DualPathProcessing.fold`` (``F.fold``, which exports as opset-18 ``Col2Im``) as pads and sums.

    Chunk ``s`` covers padded frames ``[s·hop, s·hop + K)``; with ``K = P·hop``, its part ``j`` lands on
    block ``s + j`` of ``hop`` frames. Summing the parts in the order ``j = 0..P-1`` from zero is the
    order ``F.fold`` accumulates them in, so the values are bit-identical.
    """
    output_size = output_size if output_size is not None else self.n_orig_frames
    batch, chan, chunk_size, n_chunks = x.shape
    hop, parts = self.hop_size, self.chunk_size // self.hop_size
    x = x.reshape(batch, chan, parts, hop, n_chunks)
    blocks = sum(F.pad(x[:, :, j], (j, parts - 1 - j)) for j in range(parts))      # [B, C, hop, chunks + P - 1]
    frames = blocks.transpose(2, 3).reshape(batch, chan, -1)[..., chunk_size:chunk_size + output_size]
    return frames / (float(self.chunk_size) / self.hop_size)


@register_rewrite
def rewrite_asteroid(model: nn.Module, options: ExportOptions) -> None:
    """The export variants of Asteroid's modules in ``model`` (the frozen export copy), in place."""
    decoder, staged_norm_means = options.decoder, options.staged_norm_means
    for module in model.modules():
        if isinstance(module, DualPathProcessing):
            if module.chunk_size % module.hop_size:
                raise ExportError(f"DPTNet/DPRNN export needs a chunk size that is a multiple of the hop size "
                                  f"(chunk {module.chunk_size}, hop {module.hop_size})")
            swap_class(module, {"fold": _overlap_add_fold})
        if isinstance(module, QGlobLN):
            swap_class(module, {"forward": _export_norm_forward, "_fqss_staged_means": staged_norm_means,
                                          "_fqss_norm_dims": lambda self, x: tuple(range(1, x.dim()))})
        elif isinstance(module, QChanLN):
            swap_class(module, {"forward": _export_norm_forward, "_fqss_staged_means": staged_norm_means,
                                          "_fqss_norm_dims": lambda self, x: (1,)})
        elif isinstance(module, QFilterbankEncoder):
            swap_class(module, {"linear_op": _filterbank_encoder_op})
        elif isinstance(module, QFilterbankDecoder):
            op = _filterbank_decoder_op
            if decoder == "matmul":
                kernel = module.filterbank.kernel_size
                if kernel % module.stride or module.output_padding:
                    raise ExportError(f"decoder='matmul' needs a kernel size that is a multiple of the stride and "
                                      f"no output padding (kernel {kernel}, stride {module.stride})")
                op = _matmul_decoder_op
            swap_class(module, {"linear_op": op})
        elif isinstance(module, QMultichannelDecoder) and decoder == "matmul":
            kernel, stride = module.kernel_size[0], module.stride[0]
            if kernel % stride or module.padding[0] or module.output_padding[0] or module.groups != 1:
                raise ExportError(f"decoder='matmul' needs a kernel size that is a multiple of the stride, no padding "
                                  f"and one group (kernel {kernel}, stride {stride}); export with decoder='conv'")
            _split_channels(module)
            swap_class(module, {"linear_op": _matmul_multichannel_op})


def _is_package(source: str) -> bool:
    """A package file (not Demucs' ``.th``), a directory holding one, or anything that is not a local path (a hub
    id)."""
    path = Path(source)
    return (path.is_file() and path.suffix != ".th") or (path.is_dir() and any((path / name).is_file() for name in PACKAGE_FILES)) \
        or not path.exists()


register_package_loader(PackageLoader(
    toolkit="asteroid", matches=_is_package, load=load_quantized_model, load_float=load_float_model,
    describe=f"a model package written by an fqss Asteroid recipe ({', '.join(PACKAGE_FILES)}), its directory, "
             "or a Hugging Face hub id"))
