"""A multichannel, multi-source ConvTasNet from Asteroid's parts: the music ConvTasNet of Demucs v2.

Demucs 4 no longer contains the music ConvTasNet, and Asteroid's ``ConvTasNet`` is mono (its filterbanks
analyse each channel alone and its decoder returns one channel per source). :class:`StereoConvTasNet` keeps
Asteroid's model structure (``BaseEncoderMaskerDecoder``: encoder, activation, masker, mask product, decoder)
and its masker, ``asteroid.masknn.TDConvNet``, and replaces the filterbanks by their multichannel form:

* encoder: ``Conv1d(audio_channels -> n_filters, kernel_size, stride)`` without bias, then ReLU
  (Demucs v2's ``Conv1d(2, N, L, L // 2)`` + ReLU);
* decoder: :class:`MultichannelDecoder`, ``ConvTranspose1d(n_filters -> audio_channels, kernel_size, stride)``
  applied to every source's masked representation (Demucs v2's ``Linear(N, 2 L)`` + overlap-add with hop
  ``L // 2``, the same map written as one transposed convolution).

Input ``[batch, audio_channels, time]``, output ``[batch, n_src, audio_channels, time]``: Demucs' layout, and
the model has the attributes ``demucs.apply.apply_model`` reads (``samplerate``, ``segment``, ``sources``,
``audio_channels``), so Demucs' chunked inference and its training pieces run it unchanged. It is a
registered Asteroid model: ``serialize()`` and ``BaseModel.from_pretrained`` round-trip it.
"""
from __future__ import annotations

import torch
from asteroid.masknn import TDConvNet
from asteroid.models import register_model
from asteroid.models.base_models import BaseEncoderMaskerDecoder
from torch import nn

MUSDB_SOURCES = ("drums", "bass", "other", "vocals")


class MultichannelDecoder(nn.ConvTranspose1d):
    """``ConvTranspose1d(n_filters -> audio_channels)`` over ``[batch, n_src, n_filters, frames]``: each
    source's representation is decoded alone; returns ``[batch, n_src, audio_channels, time]``."""

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        batch, n_src = spec.shape[:2]
        wav = super().forward(spec.reshape(batch * n_src, *spec.shape[2:]))
        return wav.reshape(batch, n_src, *wav.shape[1:])


class StereoConvTasNet(BaseEncoderMaskerDecoder):
    """ConvTasNet for multichannel music (Demucs v2's ``tasnet``: ``n_filters=256, kernel_size=20, stride=10,
    bn_chan=256, hid_chan=512, n_blocks=10, n_repeats=4``, gLN, ReLU masks; those are the defaults).

    Args:
        sources: the names of the estimated sources, in output order (Demucs' ``model.sources``).
        audio_channels: input and output channels (2: stereo).
        n_filters, kernel_size, stride: the encoder's filters, their length and hop (samples).
        bn_chan, hid_chan, n_blocks, n_repeats, conv_kernel_size, norm_type, mask_act: ``TDConvNet``'s
            arguments (no skip connections, as in Demucs v2).
        sample_rate: Hz.
        segment: seconds per chunk of ``demucs.apply.apply_model(split=True)``.

    The MUSDB18 recipes feed it mixtures normalised by the mean and standard deviation of their mono downmix
    (Demucs' convention) and undo it on the estimates: :attr:`input_normalization`, which the int8 export
    records so that ``fqss separate`` does the same.
    """

    input_normalization = "mono_mean_std"

    def __init__(self, sources=MUSDB_SOURCES, audio_channels: int = 2, n_filters: int = 256, kernel_size: int = 20,
                 stride: int = 10, bn_chan: int = 256, hid_chan: int = 512, n_blocks: int = 10, n_repeats: int = 4,
                 conv_kernel_size: int = 3, norm_type: str = "gLN", mask_act: str = "relu",
                 sample_rate: float = 44100, segment: float = 8.0) -> None:
        sources = list(sources)
        if not sources or audio_channels < 1 or not 0 < stride <= kernel_size:
            raise ValueError(f"StereoConvTasNet: expected sources, audio_channels >= 1 and 0 < stride <= kernel_size "
                             f"(got {sources}, {audio_channels}, stride {stride}, kernel_size {kernel_size})")
        encoder = nn.Conv1d(audio_channels, n_filters, kernel_size, stride=stride, bias=False)
        masker = TDConvNet(n_filters, len(sources), n_blocks=n_blocks, n_repeats=n_repeats, bn_chan=bn_chan,
                           hid_chan=hid_chan, skip_chan=0, conv_kernel_size=conv_kernel_size, norm_type=norm_type,
                           mask_act=mask_act)
        decoder = MultichannelDecoder(n_filters, audio_channels, kernel_size, stride=stride, bias=False)
        encoder.sample_rate = sample_rate          # where BaseEncoderMaskerDecoder reads the model's rate
        super().__init__(encoder, masker, decoder, encoder_activation="relu")
        self.in_channels = audio_channels
        self.sources, self.audio_channels, self.segment = sources, audio_channels, segment
        self._args = dict(sources=sources, audio_channels=audio_channels, n_filters=n_filters,
                          kernel_size=kernel_size, stride=stride, bn_chan=bn_chan, hid_chan=hid_chan, n_blocks=n_blocks,
                          n_repeats=n_repeats, conv_kernel_size=conv_kernel_size, norm_type=norm_type,
                          mask_act=mask_act, segment=segment)

    @property
    def samplerate(self) -> float:
        """Demucs' name of ``sample_rate``."""
        return self.sample_rate

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 3 or wav.shape[1] != self.audio_channels:
            raise ValueError(f"StereoConvTasNet: expected a [batch, {self.audio_channels}, time] waveform, "
                             f"got shape {list(wav.shape)}")
        return super().forward(wav)

    def forward_decoder(self, masked_tf_rep: torch.Tensor) -> torch.Tensor:
        return self.decoder(masked_tf_rep)

    def get_model_args(self) -> dict:
        return {**self._args, "sample_rate": self.sample_rate}


register_model(StereoConvTasNet)
