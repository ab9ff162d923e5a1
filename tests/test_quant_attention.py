"""QMultiheadAttention: equivalence with nn.MultiheadAttention at 16 bits (masks included), every point
quantized at 8 bits, SpeechBrain and nn.TransformerEncoderLayer integration, loading, training, freeze."""
import copy
import re

import pytest
import torch
from torch import nn

import fqss_plugin as fq
from fqss_plugin.quant import QMultiheadAttention, calibration_step
from fqss_plugin.quant.attention import ACTIVATION_POINTS, QOutProjection
from tests.conftest import assert_freeze_is_bit_exact, relative_error

W16A16 = fq.QuantConfig.vanilla(weight_bits=16, act_bits=16)
E, H, L, S, N = 16, 4, 7, 9, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def compare_at_16_bits(module, args, kwargs=None):
    """Relative errors (output, weights) of the prepared module vs the float one, after one calibration step."""
    kwargs = kwargs or {}
    quantized = fq.prepare(copy.deepcopy(module), W16A16)
    with torch.no_grad():
        quantized(*args, **kwargs)
        calibration_step(quantized)
        quantized.eval(), module.eval()
        out, weights = quantized(*args, **kwargs)
        ref, ref_weights = module(*args, **kwargs)
    assert out.shape == ref.shape
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        assert weights.shape == ref_weights.shape
        return relative_error(out, ref), relative_error(weights, ref_weights)
    return relative_error(out, ref), 0.0


def masks():
    gen = torch.Generator().manual_seed(1)
    bool_attn = torch.rand(L, S, generator=gen) < 0.3
    bool_attn[:, 0] = False                                  # no fully masked row (torch gives NaN there)
    bool_keys = torch.zeros(N, S, dtype=torch.bool)
    bool_keys[0, -3:] = True
    float_attn = torch.randn(L, S, generator=gen).masked_fill(bool_attn, float("-inf"))
    float_keys = torch.zeros(N, S).masked_fill(bool_keys, float("-inf"))
    return bool_attn, bool_keys, float_attn, float_keys


@pytest.mark.parametrize("case", ["self", "cross", "bool masks", "float masks", "3-D mask per head",
                                  "per-head weights", "no weights"])
def test_qmha_at_16_bits_matches_nn_multihead_attention(case):
    mha = nn.MultiheadAttention(E, H)
    x, memory, other = torch.randn(L, N, E), torch.randn(S, N, E), torch.randn(S, N, E)
    bool_attn, bool_keys, float_attn, float_keys = masks()
    args, kwargs = (x, memory, memory), {}
    if case == "self":
        args = (x, x, x)
    elif case == "cross":
        args = (x, memory, other)
    elif case == "bool masks":
        kwargs = {"attn_mask": bool_attn, "key_padding_mask": bool_keys}
    elif case == "float masks":                               # finite entries are added, -inf excludes
        kwargs = {"attn_mask": float_attn, "key_padding_mask": float_keys}
    elif case == "3-D mask per head":
        kwargs = {"attn_mask": bool_attn.expand(N * H, L, S).clone()}
    elif case == "per-head weights":
        kwargs = {"average_attn_weights": False, "key_padding_mask": bool_keys}
    elif case == "no weights":
        kwargs = {"need_weights": False}
    out_error, weights_error = compare_at_16_bits(mha, args, kwargs)
    assert out_error < 1e-3 and weights_error < 1e-3


@pytest.mark.parametrize("case", ["batch_first causal", "kdim vdim", "unbatched"])
def test_qmha_layouts_at_16_bits(case):
    if case == "batch_first causal":
        mha = nn.MultiheadAttention(E, H, batch_first=True)
        x = torch.randn(N, L, E)
        args = (x, x, x)
        kwargs = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True}
    elif case == "kdim vdim":
        mha = nn.MultiheadAttention(E, H, batch_first=True, kdim=5, vdim=6)
        args, kwargs = (torch.randn(N, L, E), torch.randn(N, S, 5), torch.randn(N, S, 6)), {}
    else:
        mha = nn.MultiheadAttention(E, H)
        x = torch.randn(L, E)
        args, kwargs = (x, x, x), {}
    out_error, weights_error = compare_at_16_bits(mha, args, kwargs)
    assert out_error < 1e-3 and weights_error < 1e-3


def test_is_causal_without_a_mask_builds_the_causal_mask():
    quantized = fq.prepare(nn.MultiheadAttention(E, H), W16A16).eval()
    x = torch.randn(L, N, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        assert torch.equal(quantized(x, x, x, is_causal=True)[0], quantized(x, x, x, attn_mask=causal)[0])


def test_speechbrain_multihead_attention_is_quantized_inside_its_wrapper():
    from speechbrain.nnet.attention import MultiheadAttention
    attention = MultiheadAttention(nhead=H, d_model=E)
    x = torch.randn(N, L, E)                                  # SpeechBrain is batch first
    out_error, weights_error = compare_at_16_bits(attention, (x, x, x))
    assert out_error < 1e-3 and weights_error < 1e-3
    assert isinstance(fq.prepare(attention, fq.QuantConfig.vanilla()).att, QMultiheadAttention)


def test_transformer_encoder_layer_takes_the_quantized_path_in_eval():
    """nn.TransformerEncoderLayer has a fused eval fast path that reads the raw weights; it must not run."""
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    x = torch.randn(N, L, E)
    keys = torch.zeros(N, L, dtype=torch.bool)
    keys[1, -2:] = True
    assert _layer_error_at_16_bits(layer, x, keys) < 1e-3
    quantized = fq.prepare(copy.deepcopy(layer), fq.QuantConfig.vanilla(weight_bits=4, act_bits=4))
    quantized(x)
    calibration_step(quantized)
    quantized.eval(), layer.eval()
    with_grad = quantized(x, src_key_padding_mask=keys)                  # never the fast path
    with torch.no_grad():
        no_grad = quantized(x, src_key_padding_mask=keys)                # the fast path's conditions
        float_out = layer(x, src_key_padding_mask=keys)
    assert torch.equal(with_grad, no_grad)
    assert not torch.allclose(no_grad, float_out, atol=1e-3)            # 4 bits: visibly quantized


def _layer_error_at_16_bits(layer, x, keys):
    quantized = fq.prepare(copy.deepcopy(layer), W16A16)
    with torch.no_grad():
        quantized(x, src_key_padding_mask=keys)
        calibration_step(quantized)
        quantized.eval(), layer.eval()
        return relative_error(quantized(x, src_key_padding_mask=keys), layer(x, src_key_padding_mask=keys))


def test_nested_tensor_input_gets_a_clear_error():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, batch_first=True), 1,
                                    enable_nested_tensor=True)
    fq.prepare(encoder, fq.QuantConfig.vanilla()).eval()
    x, keys = torch.randn(N, L, E), torch.zeros(N, L, dtype=torch.bool)
    keys[0, -2:] = True
    encoder(x, src_key_padding_mask=keys)                     # calibrates (grad enabled: no nested tensors)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="use_nested_tensor = False"):
        encoder(x, src_key_padding_mask=keys)
    encoder.use_nested_tensor = False
    with torch.no_grad():
        assert encoder(x, src_key_padding_mask=keys).shape == x.shape


def test_qmha_loads_a_float_state_dict_with_upstream_names():
    mha = nn.MultiheadAttention(E, H)
    quantized = fq.prepare(nn.MultiheadAttention(E, H), fq.QuantConfig.vanilla())
    assert isinstance(quantized.out_proj, QOutProjection)
    missing, unexpected = quantized.load_state_dict(mha.state_dict(), strict=False)
    assert unexpected == [] and missing and all("_quantizer" in key for key in missing)
    assert {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"} <= set(quantized.state_dict())
    x = torch.randn(L, N, E)
    quantized(x, x, x)
    restored = fq.prepare(nn.MultiheadAttention(E, H), fq.QuantConfig.vanilla())
    restored.load_state_dict(quantized.state_dict(), strict=True)


class Attention(nn.Module):
    """Linear (with the model's input quantizer) -> self-attention with masks -> output sequence."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, E)
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, dropout=0.1)

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        y = self.proj(x)
        return self.mha(y, y, y, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]


EXPECTED_POINTS = (["mha.in_proj_weight_quantizer", "mha.out_proj.weight_quantizer", "mha.out_proj.output_quantizer"]
                   + [f"mha.{p}_quantizer" for p in ACTIVATION_POINTS])


@pytest.mark.parametrize("with_masks", [False, True])
def test_every_point_of_an_8_bit_attention_is_quantized(with_masks):
    model = fq.prepare(Attention(), fq.QuantConfig.vanilla(), encoder="proj")
    x = torch.randn(2, L, 4)
    args = (x,)
    if with_masks:
        bool_attn, _, _, _ = masks()
        keys = torch.zeros(2, L, dtype=torch.bool)
        keys[1, -2:] = True
        args = (x, keys, bool_attn[:, :L])
    report = fq.coverage_report(model, args)
    assert report.traced and report.fully_quantized, str(report)
    points = set(report.points())
    assert set(EXPECTED_POINTS) <= points, sorted(set(EXPECTED_POINTS) - points)
    assert {"q", "k", "v", "scaled_q", "logits", "softmax", "attn_v"} == set(ACTIVATION_POINTS)


def test_masked_keys_get_exactly_zero_weight_at_8_bits():
    quantized = fq.prepare(nn.MultiheadAttention(E, H, batch_first=True), fq.QuantConfig.vanilla()).eval()
    x = torch.randn(2, L, E)
    keys = torch.zeros(2, L, dtype=torch.bool)
    keys[0, -3:] = True
    keys[1, :] = True                                         # fully masked: zeros, not NaN
    with torch.no_grad():
        _, weights = quantized(x, x, x, key_padding_mask=keys)
    assert torch.all(weights[0, :, -3:] == 0) and torch.all(weights[1] == 0)
    assert torch.isfinite(weights).all()


def test_qmha_trains_with_dropout_then_freezes_bit_exactly():
    model = fq.prepare(Attention(), fq.QuantConfig.vanilla(calib_steps=1), encoder="proj")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fq.attach_calibration(optimizer, model)
    x, target = torch.randn(3, L, 4), torch.randn(3, L, E) * 0.1
    for _ in range(3):
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        optimizer.step()
    mha = model.mha
    assert mha.in_proj_weight.grad.abs().sum() > 0 and mha.out_proj.weight.grad.abs().sum() > 0
    assert mha.logits_quantizer.log_scale.grad is not None and mha.softmax_quantizer.log_scale.grad is not None
    assert mha.in_proj_weight_quantizer.log_scale.grad.abs().sum() > 0
    assert_freeze_is_bit_exact(model, x)


def test_unsupported_options_raise_before_touching_the_module():
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        fq.prepare(mha, fq.QuantConfig.vanilla())
    assert type(mha) is nn.MultiheadAttention


def test_sepformer_masknet_attention_points_are_all_quantized():
    """SpeechBrain's Dual_Path_Model with SBTransformerBlock intra/inter models, as in the SepFormer
    recipe (2 dual-path layers of 8 pre-LN transformer layers, 256 channels, 8 heads, FFN 1024,
    chunk 250): all 32 attentions are quantized at every point, with no float op inside them."""
    from speechbrain.lobes.models.dual_path import Dual_Path_Model, SBTransformerBlock

    def block():
        return SBTransformerBlock(num_layers=8, d_model=256, nhead=8, d_ffn=1024, dropout=0.0,
                                  use_positional_encoding=True, norm_before=True)

    model = Dual_Path_Model(in_channels=256, out_channels=256, intra_model=block(), inter_model=block(),
                            num_layers=2, norm="ln", K=250, num_spks=2, skip_around_intra=True,
                            linear_layer_after_inter_intra=False)
    fq.prepare(model, fq.QuantConfig.vanilla())
    report = fq.coverage_report(model, torch.randn(1, 256, 300))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, QMultiheadAttention)]
    assert len(wrapped) == 32
    points = set(report.points())
    for name in wrapped:
        expected = {point.replace("mha.", name + ".", 1) for point in EXPECTED_POINTS}
        assert expected <= points, sorted(expected - points)
        inside = re.compile(rf" in {re.escape(name)}(\.|\)|$)")
        assert not [op for op in report.float_ops if inside.search(op)], report.float_ops
        assert not [m for m in report.float_modules if m.startswith(name)]
