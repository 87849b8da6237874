"""DRAN, scaled to a CPU: a dilated residual attention autoencoder whose two encodings are merged
by a fixed rule and decoded (after Zhou et al., DRAN / DILRAN; facts in METHODS.md A.3).

Kept from the paper's official code: the pooling-upsampling attention ``P(x) = ReLU(up(avgpool(x)))``
(no strided layers: features stay at full resolution), an input stage ``x + P(x) * conv1x1(x)``,
three parallel 3x3 convolutions with dilation 1, 3 and 5 concatenated and reduced by a 1x1
convolution, the residual attention block whose one 3x3 convolution is applied one, two and three
times (receptive fields 3, 5, 7) with ``out = x + P(x) * sum``, and the softmax / nuclear-norm
fusion rule (``sfnn``). What we changed: 32 channels instead of 64 (4x fewer multiply-adds) and a
decoder with LeakyReLU between its convolutions (the official decoder is linear, so decoding a
blend of two encodings gave back the same blend of the two images).

Fusion rules (``rule``):

- ``sfnn``: softmax across channels, nuclear norm of every channel map, one weight per image from
  the largest norm squared (the paper's rule);
- ``l1``: per-pixel weights from the channel L1 norm of each encoding, averaged over 3x3 windows;
- ``mean``: the mean of the two encodings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("sfnn", "l1", "mean")


def pool_attention(x: torch.Tensor) -> torch.Tensor:
    """``ReLU(nearest-upsample(avg-pool 2x2(x)))``: a smooth, non-negative attention map."""
    return F.relu(F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode="nearest"))


class ResidualAttention(nn.Module):
    """One shared 3x3 convolution applied 1, 2 and 3 times; the sum gated by pool attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv(x)
        c2 = self.conv(c1)
        c3 = self.conv(c2)
        return x + pool_attention(x) * (c1 + c2 + c3)


class Encoder(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 1)
        self.dilated = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in (1, 3, 5))
        self.reduce = nn.Conv2d(3 * channels, channels, 1)
        self.norm1, self.norm2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.attention = ResidualAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x + pool_attention(x) * self.stem(x)
        y = self.norm1(self.reduce(torch.cat([conv(x1) for conv in self.dilated], 1)))
        y = self.norm2(self.attention(y))
        return x1 + pool_attention(x1) * y


STRIP_PIXELS = 1 << 19  # at inference, a larger slice is encoded and decoded in strips of rows
HALO = 16  # rows of context each side of a strip: beyond the encoder's reach (10 rows) and the decoder's (3), even


def in_strips(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a layer that only looks ``HALO`` rows around each pixel (and pools 2x2 blocks
    from even rows), computed on strips of about ``STRIP_PIXELS`` pixels with ``HALO`` rows of
    context each side: the same values, and the layer's working memory bounded by the strip."""
    height, width = x.shape[-2:]
    rows = max(2 * HALO, STRIP_PIXELS // max(1, width) // 2 * 2)
    if height <= rows + 2 * HALO:
        return layer(x)
    parts = []
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        start, stop = max(0, top - HALO), min(height, bottom + HALO)
        parts.append(layer(x[..., start:stop, :])[..., top - start : bottom - start, :])
    return torch.cat(parts, -2)


def fuse_features(fa: torch.Tensor, fb: torch.Tensor, rule: str = "sfnn") -> torch.Tensor:
    """Merge two encodings (N, C, H, W) with one of :data:`RULES`."""
    if rule == "mean":
        return (fa + fb) / 2
    if rule == "l1":
        na = F.avg_pool2d(fa.abs().sum(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=False)
        nb = F.avg_pool2d(fb.abs().sum(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=False)
        # equal weights where both encodings are zero (an epsilon in the denominator was folded away by
        # the ONNX exporter, giving NaN in the background)
        total = na + nb
        wa = torch.where(total > 0, na / total.clamp_min(1e-12), torch.full_like(total, 0.5))
        return wa * fa + (1 - wa) * fb
    if rule == "sfnn":
        na = torch.linalg.matrix_norm(torch.softmax(fa, 1), ord="nuc").amax(1) ** 2  # (N,)
        nb = torch.linalg.matrix_norm(torch.softmax(fb, 1), ord="nuc").amax(1) ** 2
        wa = (na / (na + nb))[:, None, None, None]
        return wa * fa + (1 - wa) * fb
    raise ValueError(f"unknown DRAN fusion rule {rule!r}; choose {', '.join(RULES)}")


class DRAN(nn.Module):
    """Autoencoder (``reconstruct``) and fusion (``forward``) of (N,1,H,W) images in [0,1].

    H and W must be even (:func:`medfuse_cli.models.infer.fuse_stack` pads).
    """

    multiple = 2
    cpu_pixels_per_forward = 1 << 14  # full-resolution features: one slice of 128x128 or more

    def __init__(self, channels: int = 32, rule: str = "sfnn") -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown DRAN fusion rule {rule!r}; choose {', '.join(RULES)}")
        self.config = {"channels": channels, "rule": rule}
        self.rule = rule
        self.encoder = Encoder(channels)
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels // 2, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels // 2, 1, 3, padding=1),
        )

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def forward(self, a: torch.Tensor, b: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        del task  # one model for every pair: the rule, not the task, decides
        # training: the whole batch at once (BatchNorm's batch statistics); inference: large slices in strips
        run = (lambda layer, x: layer(x)) if self.training else in_strips
        fused = fuse_features(run(self.encoder, a), run(self.encoder, b), self.rule)
        return run(self.decoder, fused).clamp(0, 1)
