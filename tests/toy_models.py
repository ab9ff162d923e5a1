"""Small float separators for tests: a ConvTasNet-like conv net written with plain torch modules."""
from __future__ import annotations

import torch
from torch import nn

from fqss_plugin.quant import Add, Mul


class TCNBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, dilation: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(channels, hidden, 1), nn.PReLU(), nn.GroupNorm(1, hidden),
            nn.Conv1d(hidden, hidden, 3, padding=dilation, dilation=dilation, groups=hidden), nn.PReLU(),
            nn.GroupNorm(1, hidden), nn.Conv1d(hidden, channels, 1))
        self.residual = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.net(x))


class ToySeparator(nn.Module):
    """Encoder -> TCN masker -> mask multiply -> transposed-conv decoder, ``[B, T] -> [B, n_src, T]``."""

    def __init__(self, n_src: int = 2, n_filters: int = 32, kernel: int = 16, bottleneck: int = 16,
                 hidden: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.n_src, self.n_filters = n_src, n_filters
        self.encoder = nn.Conv1d(1, n_filters, kernel, stride=kernel // 2, bias=False)
        self.enc_activation = nn.ReLU()
        self.masker = nn.Sequential(
            nn.GroupNorm(1, n_filters), nn.Conv1d(n_filters, bottleneck, 1),
            *[TCNBlock(bottleneck, hidden, 2 ** i) for i in range(blocks)],
            nn.PReLU(), nn.Conv1d(bottleneck, n_src * n_filters, 1), nn.Sigmoid())
        self.apply_mask = Mul()
        self.decoder = nn.ConvTranspose1d(n_filters, 1, kernel, stride=kernel // 2, bias=False)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        batch, length = mix.shape
        features = self.enc_activation(self.encoder(mix.unsqueeze(1)))
        masks = self.masker(features).view(batch, self.n_src, self.n_filters, -1)
        masked = self.apply_mask(masks, features.unsqueeze(1))
        out = torch.stack([self.decoder(masked[:, i]) for i in range(self.n_src)], dim=1)
        return out.squeeze(2)[..., :length]
