"""SpeechBrain hparams glue: quantize a recipe's modules in place from its yaml, and load float or
quantized checkpoints into them through the stock ``Pretrainer``.

* :func:`quantize_inplace` for hyperpyyaml, ``!apply:fqss_plugin.speechbrain.quantize_inplace
  [!ref <modules>, !ref <config>]``: converts the modules in place (every ``!ref`` alias, the
  checkpointer and the pretrainer see the quantized modules) and returns the float teacher, a deep
  copy taken *before* quantization.
* :func:`transfer_into_quantized`, the ``Pretrainer``'s parameter-transfer hook of every quantized
  module (registered on import).
"""
from __future__ import annotations

import copy
import logging
import os

from speechbrain.utils import checkpoints as sb_checkpoints
from torch import nn

from ..quant import QuantConfig, prepare
from ..quant.layers import QuantizedLayer, QuantizedModule
from ..quant.registry import wrapper_for
from ..quant.state import is_quantized, reset_quantizers

logger = logging.getLogger(__name__)

MODULE_KEYS = ("encoder", "masknet", "decoder")
"""The keys of a SpeechBrain separation recipe's ``modules`` (and of ``SepformerSeparation.MODULES_NEEDED``)."""


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



def quantize_inplace(modules, config: QuantConfig | None = None, keep_float_teacher: bool = True,
                     encoder: str = "encoder", decoder: str = "decoder") -> nn.ModuleDict | None:
    """Quantize a recipe's ``modules`` in place; return their float copy (the teacher) or None.

    Meant for the recipe yaml, after ``modules:``::

        float_teacher: !apply:fqss_plugin.speechbrain.quantize_inplace [!ref <modules>, !ref <config>]

    (``config`` defaults to :meth:`QuantConfig.fqss() <fqss_plugin.QuantConfig.fqss>`).

    Every module is converted in place (:func:`fqss_plugin.prepare`), so ``Encoder``, ``MaskNet``,
    ``modules``, the checkpointer's recoverables and the pretrainer's loadables, which all alias
    the same objects, are quantized at once, with upstream parameter names (float checkpoints
    load). The first weighted layer of ``modules[encoder]`` gets the input splitter (or input
    quantizer), the last one of ``modules[decoder]`` the output combiner.

    The returned teacher is a deep copy of the modules *before* quantization, in eval mode, with
    no trainable parameters; a Brain decorated with :func:`~fqss_plugin.speechbrain.fqss_brain` gives it
    the student's pretrained float weights when training starts. ``keep_float_teacher=False`` (vanilla QAT, inference) returns None.
    """
    config = QuantConfig.fqss() if config is None else config
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
    for module in holder.values():
        module.fqss_config = config          # read by FQSSBrainMixin (the quantizers' learning rate)
    return teacher


def _weighted_layers(module: nn.Module, key: str) -> list[nn.Module]:
    layers = [m for m in module.modules() if wrapper_for(m) is not None and issubclass(wrapper_for(m), QuantizedLayer)]
    if not layers:
        raise ValueError(f"quantize_inplace: modules[{key!r}] ({type(module).__name__}) has no weighted layer "
                         f"with a quantized wrapper (conv, transposed conv, linear)")
    return layers


def _name_in(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)
