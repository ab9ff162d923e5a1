"""SpeechBrain adapter: a fully quantized SepFormer (and the dual-path family) in SpeechBrain recipes.

Three pieces, each usable on its own:

* **Wrappers** for SpeechBrain's own module types, registered on import, so that
  :func:`fqss_plugin.prepare` quantizes every computation of a SepFormer, including the ones that
  upstream code writes as plain tensor arithmetic inside ``forward``:

  ==================================  ===============================================================
  upstream                            quantized here
  ==================================  ===============================================================
  ``dual_path.Encoder``               conv (``conv1d``: input splitter / input quantizer) then ReLU
                                      with its own output quantizer (the encoder output ``mix_w``)
  ``dual_path.Decoder``               a ``ConvTranspose1d`` *subclass*: quantized weight, an input
                                      quantizer on the mix x mask product it receives, output combiner
  ``Dual_Path_Model``                 gate product ``output * gate``, overlap-add ``_over_add``,
                                      global positional-encoding sum (when enabled)
  ``Dual_Computation_Block``          residual sums ``intra + x`` and ``inter + intra``
  ``SBTransformerBlock``              positional-encoding sum ``x + pos_enc``
  ``TransformerEncoderLayer``         both residual sums (after attention and after the FFN)
  ``GlobalLayerNorm``,                output quantized, statistics and affine in float (as GroupNorm)
  ``CumulativeLayerNorm``
  ``PositionalEncoding``              the sinusoidal table (a constant) gets an output quantizer
  ==================================  ===============================================================

  The core already converts what these contain: ``nn.MultiheadAttention`` (inside
  ``sb.nnet.attention.MultiheadAttention``: q/k/v, logits, softmax, attn x V, output projection),
  ``nn.Linear`` (FFN, inside ``sb.nnet.linear.Linear``), ``nn.LayerNorm`` (inside
  ``sb.nnet.normalization.LayerNorm``), ``nn.GroupNorm``, ``nn.Conv1d/2d``, ``nn.PReLU``,
  ``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``.

* :func:`quantize_inplace` for hyperpyyaml, ``!apply:fqss_plugin.speechbrain.quantize_inplace
  [!ref <modules>, !ref <config>]``: converts the modules in place (every ``!ref`` alias, the
  checkpointer and the pretrainer see the quantized modules) and returns the float teacher, a deep
  copy taken *before* quantization.

* :class:`FQSSSeparation`, the ``sb.Brain`` of the separation recipe for quantization-aware
  training with distillation, and the inference package (:func:`save_pretrained_separator`,
  :class:`QuantizedSepformerSeparation`) that ``SepformerSeparation.from_hparams`` reloads.
"""
from __future__ import annotations

import copy
import csv
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import speechbrain as sb
from speechbrain.inference.separation import SepformerSeparation
from speechbrain.lobes.models.dual_path import (CumulativeLayerNorm, Decoder, Dual_Computation_Block, Dual_Path_Model,
                                                Encoder, GlobalLayerNorm, SBTransformerBlock)
from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding, TransformerEncoderLayer
from speechbrain.nnet.schedulers import ReduceLROnPlateau
from speechbrain.utils import checkpoints as sb_checkpoints
from speechbrain.utils.distributed import ddp_broadcast

from .atomic import atomic_path
from .loss import FQSSLoss
from .quant import QuantConfig, calibration_step, parameter_groups, prepare, register
from .quant.layers import (NORM_INTERNALS, Add, Mul, OutputQuantized, QAdd, QConvTranspose1d, QMul, QReLU,
                           QuantizedLayer, QuantizedModule, activation_quantizer)
from .quant.quantizers import ActivationQuantizer, WeightQuantizer
from .quant.signal_io import InputSplitter

logger = logging.getLogger(__name__)

MODULE_KEYS = ("encoder", "masknet", "decoder")
"""The keys of a SpeechBrain separation recipe's ``modules`` (and of ``SepformerSeparation.MODULES_NEEDED``)."""


# -- wrappers ------------------------------------------------------------------------------------

def _add(config: QuantConfig) -> QAdd:
    return QAdd.convert_(Add(), config)


class QSBEncoder(QuantizedModule, Encoder):
    """``dual_path.Encoder``: its ``conv1d`` child is converted by ``prepare`` (and carries the input
    splitter); the ReLU after it, a functional call upstream, is a :class:`QReLU` module here, so
    the encoder output (the ``mix_w`` of the separation Brain) is on a grid."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.relu = QReLU.convert_(nn.ReLU(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.unsqueeze(1)
        return self.relu(self.conv1d(x))


class QSBDecoder(QConvTranspose1d, Decoder):
    """``dual_path.Decoder`` (a ``ConvTranspose1d`` subclass that reshapes its input and output).

    Besides the weight and output quantizers of a transposed conv, it quantizes its *input*: the
    separation Brain (and ``SepformerSeparation.separate_batch``) feed it ``mix_w * est_mask``, a
    product computed outside any module; quantizing it where it is consumed makes the stock
    inference code fully quantized too.
    """

    def _init_quantization(self, config: QuantConfig) -> None:
        super()._init_quantization(config)
        self.input_quantizer = activation_quantizer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise RuntimeError(f"{type(self).__name__} accepts 2D or 3D input, got shape {tuple(x.shape)}")
        out = QuantizedLayer.forward(self, x if x.dim() == 3 else x.unsqueeze(1))
        # upstream's squeeze: [B, 1, T] -> [B, T], also for B = 1
        return out.squeeze(1) if out.squeeze().dim() == 1 else out.squeeze()


class QSBGlobalLayerNorm(OutputQuantized, GlobalLayerNorm):
    """SpeechBrain's global layer norm (``norm: gln``) with a quantized output."""

    float_internals = NORM_INTERNALS


class QSBCumulativeLayerNorm(OutputQuantized, CumulativeLayerNorm):
    """SpeechBrain's channel-wise layer norm (``norm: cln``) with a quantized output."""

    float_internals = NORM_INTERNALS


class QSBPositionalEncoding(OutputQuantized, PositionalEncoding):
    """The sinusoidal positional table (a constant) on a grid, like any constant an integer engine stores."""


class QTransformerEncoderLayer(QuantizedModule, TransformerEncoderLayer):
    """A SpeechBrain transformer encoder layer whose two residual sums are quantized.

    ``(pre-/post-)norm -> self-attention -> Q(src + attn) -> (norm) -> FFN -> Q(src + ffn)``;
    the attention, FFN and norms are quantized by the core wrappers of their torch modules.
    """

    def _init_quantization(self, config: QuantConfig) -> None:
        self.attention_residual = _add(config)
        self.ffn_residual = _add(config)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, pos_embs: Optional[torch.Tensor] = None):
        pre_norm = self.normalize_before
        attn_in = self.norm1(src) if pre_norm else src
        attn_out, attention = self.self_att(attn_in, attn_in, attn_in, attn_mask=src_mask,
                                            key_padding_mask=src_key_padding_mask, pos_embs=pos_embs)
        src = self.attention_residual(src, self.dropout1(attn_out))
        if not pre_norm:
            src = self.norm1(src)
        ffn_out = self.pos_ffn(self.norm2(src) if pre_norm else src)
        out = self.ffn_residual(src, self.dropout2(ffn_out))
        if not pre_norm:
            out = self.norm2(out)
        return out, attention


class QSBTransformerBlock(QuantizedModule, SBTransformerBlock):
    """``SBTransformerBlock`` with the positional-encoding sum ``x + pos_enc`` quantized."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.pos_add = _add(config) if self.use_positional_encoding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_positional_encoding:
            x = self.pos_add(x, self.pos_enc(x))
        return self.mdl(x)[0]


class QDualComputationBlock(QuantizedModule, Dual_Computation_Block):
    """One intra-chunk + inter-chunk stage of the dual-path model with quantized residual sums."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.intra_residual = _add(config) if self.skip_around_intra else None
        self.inter_residual = _add(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, K, S = x.shape
        # within chunks: sequences of length K, one per (example, chunk)
        intra = self.intra_mdl(x.permute(0, 3, 2, 1).reshape(B * S, K, N))
        if self.linear_layer_after_inter_intra:
            intra = self.intra_linear(intra)
        intra = intra.reshape(B, S, K, N).permute(0, 3, 2, 1).contiguous()
        if self.norm is not None:
            intra = self.intra_norm(intra)
        if self.skip_around_intra:
            intra = self.intra_residual(intra, x)
        # across chunks: sequences of length S, one per (example, position in chunk)
        inter = self.inter_mdl(intra.permute(0, 2, 3, 1).reshape(B * K, S, N))
        if self.linear_layer_after_inter_intra:
            inter = self.inter_linear(inter)
        inter = inter.reshape(B, K, S, N).permute(0, 3, 1, 2).contiguous()
        if self.norm is not None:
            inter = self.inter_norm(inter)
        return self.inter_residual(inter, intra)


class QDual_Path_Model(QuantizedModule, Dual_Path_Model):
    """The dual-path mask network with its gate product, overlap-add and positional sum quantized."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.gate_product = QMul.convert_(Mul(), config)
        self.overlap_add = _add(config)
        self.global_pos_add = _add(config) if self.use_global_pos_enc else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1d(self.norm(x))                                   # [B, N, L]
        if self.use_global_pos_enc:
            pos = self.pos_enc(x.transpose(1, -1)).transpose(1, -1)
            x = self.global_pos_add(pos, x * (x.size(1) ** 0.5))
        x, gap = self._Segmentation(x, self.K)                          # [B, N, K, S]
        for block in self.dual_mdl:
            x = block(x)
        x = self.conv2d(self.prelu(x))                                  # [B, N*spks, K, S]
        B, _, K, S = x.shape
        x = self._over_add(x.reshape(B * self.num_spks, -1, K, S), gap)  # [B*spks, N, L]
        x = self.gate_product(self.output(x), self.output_gate(x))
        x = self.end_conv1x1(x)
        _, N, L = x.shape
        x = self.activation(x.reshape(B, self.num_spks, N, L))
        return x.transpose(0, 1)                                        # [spks, B, N, L]

    def _over_add(self, input: torch.Tensor, gap: int) -> torch.Tensor:
        B, N, K, S = input.shape
        P = K // 2
        frames = input.transpose(2, 3).reshape(B, N, -1, 2 * K)
        first = frames[..., :K].reshape(B, N, -1)[..., P:]
        second = frames[..., K:].reshape(B, N, -1)[..., :-P]
        out = self.overlap_add(first, second)
        return out[..., :-gap] if gap > 0 else out


for _float_type, _wrapper in [
    (Encoder, QSBEncoder), (Decoder, QSBDecoder), (GlobalLayerNorm, QSBGlobalLayerNorm),
    (CumulativeLayerNorm, QSBCumulativeLayerNorm), (PositionalEncoding, QSBPositionalEncoding),
    (TransformerEncoderLayer, QTransformerEncoderLayer),
    (SBTransformerBlock, QSBTransformerBlock), (Dual_Computation_Block, QDualComputationBlock),
    (Dual_Path_Model, QDual_Path_Model),
]:
    register(_float_type, _wrapper)


# -- quantizer state --------------------------------------------------------------------------------

QUANTIZER_STATE_TYPES = (ActivationQuantizer, WeightQuantizer, InputSplitter)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds any quantizer."""
    return any(isinstance(m, QUANTIZER_STATE_TYPES) for m in module.modules())


@torch.no_grad()
def reset_quantizers(module: nn.Module) -> int:
    """Put every quantizer of ``module`` back in its never-seen-data state; return how many.

    Weight steps and the input splitter's extra kernels then re-initialise from the *current*
    weights on the next forward pass, and activation ranges calibrate again from data. Used after
    float weights are loaded into a quantized model, and after ``reset_layer_recursively``.
    """
    count = 0
    for quantizer in module.modules():
        if isinstance(quantizer, ActivationQuantizer):
            quantizer.log_scale.zero_()
            quantizer.zero_point.zero_()
            for name in ("running_min", "running_max", "pending_min", "pending_max", "steps_observed"):
                getattr(quantizer, name).zero_()
            quantizer.has_pending.fill_(False)
        elif isinstance(quantizer, WeightQuantizer):
            quantizer.log_scale.zero_()
        elif not isinstance(quantizer, InputSplitter):
            continue
        quantizer.initialized.fill_(False)
        count += 1
    return count


def _is_quantizer_key(key: str) -> bool:
    return "quantizer" in key or "input_splitter" in key


def transfer_into_quantized(obj: nn.Module, path: str | os.PathLike) -> None:
    """SpeechBrain parameter-transfer hook (``Pretrainer``) for quantized modules.

    Registered as the default transfer hook of every :class:`QuantizedModule`, so the stock
    ``Pretrainer`` of a recipe yaml uses it for the quantized encoder, mask net and decoder:

    * a **float** checkpoint (no quantizer keys): loads every float weight, checks that nothing
      but quantizer state is missing, and resets the module's quantizers so that they initialise
      from these weights and calibrate on data (the FQSS QAT start);
    * a **quantized** checkpoint (an fqss model, e.g. for inference): loads everything, strictly.

    Anything else (weights that do not fit, a checkpoint quantized with another configuration)
    raises a ``ValueError`` naming the file, instead of the stock hook's warnings.
    """
    state = sb_checkpoints.torch_patched_state_dict_load(path, "cpu")
    quantized_checkpoint = any(_is_quantizer_key(k) for k in state)
    try:
        missing, unexpected = obj.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the {type(obj).__name__} of this yaml "
                         f"({str(error).strip().splitlines()[-1].strip()})") from None
    missing_float = [k for k in missing if not _is_quantizer_key(k)]
    if missing_float or unexpected:
        raise ValueError(f"{path}: does not match the {type(obj).__name__} of this yaml "
                         f"(missing {missing_float[:5] or 'nothing'}, unexpected {unexpected[:5] or 'nothing'})")
    if quantized_checkpoint and missing:
        raise ValueError(f"{path}: a quantized checkpoint made with a different quantization config "
                         f"(this model also has {missing[:5]})")
    if not quantized_checkpoint:
        reset_quantizers(obj)
        logger.info(f"fqss: loaded float weights into quantized {type(obj).__name__} from {path}; "
                    f"{len(missing)} quantizer tensors start fresh")


sb_checkpoints.DEFAULT_TRANSFER_HOOKS[QuantizedModule] = transfer_into_quantized


# -- hyperpyyaml entry point ----------------------------------------------------------------------

def quantize_inplace(modules, config: QuantConfig, keep_float_teacher: bool = True, encoder: str = "encoder",
                     decoder: str = "decoder") -> nn.ModuleDict | None:
    """Quantize a recipe's ``modules`` in place; return their float copy (the teacher) or None.

    Meant for the recipe yaml, after ``modules:``::

        float_teacher: !apply:fqss_plugin.speechbrain.quantize_inplace [!ref <modules>, !ref <config>]

    Every module is converted in place (:func:`fqss_plugin.prepare`), so ``Encoder``, ``MaskNet``,
    ``modules``, the checkpointer's recoverables and the pretrainer's loadables, which all alias
    the same objects, are quantized at once, with upstream parameter names (float checkpoints
    load). The first weighted layer of ``modules[encoder]`` gets the input splitter (or input
    quantizer), the last one of ``modules[decoder]`` the output combiner.

    The returned teacher is a deep copy of the modules *before* quantization, in eval mode, with
    no trainable parameters; :class:`FQSSSeparation` gives it the student's pretrained float
    weights when training starts. ``keep_float_teacher=False`` (vanilla QAT, inference) returns None.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_inplace: config must be a fqss_plugin.QuantConfig, got {type(config).__name__}")
    if not hasattr(modules, "items"):
        raise TypeError(f"quantize_inplace: modules must be the recipe's dict of modules, got {type(modules).__name__}")
    bad = [k for k, m in modules.items() if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError(f"quantize_inplace: modules[{bad[0]!r}] is not a torch.nn.Module")
    for role, key in (("encoder", encoder), ("decoder", decoder)):
        if key not in modules:
            raise ValueError(f"quantize_inplace: {role}={key!r} is not a key of modules (keys: {list(modules)})")
    holder = nn.ModuleDict(dict(modules))
    if any(is_quantized(m) for m in holder.values()):
        raise ValueError("quantize_inplace: the modules are already quantized (applied twice?)")
    teacher = None
    if keep_float_teacher:
        teacher = copy.deepcopy(holder).eval().requires_grad_(False)
    first = _weighted_layers(holder[encoder], encoder)[0]
    last = _weighted_layers(holder[decoder], decoder)[-1]
    prepare(holder, config, encoder=_name_in(holder, first), decoder=_name_in(holder, last))
    return teacher


def _weighted_layers(module: nn.Module, key: str) -> list[nn.Module]:
    from .quant.registry import wrapper_for
    layers = [m for m in module.modules() if wrapper_for(m) is not None and issubclass(wrapper_for(m), QuantizedLayer)]
    if not layers:
        raise ValueError(f"quantize_inplace: modules[{key!r}] ({type(module).__name__}) has no weighted layer "
                         f"with a quantized wrapper (conv, transposed conv, linear)")
    return layers


def _name_in(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


# -- the Brain --------------------------------------------------------------------------------------

class FQSSSeparation(sb.Brain):
    """The LibriMix/WSJ0Mix separation Brain, for float training and for (FQSS) quantization-aware training.

    It follows the stock recipe's ``Separation`` (same batch keys, augmentations, per-example loss
    thresholding, skipping of non-finite losses, gradient clipping, ``ReduceLROnPlateau``, logging,
    checkpoints and ``test_results.csv``) and differs where quantization needs it:

    * it calls ``self.modules.encoder/masknet/decoder`` (not the hparams aliases), so DDP applies;
    * ``mix_w * est_mask`` is quantized by the decoder's input quantizer (:class:`QSBDecoder`), the
      input and output signals by the encoder's input splitter and the decoder's output combiner;
    * with ``fqss_loss`` in the hparams, the training objective is :class:`~fqss_plugin.FQSSLoss`
      on the examples kept by the stock threshold (the student's own SI-SNR decides, as upstream),
      with the estimate of ``float_teacher`` (hparams only: not DDP-wrapped, not optimised, not
      checkpointed) for the distillation term;
    * after every optimizer step, :func:`~fqss_plugin.calibration_step` (all ranks, in step);
    * when fitting starts, the teacher takes the student's float weights (the pretrained ones, as
      ``train.py`` loads them before building the Brain) *before* a checkpoint is recovered.

    The train log's ``si-snr`` is the negative SI-SNR of the student in every mode (comparable
    across float, vanilla and FQSS); QAT runs also log ``fqss-loss``, the objective minimised.
    """

    # -- set-up ------------------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fqss_loss: FQSSLoss | None = getattr(self.hparams, "fqss_loss", None)
        self.teacher: nn.ModuleDict | None = getattr(self.hparams, "float_teacher", None)
        if self.fqss_loss is not None and not isinstance(self.fqss_loss, FQSSLoss):
            raise TypeError(f"hparams fqss_loss must be a fqss_plugin.FQSSLoss, got {type(self.fqss_loss).__name__}")
        if self.distills and self.teacher is None:
            raise ValueError("hparams: fqss_loss has lambda_kd > 0 but there is no float_teacher (the return value "
                             "of fqss_plugin.speechbrain.quantize_inplace)")
        self._teacher_ready = False
        self.nonfinite_count = 0

    @property
    def distills(self) -> bool:
        return self.fqss_loss is not None and self.fqss_loss.lambda_kd > 0

    @property
    def quantized(self) -> bool:
        return any(is_quantized(m) for m in self.modules.values())

    def on_fit_start(self):
        if self.teacher is not None and not self._teacher_ready:
            self._load_teacher()
        if self.distributed_launch and self.checkpointer is not None and self.debug:
            # --debug gives every rank its own temporary checkpoint folder; the checkpointer's
            # collectives (deleting old checkpoints) then deadlock. All ranks use rank 0's.
            self.checkpointer.checkpoints_dir = ddp_broadcast(self.checkpointer.checkpoints_dir, src=0)
        super().on_fit_start()          # DDP wrapping, optimizer, then checkpoint recovery

    @torch.no_grad()
    def _load_teacher(self) -> None:
        """The teacher takes the student's float weights (quantizer state aside)."""
        for key, teacher_module in self.teacher.items():
            student = self.modules[key]
            student = getattr(student, "module", student)
            missing, _ = teacher_module.load_state_dict(student.state_dict(), strict=False)
            if missing:
                raise RuntimeError(f"float_teacher[{key!r}] does not match modules[{key!r}] (missing {missing[:3]})")
        self.teacher.to(self.device).eval().requires_grad_(False)
        self._teacher_ready = True
        if "pretrained_separator" not in vars(self.hparams):
            logger.warning("fqss: no pretrained_separator in the hparams: the float teacher has the student's "
                           "initial (untrained) weights")

    def init_optimizers(self):
        """The stock optimizer, over :func:`~fqss_plugin.quant.parameter_groups` when the modules are
        quantized: the quantizers' ranges learn at ``fqss.quantizer_lr``, the weights at the yaml's ``lr``."""
        config = getattr(self.hparams, "fqss", None)
        if self.opt_class is None or config is None or not self.quantized:
            return super().init_optimizers()
        if self.remove_vector_weight_decay:
            raise ValueError("--remove_vector_weight_decay: not supported with quantized modules (the quantizers' "
                             "ranges already get no weight decay)")
        self.optimizer = self.opt_class(parameter_groups(self.modules, config.quantizer_lr))
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def reset_layer_recursively(self, layer: nn.Module) -> None:
        """Re-initialise the float parameters (as the stock recipe does without a pretrained model),
        then put the quantizers back to their never-seen-data state."""
        for module in layer.modules():
            if not isinstance(module, QUANTIZER_STATE_TYPES) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        reset_quantizers(layer)

    # -- forward -----------------------------------------------------------------------------------
    def separate(self, mix: torch.Tensor, modules=None) -> torch.Tensor:
        """``[B, T]`` mixture -> ``[B, T, num_spks]`` estimates with ``modules`` (default: ``self.modules``)."""
        modules = self.modules if modules is None else modules
        return separate_sources(mix, modules["encoder"], modules["masknet"], modules["decoder"],
                                self.hparams.num_spks)

    def prepare_signals(self, mix, targets, stage, noise=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch fields -> (mixture ``[B, T]``, targets ``[B, T, num_spks]``) on the device, with the
        recipe's training augmentations (speed perturbation, random shift, noise, wavedrop, cut)."""
        mix, mix_lens = mix
        mix, mix_lens = mix.to(self.device), mix_lens.to(self.device)
        targets = torch.stack([targets[i][0] for i in range(self.hparams.num_spks)], dim=-1).to(self.device)
        hp = self.hparams
        if stage == sb.Stage.TRAIN:
            with torch.no_grad():
                if getattr(hp, "use_speedperturb", False) or getattr(hp, "use_rand_shift", False):
                    targets = self._perturb_sources(targets)
                    mix = targets.sum(-1)
                    if getattr(hp, "use_wham_noise", False) and noise is not None:
                        noise = noise.to(self.device)
                        length = min(noise.shape[1], mix.shape[1])
                        mix, targets = mix[:, :length] + noise[:, :length], targets[:, :length]
                if getattr(hp, "use_wavedrop", False):
                    mix = hp.drop_freq(hp.drop_chunk(mix, mix_lens))
                if getattr(hp, "limit_training_signal_len", False):
                    start = int(torch.randint(0, 1 + max(0, mix.shape[1] - hp.training_signal_len), (1,)))
                    mix = mix[:, start:start + hp.training_signal_len]
                    targets = targets[:, start:start + hp.training_signal_len]
        return mix, targets

    def _perturb_sources(self, targets: torch.Tensor) -> torch.Tensor:
        """Speed-perturb and/or randomly shift each source independently (then the mix is re-summed)."""
        hp = self.hparams
        sources = [targets[..., i] for i in range(targets.shape[-1])]
        if getattr(hp, "use_speedperturb", False):
            sources = [hp.speed_perturb(s) for s in sources]
        if getattr(hp, "use_rand_shift", False):
            sources = [torch.roll(s, int(torch.randint(hp.min_shift, hp.max_shift, (1,))), dims=1) for s in sources]
        length = min(s.shape[-1] for s in sources)
        return torch.stack([s[:, :length] for s in sources], dim=-1)

    def compute_forward(self, mix, targets, stage, noise=None):
        """The stock recipe's signature: returns ``(est_source, targets)``, both ``[B, T, num_spks]``."""
        mix, targets = self.prepare_signals(mix, targets, stage, noise)
        return self.separate(mix), targets

    def compute_objectives(self, predictions, targets):
        """Per-example negative PIT SI-SNR in dB, ``[B]`` (the recipe's ``loss``)."""
        return self.hparams.loss(targets, predictions)

    # -- training ----------------------------------------------------------------------------------
    def fit_batch(self, batch):
        mixture, targets = batch.mix_sig, [batch.s1_sig, batch.s2_sig]
        if self.hparams.num_spks == 3:
            targets.append(batch.s3_sig)
        noise = batch.noise_sig[0] if getattr(self.hparams, "use_wham_noise", False) else None

        with self.training_ctx:
            mix, targets = self.prepare_signals(mixture, targets, sb.Stage.TRAIN, noise)
            predictions = self.separate(mix)
            neg_sisnr = self.compute_objectives(predictions, targets)          # [B], dB
            keep = self._kept(neg_sisnr)
            if self.fqss_loss is None:
                loss = neg_sisnr[keep].mean() if keep.any() else neg_sisnr.new_zeros(())
            elif keep.any():
                teacher_estimate = None
                if self.distills:
                    with torch.no_grad():
                        teacher_estimate = self.separate(mix, self.teacher)[keep].transpose(1, 2)
                loss = self.fqss_loss(predictions[keep].transpose(1, 2), targets[keep].transpose(1, 2),
                                      teacher_estimate)
            else:
                loss = neg_sisnr.new_zeros(())

        usable = bool(keep.any()) and bool(torch.isfinite(loss.detach())) \
            and float(loss.detach()) < self.hparams.loss_upper_lim
        if not usable:
            self.nonfinite_count += 1
            logger.info(f"infinite loss or empty loss! it happened {self.nonfinite_count} times so far - "
                        "skipping this batch")
            if self.distributed_launch:
                # every rank must take part in DDP's gradient all-reduce: contribute a zero gradient
                loss = sum(p.sum() for p in self.modules.parameters() if p.requires_grad) * 0.0
        if usable or self.distributed_launch:
            self.scaler.scale(loss).backward()
            if self.hparams.clip_grad_norm >= 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.modules.parameters(), self.hparams.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.quantized:
            calibration_step(self.modules)     # every rank, every batch: the range all-reduce stays in step
        if self.fqss_loss is not None and usable:
            self._fqss_loss_sum += float(loss.detach())
            self._fqss_loss_count += 1
        kept = neg_sisnr.detach()[keep]
        return kept.mean().cpu() if kept.numel() and torch.isfinite(kept).all() else torch.tensor(0.0)

    def _kept(self, neg_sisnr: torch.Tensor) -> torch.Tensor:
        """The stock recipe's hard threshold: train only on examples whose loss is above ``threshold``."""
        if getattr(self.hparams, "threshold_byloss", False):
            return neg_sisnr.detach() > self.hparams.threshold
        return torch.ones_like(neg_sisnr, dtype=torch.bool)

    def evaluate_batch(self, batch, stage):
        targets = [batch.s1_sig, batch.s2_sig]
        if self.hparams.num_spks == 3:
            targets.append(batch.s3_sig)
        with torch.no_grad():
            predictions, targets = self.compute_forward(batch.mix_sig, targets, stage)
            loss = self.compute_objectives(predictions, targets)
        if stage == sb.Stage.TEST and getattr(self.hparams, "save_audio", False):
            if getattr(self.hparams, "n_audio_to_save", 1) > 0:
                self.save_audio(batch.id[0], batch.mix_sig, targets, predictions)
                if hasattr(self.hparams, "n_audio_to_save"):
                    self.hparams.n_audio_to_save -= 1
        return loss.mean().detach()

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:
            self._fqss_loss_sum, self._fqss_loss_count = 0.0, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"si-snr": stage_loss}
        if stage == sb.Stage.TRAIN:
            if self.fqss_loss is not None and self._fqss_loss_count:
                stats["fqss-loss"] = self._fqss_loss_sum / self._fqss_loss_count
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            current_lr = self.optimizer.param_groups[0]["lr"]
            scheduler = getattr(self.hparams, "lr_scheduler", None)
            if isinstance(scheduler, ReduceLROnPlateau):
                current_lr, next_lr = scheduler([self.optimizer], epoch, stage_loss)
                if next_lr != current_lr and current_lr > 0:
                    for group in self.optimizer.param_groups:    # scaled: the quantizer group keeps its ratio
                        group["lr"] *= next_lr / current_lr
            self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch, "lr": current_lr},
                                                train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"si-snr": stats["si-snr"]}, min_keys=["si-snr"])
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)

    # -- results -----------------------------------------------------------------------------------
    def save_results(self, test_data) -> dict:
        """``<output_folder>/test_results.csv``: SDR, SDRi, SI-SNR, SI-SNRi per utterance, then their ``avg``.

        SDR is BSS-Eval v3 (``mir_eval.separation.bss_eval_sources``), as in the stock recipe.
        Returns the averages.
        """
        from mir_eval.separation import bss_eval_sources

        path = os.path.join(self.hparams.output_folder, "test_results.csv")
        columns = ["snt_id", "sdr", "sdr_i", "si-snr", "si-snr_i"]
        loader = sb.dataio.dataloader.make_dataloader(test_data, **{**self.hparams.dataloader_opts, "batch_size": 1})
        rows = []
        self.modules.eval()
        for batch in loader:
            targets = [batch.s1_sig, batch.s2_sig] + ([batch.s3_sig] if self.hparams.num_spks == 3 else [])
            with torch.no_grad():
                predictions, targets = self.compute_forward(batch.mix_sig, targets, sb.Stage.TEST)
                mixture = torch.stack([batch.mix_sig[0]] * self.hparams.num_spks, dim=-1).to(targets.device)
                sisnr = -self.compute_objectives(predictions, targets)
                sisnr_mix = -self.compute_objectives(mixture, targets)
            reference = targets[0].t().cpu().numpy()
            sdr = _mean_sdr(bss_eval_sources, reference, predictions[0].t().cpu().numpy())
            sdr_mix = _mean_sdr(bss_eval_sources, reference, mixture[0].t().cpu().numpy())
            rows.append({"snt_id": batch.id[0], "sdr": sdr, "sdr_i": sdr - sdr_mix, "si-snr": float(sisnr[0]),
                         "si-snr_i": float(sisnr[0] - sisnr_mix[0])})
        average = {key: float(np.mean([row[key] for row in rows])) for key in columns[1:]}
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
            writer.writerow({"snt_id": "avg", **average})
        for name, key in (("SISNR", "si-snr"), ("SISNRi", "si-snr_i"), ("SDR", "sdr"), ("SDRi", "sdr_i")):
            logger.info(f"Mean {name} is {average[key]}")
        return average

    def save_audio(self, snt_id, mixture, targets, predictions) -> None:
        """Peak-normalised wavs of the estimates, references and mixture in ``<save_folder>/audio_results``."""
        from speechbrain.dataio import audio_io

        folder = Path(self.hparams.save_folder) / "audio_results"
        folder.mkdir(parents=True, exist_ok=True)

        def write(name: str, signal: torch.Tensor) -> None:
            signal = signal / signal.abs().max().clamp(min=1e-8)
            audio_io.save(str(folder / name), signal.unsqueeze(0).cpu(), self.hparams.sample_rate)

        for source in range(self.hparams.num_spks):
            write(f"item{snt_id}_source{source + 1}hat.wav", predictions[0, :, source])
            write(f"item{snt_id}_source{source + 1}.wav", targets[0, :, source])
        write(f"item{snt_id}_mix.wav", mixture[0][0])


def _mean_sdr(bss_eval_sources, reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean BSS-Eval SDR over sources; NaN (with a warning) when an estimate is silent."""
    try:
        with warnings.catch_warnings():          # mir_eval 0.8 deprecates bss_eval_sources (the recipe's SDR)
            warnings.simplefilter("ignore", FutureWarning)
            sdr, _, _, _ = bss_eval_sources(reference, estimate)
    except ValueError as error:      # mir_eval refuses all-zero estimates
        logger.warning(f"SDR not computed: {error}")
        return float("nan")
    return float(np.mean(sdr))


# -- inference package ------------------------------------------------------------------------------

def _norm_name(norm: nn.Module) -> str:
    if isinstance(norm, GlobalLayerNorm):
        return "gln"
    if isinstance(norm, CumulativeLayerNorm):
        return "cln"
    if isinstance(norm, nn.GroupNorm):
        return "ln"
    return "bn"


def _transformer_block_args(block: nn.Module, where: str) -> dict:
    if not isinstance(block, SBTransformerBlock):
        raise NotImplementedError(f"save_pretrained_separator: {where} is a {type(block).__name__}; only "
                                  f"SBTransformerBlock (SepFormer) mask nets are supported")
    layer = block.mdl.layers[0]
    attention = layer.self_att.att
    if not isinstance(attention, nn.MultiheadAttention):
        raise NotImplementedError(f"save_pretrained_separator: {where} uses {type(layer.self_att).__name__}; only "
                                  f"regularMHA is supported")
    return {"num_layers": len(block.mdl.layers), "d_model": attention.embed_dim, "nhead": attention.num_heads,
            "d_ffn": layer.pos_ffn.ffn[0].out_features, "dropout": 0.0,
            "activation": "gelu" if isinstance(layer.pos_ffn.ffn[1], nn.GELU) else "relu",
            "use_positional_encoding": bool(block.use_positional_encoding),
            "norm_before": bool(layer.normalize_before)}


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _mapping(values: dict, indent: int = 4) -> str:
    return "\n".join(" " * indent + f"{k}: {_yaml_value(v)}" for k, v in values.items())


def save_pretrained_separator(out_dir: str | os.PathLike, modules, config: QuantConfig | None, sample_rate: int,
                              num_spks: int | None = None) -> Path:
    """Write a SepFormer inference package that ``SepformerSeparation.from_hparams(source=out_dir)`` loads.

    ``out_dir`` gets ``hyperparams.yaml`` (the architecture, read from the modules, plus, for a
    quantized model, the quantization config and the ``quantize_inplace`` line) and
    ``encoder.ckpt``/``masknet.ckpt``/``decoder.ckpt`` (state dicts, quantizer state included).
    ``config=None`` writes a float package. Reload a quantized one with
    :class:`QuantizedSepformerSeparation` (or the stock ``SepformerSeparation``).
    """
    encoder, masknet, decoder = (getattr(modules[k], "module", modules[k]) for k in MODULE_KEYS)
    if not isinstance(masknet, Dual_Path_Model):
        raise NotImplementedError(f"save_pretrained_separator: masknet is a {type(masknet).__name__}, "
                                  f"not a SpeechBrain Dual_Path_Model")
    block = masknet.dual_mdl[0]
    num_spks = num_spks or masknet.num_spks
    conv = encoder.conv1d
    encoder_args = {"kernel_size": conv.kernel_size[0], "out_channels": conv.out_channels,
                    "in_channels": conv.in_channels}
    masknet_args = {"num_spks": num_spks, "in_channels": masknet.conv1d.in_channels,
                    "out_channels": masknet.conv1d.out_channels, "num_layers": masknet.num_layers, "K": masknet.K,
                    "norm": _norm_name(masknet.norm), "skip_around_intra": bool(block.skip_around_intra),
                    "linear_layer_after_inter_intra": bool(block.linear_layer_after_inter_intra),
                    "use_global_pos_enc": bool(masknet.use_global_pos_enc)}
    decoder_args = {"in_channels": decoder.in_channels, "out_channels": decoder.out_channels,
                    "kernel_size": decoder.kernel_size[0], "stride": decoder.stride[0],
                    "bias": decoder.bias is not None}
    intra = _transformer_block_args(block.intra_mdl, "masknet.dual_mdl.0.intra_mdl")
    inter = _transformer_block_args(block.inter_mdl, "masknet.dual_mdl.0.inter_mdl")
    text = f"""# SepFormer separator written by fqss_plugin.speechbrain.save_pretrained_separator.
# Load it with speechbrain.inference.separation.SepformerSeparation.from_hparams(source=<this folder>)
# (or fqss_plugin.speechbrain.QuantizedSepformerSeparation, which also checks the quantizer state).
sample_rate: {sample_rate}
num_spks: {num_spks}

Encoder: !new:speechbrain.lobes.models.dual_path.Encoder
{_mapping(encoder_args)}

SBtfintra: !new:speechbrain.lobes.models.dual_path.SBTransformerBlock
{_mapping(intra)}

SBtfinter: !new:speechbrain.lobes.models.dual_path.SBTransformerBlock
{_mapping(inter)}

MaskNet: !new:speechbrain.lobes.models.dual_path.Dual_Path_Model
{_mapping(masknet_args)}
    intra_model: !ref <SBtfintra>
    inter_model: !ref <SBtfinter>

Decoder: !new:speechbrain.lobes.models.dual_path.Decoder
{_mapping(decoder_args)}

modules:
    encoder: !ref <Encoder>
    masknet: !ref <MaskNet>
    decoder: !ref <Decoder>
"""
    if config is not None:
        text += f"""
fqss: !new:fqss_plugin.QuantConfig
{_mapping(config.to_dict())}

quantized: !apply:fqss_plugin.speechbrain.quantize_inplace
    modules: !ref <modules>
    config: !ref <fqss>
    keep_float_teacher: False
"""
    text += """
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        encoder: !ref <Encoder>
        masknet: !ref <MaskNet>
        decoder: !ref <Decoder>
"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, module in zip(MODULE_KEYS, (encoder, masknet, decoder)):
        with atomic_path(out / f"{key}.ckpt") as tmp:
            torch.save(module.state_dict(), tmp)
    (out / "hyperparams.yaml").write_text(text)
    return out


def separate_sources(mix: torch.Tensor, encoder: nn.Module, masknet: nn.Module, decoder: nn.Module,
                     num_spks: int) -> torch.Tensor:
    """``SepformerSeparation.separate_batch``: ``[B, T]`` -> ``[B, T, num_spks]``, the estimates cut or
    zero-padded to ``T`` (padded by ``T`` and cut, the same values without a length-dependent branch,
    so that a traced graph is right for every length)."""
    mix_w = encoder(mix)
    sep_h = torch.stack([mix_w] * num_spks) * masknet(mix_w)
    est_source = torch.stack([decoder(sep_h[i]) for i in range(num_spks)], dim=-1)
    return F.pad(est_source, (0, 0, 0, mix.shape[1]))[:, :mix.shape[1]]


class SepformerWaveform(nn.Module):
    """A SepFormer's encoder, masknet and decoder as one separator ``[B, T] -> [B, num_spks, T]`` (the
    signature of an Asteroid model), e.g. for :func:`fqss_plugin.export.to_onnx`."""

    def __init__(self, encoder: nn.Module, masknet: nn.Module, decoder: nn.Module, num_spks: int,
                 sample_rate: int | None = None) -> None:
        super().__init__()
        self.encoder, self.masknet, self.decoder = encoder, masknet, decoder
        self.num_spks, self.sample_rate = num_spks, sample_rate

    @classmethod
    def from_separator(cls, separator: SepformerSeparation) -> SepformerWaveform:
        """From a loaded inference package (``SepformerSeparation``/:class:`QuantizedSepformerSeparation`)."""
        mods = separator.mods
        return cls(mods.encoder, mods.masknet, mods.decoder, int(separator.hparams.num_spks),
                   int(separator.hparams.sample_rate))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return separate_sources(mix, self.encoder, self.masknet, self.decoder, self.num_spks).transpose(1, 2)


def prepare_waveform(model: SepformerWaveform, config: QuantConfig) -> SepformerWaveform:
    """:func:`quantize_inplace` on the modules of ``model`` (in place; no teacher copy); returns ``model``."""
    quantize_inplace({"encoder": model.encoder, "masknet": model.masknet, "decoder": model.decoder}, config,
                     keep_float_teacher=False)
    return model


def load_quantized_separator(package: str | os.PathLike) -> SepformerWaveform:
    """The quantized SepFormer of an inference package directory (:func:`save_pretrained_separator`), on CPU."""
    import tempfile
    with tempfile.TemporaryDirectory() as savedir:
        separator = QuantizedSepformerSeparation.from_hparams(source=str(Path(package).resolve()), savedir=savedir,
                                                              run_opts={"device": "cpu"})
    return SepformerWaveform.from_separator(separator).eval()


class QuantizedSepformerSeparation(SepformerSeparation):
    """``SepformerSeparation`` for fqss packages: the same ``separate_batch``/``separate_file``, and a
    check at load time that the modules are quantized and their quantizers came from the checkpoint
    (a float checkpoint in a quantized yaml would otherwise calibrate on the first input)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(is_quantized(m) for m in self.mods.values()):
            raise ValueError("QuantizedSepformerSeparation: the hyperparams.yaml does not quantize the modules "
                             "(no quantize_inplace line); use SepformerSeparation for float models")
        fresh = [f"{key}.{name}" for key, module in self.mods.items() for name, m in module.named_modules()
                 if isinstance(m, QUANTIZER_STATE_TYPES) and not bool(m.initialized)]
        if fresh:
            raise ValueError(f"QuantizedSepformerSeparation: {len(fresh)} quantizers were not in the checkpoints "
                             f"(e.g. {fresh[0]}): the encoder/masknet/decoder.ckpt are float weights, not a "
                             f"trained fqss model")
