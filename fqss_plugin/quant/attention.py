"""A fully quantized ``torch.nn.MultiheadAttention``: projections, logits, softmax and attn·V on grids.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` (or a fused kernel) on the raw
``in_proj_weight`` and ``out_proj.weight``, so wrapping its ``out_proj`` does nothing and the
attention matrix is never seen. :class:`QMultiheadAttention` computes the same function
explicitly with the same parameters (``in_proj_weight``/``in_proj_bias`` or
``q/k/v_proj_weight``, ``out_proj.weight``/``out_proj.bias``: an ``nn.MultiheadAttention``
``state_dict`` loads strictly) and quantizes every intermediate. With ``d`` the head size,
``Q_*`` per-tensor activation quantizers and ``Q_w`` per-row weight quantizers::

    q, k, v = Q_q(x_q W_q^T + b_q), Q_k(x_k W_k^T + b_k), Q_v(x_v W_v^T + b_v)    rows of Q_w(in_proj_weight)
    q_s     = Q_scaled_q(q / sqrt(d))                                            per head
    L       = Q_logits(q_s k^T + B)                   B: the finite part of a float mask (usually none)
    P       = Q_softmax(softmax(L, excluded keys set to -inf))
    o       = Q_attn_v(dropout(P) v)
    y       = Q_out(concat_heads(o) Q_w(W_out)^T + b_out)                    ``out_proj`` (a QLinear)

Masks follow ``F.multi_head_attention_forward``: ``attn_mask`` ``[L, S]`` or ``[N·heads, L, S]``
and ``key_padding_mask`` ``[N, S]``, boolean (True = excluded) or float (added to the logits;
``-inf`` excludes). Excluded positions are not put through ``Q_logits`` (their ``-inf`` would
wreck its range); they are set to ``-inf`` on the quantized logits, i.e. a masked softmax, which
is how integer engines apply masks. A query row whose every key is excluded gets all-zero
weights (``torch`` returns NaN there, which would poison the quantizer ranges).

The returned attention weights are ``P`` after dropout, per head, or their float mean over heads
with ``average_attn_weights`` (weights are an inspection output, not part of the computation).
``add_bias_kv`` and ``add_zero_attn`` are not supported (``NotImplementedError`` at ``prepare``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .config import QuantConfig
from .layers import QLinear, QuantizedModule
from .quantizers import activation_quantizer, weight_quantizer
from .registry import register

ACTIVATION_POINTS = ("q", "k", "v", "scaled_q", "logits", "softmax", "attn_v")
"""The activation quantizers of a :class:`QMultiheadAttention` (``<point>_quantizer``), in order;
the output projection's are ``out_proj.weight_quantizer`` and ``out_proj.output_quantizer``."""


class QOutProjection(QLinear, NonDynamicallyQuantizableLinear):
    """``out_proj`` of a :class:`QMultiheadAttention`: ``Q_out(x Q_w(W)^T + b)``.

    ``NonDynamicallyQuantizableLinear`` is not registered (its exact type is not ``nn.Linear``):
    only :class:`QMultiheadAttention` converts its own ``out_proj``, since a float
    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and never calls the module.
    """


def _no_fused_fast_path(module: nn.Module, args) -> None:
    """A no-op forward pre-hook. Its presence makes ``nn.TransformerEncoderLayer.forward`` skip its
    fused eval fast path (``torch._transformer_encoder_layer_fwd``), which reads the raw weights and
    would bypass every quantizer of the layer; the layer's check is "forward pre-/hooks are attached"."""
    return None


class QMultiheadAttention(QuantizedModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with every weight and activation quantized (see the module docstring).

    Supports ``batch_first`` both ways, unbatched inputs, self- and cross-attention, ``kdim``/``vdim``
    different from ``embed_dim``, boolean and float ``attn_mask`` and ``key_padding_mask``,
    ``is_causal`` (a causal mask is built when ``attn_mask`` is None), attention dropout in
    training, ``need_weights`` and ``average_attn_weights``. Returns ``(output, weights or None)``.
    """

    float_internals = "bias: float in QAT, int32 (scale s_x*s_w) at export"

    @classmethod
    def convert_(cls, module: nn.Module, config: QuantConfig) -> nn.Module:
        if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
            raise NotImplementedError("QMultiheadAttention: add_bias_kv and add_zero_attn are not supported; "
                                      "leave this attention in float with QuantConfig(exclude=(<its module name>,))")
        return super().convert_(module, config)

    def _init_quantization(self, config: QuantConfig) -> None:
        if self._qkv_same_embed_dim:
            self.in_proj_weight_quantizer = weight_quantizer(3 * self.embed_dim, config)
        else:
            self.q_proj_weight_quantizer = weight_quantizer(self.embed_dim, config)
            self.k_proj_weight_quantizer = weight_quantizer(self.embed_dim, config)
            self.v_proj_weight_quantizer = weight_quantizer(self.embed_dim, config)
        for point in ACTIVATION_POINTS:
            setattr(self, f"{point}_quantizer", activation_quantizer(config))
        QOutProjection.convert_(self.out_proj, config)
        self.register_forward_pre_hook(_no_fused_fast_path)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError(
                "QMultiheadAttention got a NestedTensor: nn.TransformerEncoder converts its input to nested "
                "tensors in eval mode under no_grad when given src_key_padding_mask. Build it with "
                "enable_nested_tensor=False, or set `encoder.use_nested_tensor = False` after prepare().")
        batched = query.dim() == 3
        if not batched:
            query, key, value = _same_identity((query, key, value), lambda t: t.unsqueeze(1))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = _same_identity((query, key, value), lambda t: t.transpose(0, 1))
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"QMultiheadAttention: expected query of embedding size {self.embed_dim}, got {embed_dim}")
        heads, head_dim = self.num_heads, self.head_dim

        q, k, v = self._in_projection(query, key, value)
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)          # [N·h, L, d]
        k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)          # [N·h, S, d]
        v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        q = self.scaled_q_quantizer(q * math.sqrt(1.0 / head_dim))

        excluded, bias = self._masks(attn_mask, key_padding_mask, is_causal, bsz, tgt_len, src_len, query.device)
        if bias is None:
            logits = torch.bmm(q, k.transpose(1, 2))
        else:
            logits = torch.baddbmm(bias.to(q.dtype), q, k.transpose(1, 2))
        logits = self.logits_quantizer(logits)
        if excluded is not None:
            logits = logits.masked_fill(excluded, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        if excluded is not None:
            weights = weights.masked_fill(excluded.all(dim=-1, keepdim=True), 0.0)   # no NaN on fully masked rows
        weights = self.softmax_quantizer(weights)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout, training=True)

        out = self.attn_v_quantizer(torch.bmm(weights, v))                     # [N·h, L, d]
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, embed_dim)

        if need_weights:
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            weights = None
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _in_projection(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantized ``q, k, v`` ``[T, N, E]``; one matmul for self-attention, as ``F.multi_head_attention_forward``."""
        e = self.embed_dim
        biases = self.in_proj_bias.split(e) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight_quantizer(self.in_proj_weight)
            if query is key and key is value:
                q, k, v = F.linear(query, weight, self.in_proj_bias).split(e, dim=-1)
            elif key is value:
                q = F.linear(query, weight[:e], biases[0])
                k, v = F.linear(key, weight[e:], None if self.in_proj_bias is None else self.in_proj_bias[e:]
                                ).split(e, dim=-1)
            else:
                w_q, w_k, w_v = weight.split(e)
                q, k = F.linear(query, w_q, biases[0]), F.linear(key, w_k, biases[1])
                v = F.linear(value, w_v, biases[2])
        else:
            q = F.linear(query, self.q_proj_weight_quantizer(self.q_proj_weight), biases[0])
            k = F.linear(key, self.k_proj_weight_quantizer(self.k_proj_weight), biases[1])
            v = F.linear(value, self.v_proj_weight_quantizer(self.v_proj_weight), biases[2])
        return self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)

    def _masks(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
               bsz: int, tgt_len: int, src_len: int, device: torch.device
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Split the masks into excluded positions (bool) and an additive float bias.

        Both are broadcastable to ``[N·heads, L, S]``; each is None when there is nothing to apply.
        The bias holds the finite, non-zero entries of float masks (``-inf`` entries are exclusions).
        """
        heads = self.num_heads
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).triu(1)
        parts = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                                       f"but should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, "
                                       f"but should be {(bsz * heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            parts.append(attn_mask)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise RuntimeError(f"expected key_padding_mask of shape {(bsz, src_len)}, "
                                   f"got {tuple(key_padding_mask.shape)}")
            parts.append(key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                         .reshape(bsz * heads, 1, src_len))
        excluded = bias = None
        for mask in parts:
            if mask.dtype == torch.bool:
                part_excluded, part_bias = mask, None
            elif mask.is_floating_point():
                part_excluded = torch.isneginf(mask)
                has_bias = bool(((mask != 0) & ~part_excluded).any())
                part_bias = mask.masked_fill(part_excluded, 0.0) if has_bias else None
                if not bool(part_excluded.any()):
                    part_excluded = None
            else:
                raise AssertionError(f"only bool and floating types of masks are supported, got {mask.dtype}")
            if part_excluded is not None:
                excluded = part_excluded if excluded is None else excluded | part_excluded
            if part_bias is not None:
                bias = part_bias if bias is None else bias + part_bias
        return excluded, bias


def _same_identity(tensors: tuple[torch.Tensor, ...], fn) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` to each tensor, keeping ``query is key``/``key is value`` identities (self-attention)."""
    done: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if id(tensor) not in done:
            done[id(tensor)] = fn(tensor)
    return tuple(done[id(tensor)] for tensor in tensors)


register(nn.MultiheadAttention, QMultiheadAttention)
